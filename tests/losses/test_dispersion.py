"""The dispersion estimator c(x): spec golden values, agreement with a naive float64 path from
logits through the fused op's entropies, empty responses, φ* = "auto"."""

import math

import pytest
import torch

import mallowspo_fast as mpf

BACKENDS = [pytest.param("reference", id="reference"), pytest.param("torch", id="torch")]

# Spec §5, O1 (V = 8).
O1_CHOSEN = [[2, 1, 0, 0, 0, 0, 0, 0], [0] * 8, [5, 0, 0, 0, 0, 0, 0, 0]]
O1_REJECTED = [[1, 1, 1, 1, 0, 0, 0, 0], [3, 2, 1, 0, 0, 0, 0, 0]]
O1_H_CHOSEN = [1.6930374683, 2.0794415417, 0.2712932683]
O1_H_REJECTED = [1.9684974700, 1.3515042491]
O1_E_CHOSEN, O1_E_REJECTED, O1_E_PAIR = 0.6482144680, 0.7982916693, 0.7232530687
O1_C = {0.29: 0.0939588667, 1.0: 0.3239960922}


def _naive_entropy_f64(logits: torch.Tensor) -> torch.Tensor:
    """H = −Σ p log p per row, in float64, straight from the definition."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _naive_c_f64(logits_w, labels_w, logits_l, labels_l, phi_star):
    """Spec §2 from logits: ē(y) = ΣH_t / (n log V) over response positions, pair mean, c = −φ* ln ē;
    an empty response makes the pair's c exactly 1."""
    log_v = math.log(logits_w.shape[-1])
    out = []
    for b in range(logits_w.shape[0]):
        e = []
        for logits, labels in ((logits_w, labels_w), (logits_l, labels_l)):
            keep = labels[b] != -100
            n = int(keep.sum())
            e.append(None if n == 0 else float(_naive_entropy_f64(logits[b][keep]).sum()) / (n * log_v))
        if None in e:
            out.append(1.0)
        else:
            out.append(-phi_star * math.log(max(0.5 * (e[0] + e[1]), 1e-6)))
    return torch.tensor(out, dtype=torch.float64)


def _o1_logits():
    w = torch.tensor([O1_CHOSEN], dtype=torch.float32)  # [1, 3, 8]
    rej = torch.tensor([O1_REJECTED], dtype=torch.float32)  # [1, 2, 8]
    return w, torch.zeros(1, 3, dtype=torch.long), rej, torch.zeros(1, 2, dtype=torch.long)


def test_o1_token_entropies():
    w, _, rej, _ = _o1_logits()
    torch.testing.assert_close(_naive_entropy_f64(w[0]), torch.tensor(O1_H_CHOSEN, dtype=torch.float64),
                               atol=1e-10, rtol=0)
    torch.testing.assert_close(_naive_entropy_f64(rej[0]), torch.tensor(O1_H_REJECTED, dtype=torch.float64),
                               atol=1e-10, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("phi_star", sorted(O1_C), ids=lambda p: f"phi_star={p}")
def test_o1_golden_from_fused_op(phi_star, backend):
    w, lw, rej, lr = _o1_logits()
    sw = mpf.sequence_logprobs(w, lw, backend=backend)
    sr = mpf.sequence_logprobs(rej, lr, backend=backend)
    e = mpf.pair_entropy(sw.entropy, sr.entropy, 8)
    torch.testing.assert_close(e, torch.tensor([O1_E_PAIR]), atol=1e-6, rtol=0)
    torch.testing.assert_close(sw.entropy / math.log(8), torch.tensor([O1_E_CHOSEN]), atol=1e-6, rtol=0)
    torch.testing.assert_close(sr.entropy / math.log(8), torch.tensor([O1_E_REJECTED]), atol=1e-6, rtol=0)
    c = mpf.neg_log_dispersion(sw.entropy, sr.entropy, 8, phi_star=phi_star,
                               chosen_num_tokens=sw.num_tokens, rejected_num_tokens=sr.num_tokens)
    assert c.dtype == torch.float32
    torch.testing.assert_close(c, torch.tensor([O1_C[phi_star]]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("phi_star", sorted(O1_C), ids=lambda p: f"phi_star={p}")
def test_o1_golden_float64(phi_star):
    ent_w = torch.tensor([sum(O1_H_CHOSEN) / 3], dtype=torch.float64)
    ent_l = torch.tensor([sum(O1_H_REJECTED) / 2], dtype=torch.float64)
    c = mpf.neg_log_dispersion(ent_w, ent_l, 8, phi_star=phi_star)
    assert c.dtype == torch.float64
    torch.testing.assert_close(c, torch.tensor([O1_C[phi_star]], dtype=torch.float64), atol=1e-9, rtol=0)


def _random_pairs(seed: int):
    """B = 5 odd-shaped pairs: prompt masking, right padding, sharp and flat rows, one empty chosen
    response (row 3) and one empty rejected response (row 4)."""
    gen = torch.Generator().manual_seed(seed)
    B, T_w, T_l, V = 5, 11, 7, 37
    logits_w = torch.randn(B, T_w, V, generator=gen) * torch.tensor([0.3, 1.0, 4.0, 1.0, 2.0]).view(B, 1, 1)
    logits_l = torch.randn(B, T_l, V, generator=gen) * torch.tensor([0.5, 3.0, 1.0, 1.0, 0.1]).view(B, 1, 1)
    labels_w = torch.randint(0, V, (B, T_w), generator=gen)
    labels_l = torch.randint(0, V, (B, T_l), generator=gen)
    for b, (prompt, length) in enumerate([(2, 11), (4, 9), (0, 5), (3, 3), (1, 6)]):
        labels_w[b, :prompt] = -100
        labels_w[b, length:] = -100
    for b, (prompt, length) in enumerate([(1, 7), (3, 5), (2, 6), (0, 4), (2, 2)]):
        labels_l[b, :prompt] = -100
        labels_l[b, length:] = -100
    return logits_w, labels_w, logits_l, labels_l


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("phi_star", [0.29, 1.0, 2.7], ids=lambda p: f"phi_star={p}")
def test_matches_naive_float64_from_logits(phi_star, backend):
    logits_w, labels_w, logits_l, labels_l = _random_pairs(seed=7)
    sw = mpf.sequence_logprobs(logits_w, labels_w, backend=backend)
    sr = mpf.sequence_logprobs(logits_l, labels_l, backend=backend)
    c = mpf.neg_log_dispersion(sw.entropy, sr.entropy, logits_w.shape[-1], phi_star=phi_star,
                               chosen_num_tokens=sw.num_tokens, rejected_num_tokens=sr.num_tokens)
    expected = _naive_c_f64(logits_w, labels_w, logits_l, labels_l, phi_star)
    assert expected[3] == 1.0 and expected[4] == 1.0  # the fixture's empty responses
    assert bool(torch.isfinite(c).all())
    torch.testing.assert_close(c.double(), expected, atol=1e-6, rtol=1e-5)
    assert bool((c[:3] != 1.0).all())


def test_empty_responses_are_neutral_and_counted():
    ent = torch.tensor([0.0, 1.2, 0.0, 2.0])
    n_w = torch.tensor([0, 4, 3, 0])
    n_l = torch.tensor([5, 0, 2, 0])
    ent_l = torch.tensor([1.0, 0.0, 0.0, 0.0])
    c = mpf.neg_log_dispersion(ent, ent_l, 100, chosen_num_tokens=n_w, rejected_num_tokens=n_l)
    empty = mpf.empty_response_pairs(n_w, n_l)
    assert empty.tolist() == [True, True, False, True]
    assert c[empty].tolist() == [1.0, 1.0, 1.0]
    # Row 2 has tokens but zero entropy (a one-hot model): ē floors at 1e-6, c = φ*·ln(1e6).
    assert float(c[2]) == pytest.approx(0.29 * math.log(1e6), rel=1e-6)
    assert bool(torch.isfinite(c).all())


def test_without_token_counts_an_empty_response_reads_as_zero_entropy():
    c = mpf.neg_log_dispersion(torch.tensor([0.0]), torch.tensor([0.0]), 10, phi_star=0.5)
    assert float(c) == pytest.approx(0.5 * math.log(1e6), rel=1e-6)


def test_dispersion_is_a_constant_and_nonnegative():
    ent = torch.tensor([0.5, 1.0, math.log(50.0) + 1e-6], requires_grad=True)
    c = mpf.neg_log_dispersion(ent, ent, 50)
    assert not c.requires_grad
    assert bool((c >= 0).all())  # an entropy a hair above log V (rounding) does not go negative
    assert float(c[2]) == 0.0


def test_auto_phi_star_makes_mean_weight_one():
    e = torch.tensor([0.2, 0.45, 0.6, 0.9, 0.05], dtype=torch.float64)
    phi_star = mpf.auto_phi_star(e)
    assert phi_star == pytest.approx(1.0 / float((-torch.log(e)).mean()), rel=1e-15)
    c = -phi_star * torch.log(e)
    assert float(c.mean()) == pytest.approx(1.0, rel=1e-14)
    # Through the estimator: mean c over the set is 1.
    log_v = math.log(32)
    c2 = mpf.neg_log_dispersion(e * log_v, e * log_v, 32, phi_star=phi_star)
    assert float(c2.mean()) == pytest.approx(1.0, rel=1e-12)


def test_auto_phi_star_leaves_out_empty_pairs_and_accepts_floats():
    e = [0.3, 0.0, 0.7]
    empty = torch.tensor([False, True, False])
    expected = 1.0 / ((-math.log(0.3) - math.log(0.7)) / 2)
    assert mpf.auto_phi_star(e, empty_pairs=empty) == pytest.approx(expected, rel=1e-6)


def test_auto_phi_star_errors():
    with pytest.raises(ValueError, match="no pair entropy"):
        mpf.auto_phi_star([])
    with pytest.raises(ValueError, match="no pair entropy"):
        mpf.auto_phi_star([0.4], empty_pairs=torch.tensor([True]))
    with pytest.raises(ValueError, match="uniform"):
        mpf.auto_phi_star(torch.ones(3))
    with pytest.raises(ValueError, match="NaN or inf"):
        mpf.auto_phi_star([0.5, float("nan")])
    with pytest.raises(ValueError, match="has 1 entries but pair_entropies has 2"):
        mpf.auto_phi_star([0.5, 0.4], empty_pairs=torch.tensor([False]))


def test_bad_arguments():
    e = torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match="auto_phi_star"):
        mpf.neg_log_dispersion(e, e, 10, phi_star="auto")
    with pytest.raises(ValueError, match="phi_star must lie in"):
        mpf.neg_log_dispersion(e, e, 10, phi_star=0.0)
    with pytest.raises(ValueError, match="vocab_size must be an int >= 2"):
        mpf.neg_log_dispersion(e, e, 1)
    with pytest.raises(ValueError, match="rejected_entropy has shape \\(3,\\)"):
        mpf.neg_log_dispersion(e, torch.ones(3), 10)
    with pytest.raises(ValueError, match="chosen_entropy must have shape \\[B\\]"):
        mpf.neg_log_dispersion(torch.ones(2, 3), torch.ones(2, 3), 10)
    with pytest.raises(ValueError, match="give both chosen_num_tokens and rejected_num_tokens"):
        mpf.neg_log_dispersion(e, e, 10, chosen_num_tokens=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="chosen_num_tokens has shape \\(3,\\)"):
        mpf.neg_log_dispersion(e, e, 10, chosen_num_tokens=torch.ones(3, dtype=torch.long),
                               rejected_num_tokens=torch.ones(3, dtype=torch.long))
    with pytest.raises(TypeError, match="chosen_entropy must be a floating-point tensor"):
        mpf.neg_log_dispersion(torch.tensor([1, 2]), e, 10)
