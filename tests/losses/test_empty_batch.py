"""An empty batch (B = 0) is an error in every loss, not a silent NaN mean."""

import pytest
import torch

import mallowspo_fast as mpf


def _empty(dtype=torch.float32) -> torch.Tensor:
    return torch.zeros(0, dtype=dtype)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo", "mallows_theta"])
def test_preference_loss_rejects_an_empty_batch(loss_type: str):
    e, n = _empty(), torch.zeros(0, dtype=torch.long)
    with pytest.raises(ValueError, match=r"preference_loss: policy_chosen_logps is empty.*at least one pair"):
        mpf.preference_loss(e, e, e, e, loss_type=loss_type, neg_log_dispersion=e,
                            chosen_num_tokens=n, rejected_num_tokens=n)


def test_kto_loss_rejects_an_empty_batch():
    labels = torch.zeros(0, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"kto_loss: policy_logps is empty.*at least one row"):
        mpf.kto_loss(_empty(), _empty(), labels, kl=0.0)


def test_orpo_loss_rejects_an_empty_batch():
    n = torch.zeros(0, dtype=torch.long)
    with pytest.raises(ValueError, match=r"orpo_loss: policy_chosen_logps is empty.*\(shape \(0,\)\)"):
        mpf.orpo_loss(_empty(), _empty(), n, n)


def test_one_pair_is_still_fine():
    """The check's boundary: B = 1 gives a finite loss in all three."""
    x, n = torch.tensor([-3.0]), torch.tensor([2])
    assert torch.isfinite(mpf.preference_loss(x, x - 1, x, x, beta=0.1).loss)
    assert torch.isfinite(mpf.kto_loss(x, x, torch.tensor([True]), kl=0.0).loss)
    assert torch.isfinite(mpf.orpo_loss(x, x - 1, n, n).loss)
