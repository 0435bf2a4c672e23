"""preference_metrics: TRL's keys, our dispersion keys, values, and no host synchronisation."""

import pytest
import torch

import mallowspo_fast as mpf

TRL_KEYS = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected"}


def _inputs():
    rw = torch.tensor([0.5, -0.2, 0.1, 0.3])
    rl = torch.tensor([0.1, 0.4, 0.1, -0.3])
    lw = torch.tensor([-10.0, -20.0, -30.0, -40.0])
    ll = torch.tensor([-11.0, -19.0, -33.0, -41.0])
    return rw, rl, lw, ll


def test_trl_keys_and_values():
    rw, rl, lw, ll = _inputs()
    m = mpf.preference_metrics(rw, rl, lw, ll)
    assert set(m) == TRL_KEYS
    assert all(v.dim() == 0 and v.dtype == torch.float32 for v in m.values())
    assert float(m["rewards/chosen"]) == pytest.approx(0.175)
    assert float(m["rewards/rejected"]) == pytest.approx(0.075)
    assert float(m["rewards/accuracies"]) == pytest.approx(0.5)  # a tie (row 2) is not a win
    assert float(m["rewards/margins"]) == pytest.approx(0.1)
    assert float(m["logps/chosen"]) == pytest.approx(-25.0)
    assert float(m["logps/rejected"]) == pytest.approx(-26.0)


def test_logits_and_dispersion_keys():
    rw, rl, lw, ll = _inputs()
    c = torch.tensor([1.0, 0.5, 1.5, 1.0])
    e = torch.tensor([0.2, 0.4, 0.6, 0.9])
    empty = torch.tensor([False, False, False, True])
    m = mpf.preference_metrics(rw, rl, lw, ll, chosen_logits_mean=torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
                               rejected_logits_mean=torch.tensor([-1.0, 1.0, 0.0, 2.0]), neg_log_dispersion=c,
                               pair_entropy=e, empty_pairs=empty)
    assert set(m) == TRL_KEYS | {"logits/chosen", "logits/rejected", "dispersion/neg_log_mean",
                                 "dispersion/neg_log_std", "dispersion/entropy_mean", "dispersion/empty_pairs"}
    assert float(m["logits/chosen"]) == pytest.approx(2.5)
    assert float(m["logits/rejected"]) == pytest.approx(0.5)
    assert float(m["dispersion/neg_log_mean"]) == pytest.approx(1.0)
    assert float(m["dispersion/neg_log_std"]) == pytest.approx((0.125) ** 0.5)
    assert float(m["dispersion/entropy_mean"]) == pytest.approx(0.4)  # the empty pair is left out
    assert float(m["dispersion/empty_pairs"]) == 1.0
    one = mpf.preference_metrics(rw[:1], rl[:1], lw[:1], ll[:1], neg_log_dispersion=c[:1], pair_entropy=e[:1],
                                 empty_pairs=torch.tensor([True]))
    assert float(one["dispersion/neg_log_std"]) == 0.0
    assert float(one["dispersion/entropy_mean"]) == 0.0


def test_no_host_sync(monkeypatch):
    """Every way of reading a tensor's value on the host raises during the call."""
    def refuse(*_a, **_k):
        raise AssertionError("preference_metrics read a value on the host")

    rw, rl, lw, ll = _inputs()
    lw.requires_grad_(True)
    for name in ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    m = mpf.preference_metrics(rw, rl, lw, ll, chosen_logits_mean=rw, rejected_logits_mean=rl,
                               neg_log_dispersion=rw, pair_entropy=rl, empty_pairs=rw > 0)
    monkeypatch.undo()
    assert len(m) == 12 and not any(v.requires_grad for v in m.values())


def test_errors():
    rw, rl, lw, ll = _inputs()
    with pytest.raises(ValueError, match="rejected_logps has shape \\(2,\\)"):
        mpf.preference_metrics(rw, rl, lw, ll[:2])
    with pytest.raises(ValueError, match="give both chosen_logits_mean and rejected_logits_mean"):
        mpf.preference_metrics(rw, rl, lw, ll, chosen_logits_mean=rw)
    with pytest.raises(TypeError, match="empty_pairs must be a bool tensor"):
        mpf.preference_metrics(rw, rl, lw, ll, empty_pairs=rw)
    with pytest.raises(ValueError, match="neg_log_dispersion has shape \\(3,\\)"):
        mpf.preference_metrics(rw, rl, lw, ll, neg_log_dispersion=rw[:3])
