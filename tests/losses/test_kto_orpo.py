"""KTO and ORPO against per-element implementations of their formulas (KTO paper / TRL forms)."""

import math

import pytest
import torch

import mallowspo_fast as mpf


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _kto_data(seed: int):
    gen = torch.Generator().manual_seed(seed)
    B, M = 8, 6
    pol = -(torch.rand(B, generator=gen, dtype=torch.float64) * 30 + 2)
    ref = pol + torch.randn(B, generator=gen, dtype=torch.float64) * 2
    labels = torch.tensor([True, False, True, True, False, False, True, False])
    pk = -(torch.rand(M, generator=gen, dtype=torch.float64) * 30 + 2)
    rk = pk - torch.rand(M, generator=gen, dtype=torch.float64) * 2  # policy above reference: z0 > 0
    return pol, ref, labels, pk, rk


def test_kto_matches_formula():
    pol, ref, labels, pk, rk = _kto_data(0)
    beta, lam_d, lam_u = 0.3, 1.0, 1.33
    out = mpf.kto_loss(pol, ref, labels, policy_kl_logps=pk, ref_kl_logps=rk, beta=beta,
                       desirable_weight=lam_d, undesirable_weight=lam_u)
    z0 = max(sum(a - b for a, b in zip(pk.tolist(), rk.tolist())) / len(pk), 0.0)
    assert float(out.kl) == pytest.approx(z0, rel=1e-13)
    expected = []
    for p, r, desirable in zip(pol.tolist(), ref.tolist(), labels.tolist()):
        rr = p - r
        expected.append(lam_d * (1 - _sigmoid(beta * (rr - z0))) if desirable
                        else lam_u * (1 - _sigmoid(beta * (z0 - rr))))
    torch.testing.assert_close(out.losses, torch.tensor(expected, dtype=torch.float64), atol=1e-13, rtol=1e-12)
    assert float(out.loss) == pytest.approx(sum(expected) / len(expected), rel=1e-12)
    torch.testing.assert_close(out.rewards, beta * (pol - ref), atol=1e-13, rtol=0)


def test_kto_reference_point_is_clamped_and_detached():
    pol, ref, labels, pk, rk = _kto_data(1)
    pol, pk = pol.clone().requires_grad_(True), pk.clone().requires_grad_(True)
    out = mpf.kto_loss(pol, ref, labels, policy_kl_logps=pk, ref_kl_logps=pk.detach() + 5.0)  # mean r = −5
    assert float(out.kl) == 0.0
    out.loss.backward()
    assert pk.grad is None and pol.grad is not None
    explicit = mpf.kto_loss(pol, ref, labels, kl=torch.tensor(-2.0, dtype=torch.float64))
    assert float(explicit.kl) == 0.0
    torch.testing.assert_close(explicit.losses, out.losses, atol=1e-14, rtol=0)


def test_kto_gradient_direction():
    pol, ref, labels, pk, rk = _kto_data(2)
    pol = pol.clone().requires_grad_(True)
    mpf.kto_loss(pol, ref, labels, kl=0.5).loss.backward()
    assert bool((pol.grad[labels] < 0).all()) and bool((pol.grad[~labels] > 0).all())


def test_kto_errors():
    pol, ref, labels, pk, rk = _kto_data(3)
    with pytest.raises(ValueError, match="needs policy_kl_logps and ref_kl_logps"):
        mpf.kto_loss(pol, ref, labels)
    with pytest.raises(ValueError, match="either kl or"):
        mpf.kto_loss(pol, ref, labels, kl=0.0, policy_kl_logps=pk, ref_kl_logps=rk)
    with pytest.raises(TypeError, match="labels must be a bool tensor"):
        mpf.kto_loss(pol, ref, labels.long(), kl=0.0)
    with pytest.raises(ValueError, match="labels has shape \\(3,\\)"):
        mpf.kto_loss(pol, ref, labels[:3], kl=0.0)
    with pytest.raises(ValueError, match="ref_kl_logps has shape"):
        mpf.kto_loss(pol, ref, labels, policy_kl_logps=pk, ref_kl_logps=rk[:2])
    with pytest.raises(ValueError, match="undesirable_weight must lie in"):
        mpf.kto_loss(pol, ref, labels, kl=0.0, undesirable_weight=-1.0)


def test_orpo_matches_formula():
    gen = torch.Generator().manual_seed(4)
    B = 6
    nw = torch.randint(1, 20, (B,), generator=gen)
    nl = torch.randint(1, 20, (B,), generator=gen)
    # Mean token log-probs from very likely (−1e-3) to unlikely (−6): both log1mexp regimes.
    aw = -torch.tensor([1e-3, 0.05, 0.5, 1.0, 3.0, 6.0], dtype=torch.float64)
    al = -torch.tensor([0.2, 2.0, 0.01, 4.0, 0.7, 6.5], dtype=torch.float64)
    pw, pl = aw * nw, al * nl
    lam = 0.25
    out = mpf.orpo_loss(pw, pl, nw, nl, beta=lam)
    expected, ratios = [], []
    for a, b, w, n in zip(aw.tolist(), al.tolist(), pw.tolist(), nw.tolist()):
        log_odds = (a - math.log(1 - math.exp(a))) - (b - math.log(1 - math.exp(b)))
        ratios.append(log_odds)
        expected.append(-w / n + lam * -math.log(_sigmoid(log_odds)))
    torch.testing.assert_close(out.losses, torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=1e-11)
    torch.testing.assert_close(out.log_odds_ratio, torch.tensor(ratios, dtype=torch.float64), atol=1e-12,
                               rtol=1e-11)
    torch.testing.assert_close(out.chosen_rewards, lam * aw, atol=1e-13, rtol=0)
    torch.testing.assert_close(out.nll_loss, -aw, atol=1e-13, rtol=0)


def test_orpo_finite_at_probability_one_and_explicit_nll():
    pw = torch.tensor([0.0, -3.0], requires_grad=True)
    n = torch.tensor([4, 0])  # an empty response counts as one token
    out = mpf.orpo_loss(pw, torch.tensor([-2.0, -1.0]), n, torch.tensor([2, 2]), chosen_nll=torch.tensor(1.5))
    assert bool(torch.isfinite(out.losses).all())
    out.loss.backward()
    assert bool(torch.isfinite(pw.grad).all())
    torch.testing.assert_close(out.nll_loss, torch.tensor([1.5, 1.5]))


def test_orpo_errors():
    x, n = torch.tensor([-1.0, -2.0]), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="rejected_num_tokens has shape \\(3,\\)"):
        mpf.orpo_loss(x, x, n, torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="chosen_num_tokens must be a torch.Tensor"):
        mpf.orpo_loss(x, x, None, n)
    with pytest.raises(ValueError, match="beta must lie in"):
        mpf.orpo_loss(x, x, n, n, beta=-0.1)
