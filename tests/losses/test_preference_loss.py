"""preference_loss: spec golden values, identities between the losses, an independent per-element
implementation of TRL's formulas, the official add-ons, rewards and argument errors."""

import math

import pytest
import torch

import mallowspo_fast as mpf

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float64, id="fp64")]
ATOL = {torch.float32: 1e-6, torch.float64: 1e-9}


def _t(values, dtype):
    return torch.tensor(values, dtype=dtype)


# ----------------------------------------------------------------------------- spec golden values
O2_CASES = [  # (policy_w, policy_l, c, eps, expected); ref −13 / −14, β = 0.1
    pytest.param(-12.0, -15.0, 1.0, 0.0, 0.5981388694, id="c=1-equals-dpo"),
    pytest.param(-12.0, -15.0, 2.5, 0.0, 0.4740769842, id="c=2.5"),
    pytest.param(-12.0, -15.0, 0.4, 0.0, 0.6539469673, id="c=0.4"),
    pytest.param(-12.0, -15.0, 2.5, 0.1, 0.5240769842, id="c=2.5-smoothing=0.1"),
    pytest.param(-15.0, -12.0, 2.5, 0.0, 1.3132616875, id="misordered-c=2.5"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pw,pl,c,eps,expected", O2_CASES)
def test_o2_mallows_theta(pw, pl, c, eps, expected, dtype):
    out = mpf.preference_loss(_t([pw], dtype), _t([pl], dtype), _t([-13.0], dtype), _t([-14.0], dtype),
                              loss_type="mallows_theta", beta=0.1, label_smoothing=eps,
                              neg_log_dispersion=_t([c], dtype))
    assert out.loss.dtype == dtype
    assert float(out.loss) == pytest.approx(expected, abs=ATOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_o2_all_equal_is_log2(dtype):
    x = _t([-12.0], dtype)
    out = mpf.preference_loss(x, x, x, x, loss_type="mallows_theta", neg_log_dispersion=_t([3.0], dtype))
    assert float(out.loss) == pytest.approx(math.log(2), abs=ATOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("a_w,expected", [(-1.0, 0.1050833198), (-1.4, 2.3050833198)], ids=["ahead", "behind"])
def test_o3_reference_free_length_normalised(a_w, expected, dtype):
    # Length-normalised values ā built from summed log-probs and token counts (4 and 2 tokens).
    n_w, n_l = torch.tensor([4]), torch.tensor([2])
    out = mpf.preference_loss(_t([a_w * 4], dtype), _t([-1.5 * 2], dtype), loss_type="mallows_theta", beta=10.0,
                              home_advantage=0.3, neg_log_dispersion=1.1, reference_free=True,
                              length_normalization=True, chosen_num_tokens=n_w, rejected_num_tokens=n_l)
    assert float(out.loss) == pytest.approx(expected, abs=ATOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_o4_mixing_alpha(dtype):
    n_w, n_l = torch.tensor([3]), torch.tensor([5])
    out = mpf.preference_loss(_t([-1.2 * 3], dtype), _t([-1.5 * 5], dtype), _t([-1.3 * 3], dtype),
                              _t([-1.4 * 5], dtype), loss_type="mallows_theta", beta=10.0, home_advantage=0.3,
                              mixing_alpha=0.25, neg_log_dispersion=_t([1.1], dtype), length_normalization=True,
                              chosen_num_tokens=n_w, rejected_num_tokens=n_l)
    assert float(out.loss) == pytest.approx(0.4554924815, abs=ATOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,c,beta,expected", [(1.0, 2.5, 0.1, 6.25), (0.3, 1.0, 2.0, 0.0025)], ids=["a", "b"])
def test_o5_mallows_ipo(L, c, beta, expected, dtype):
    # L = Δ with reference-free, zero-length-normalisation inputs: policy log-ratio = L.
    out = mpf.preference_loss(_t([-2.0 + L], dtype), _t([-2.0], dtype), _t([-5.0], dtype), _t([-5.0], dtype),
                              loss_type="mallows_ipo", beta=beta, neg_log_dispersion=_t([c], dtype))
    assert float(out.loss) == pytest.approx(expected, abs=ATOL[dtype] * 10)


# ------------------------------------------------------------------------------------- identities
def _batch(seed: int, dtype=torch.float64, B: int = 7):
    gen = torch.Generator().manual_seed(seed)
    pw = -(torch.rand(B, generator=gen, dtype=dtype) * 40 + 5)
    pl = -(torch.rand(B, generator=gen, dtype=dtype) * 40 + 5)
    rw = pw + torch.randn(B, generator=gen, dtype=dtype) * 3
    rl = pl + torch.randn(B, generator=gen, dtype=dtype) * 3
    nw = torch.randint(1, 30, (B,), generator=gen)
    nl = torch.randint(1, 30, (B,), generator=gen)
    c = torch.rand(B, generator=gen, dtype=dtype) * 3 + 0.05
    return pw, pl, rw, rl, nw, nl, c


@pytest.mark.parametrize("eps", [0.0, 0.2], ids=lambda e: f"smoothing={e}")
def test_mallows_theta_with_unit_dispersion_is_sigmoid(eps):
    pw, pl, rw, rl, nw, nl, _ = _batch(1)
    kw = dict(beta=0.3, label_smoothing=eps)
    theta = mpf.preference_loss(pw, pl, rw, rl, loss_type="mallows_theta", neg_log_dispersion=torch.ones(7), **kw)
    dpo = mpf.preference_loss(pw, pl, rw, rl, loss_type="sigmoid", **kw)
    torch.testing.assert_close(theta.losses, dpo.losses, atol=1e-14, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mallows_phi_at_s_one_is_mallows_theta(dtype):
    # β·L = 1 for every pair: g_φ(1) = σ(−log φ) = σ(c), which is mallows_theta at the same c.
    beta = 0.25
    pl, rw, rl = _t([-10.0, -3.0, -7.5], dtype), _t([-9.0, -4.0, -7.0], dtype), _t([-8.0, -5.0, -7.0], dtype)
    pw = pl + (rw - rl) + 1.0 / beta
    c = _t([0.05, 1.0, 6.0], dtype)
    phi = mpf.preference_loss(pw, pl, rw, rl, loss_type="mallows_phi", beta=beta, neg_log_dispersion=c)
    theta = mpf.preference_loss(pw, pl, rw, rl, loss_type="mallows_theta", beta=beta, neg_log_dispersion=c)
    torch.testing.assert_close(phi.losses, theta.losses, atol=ATOL[dtype], rtol=0)


def test_mallows_phi_at_initialisation_has_the_right_limit_and_a_gradient():
    pw = torch.tensor([-20.0, -7.0], dtype=torch.float64, requires_grad=True)
    pl = torch.tensor([-21.0, -9.0], dtype=torch.float64)
    c = torch.tensor([0.3, 2.0], dtype=torch.float64)
    out = mpf.preference_loss(pw, pl, pw.detach(), pl, loss_type="mallows_phi", neg_log_dispersion=c)
    phi = torch.exp(-c)
    g0 = 1 / (1 - phi) + 1 / torch.log(phi)
    torch.testing.assert_close(out.losses, -torch.log(g0), atol=1e-12, rtol=0)
    out.loss.backward()
    assert bool(torch.isfinite(pw.grad).all()) and bool((pw.grad < 0).all())


@pytest.mark.parametrize("loss_type", ["sigmoid", "mallows_theta", "mallows_phi", "mallows_ipo", "ipo", "hinge",
                                       "robust", "simpo"])
def test_gradient_pushes_toward_the_chosen_response(loss_type):
    pw, pl, rw, rl, nw, nl, c = _batch(3, B=5)
    pw = pw.clone().requires_grad_(True)
    pl = pl.clone().requires_grad_(True)
    # Start from π = ρ so that every loss (hinge included) is active.
    out = mpf.preference_loss(pw, pl, pw.detach(), pl.detach(), loss_type=loss_type, beta=0.2,
                              neg_log_dispersion=c, chosen_num_tokens=nw, rejected_num_tokens=nl,
                              label_smoothing=0.1 if loss_type == "robust" else 0.0)
    out.loss.backward()
    assert bool((pw.grad < 0).all()) and bool((pl.grad > 0).all())


def test_dispersion_and_reference_get_no_gradient():
    pw, pl, rw, rl, nw, nl, c = _batch(4)
    rw, c = rw.clone().requires_grad_(True), c.clone().requires_grad_(True)
    out = mpf.preference_loss(pw.requires_grad_(True), pl, rw, rl, loss_type="mallows_theta", neg_log_dispersion=c)
    out.loss.backward()
    assert rw.grad is None and c.grad is None and pw.grad is not None


# ------------------------------------------------------- an independent implementation of TRL's formulas
def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _trl_reference(loss_type, pw, pl, rw, rl, nw, nl, beta, eps, gamma):
    """Per-pair losses of TRL's DPOTrainer / CPOTrainer, element by element in Python floats."""
    out = []
    for i in range(len(pw)):
        if loss_type in ("ipo", "simpo"):  # TRL length-normalises these
            a, b, ra, rb = pw[i] / nw[i], pl[i] / nl[i], rw[i] / nw[i], rl[i] / nl[i]
        else:
            a, b, ra, rb = pw[i], pl[i], rw[i], rl[i]
        logits = (a - b) - (ra - rb)
        if loss_type == "sigmoid":
            v = -math.log(1 / (1 + math.exp(-beta * logits))) * (1 - eps) \
                - math.log(1 / (1 + math.exp(beta * logits))) * eps
        elif loss_type == "robust":
            v = (-math.log(1 / (1 + math.exp(-beta * logits))) * (1 - eps)
                 + math.log(1 / (1 + math.exp(beta * logits))) * eps) / (1 - 2 * eps)
        elif loss_type == "hinge":
            v = max(0.0, 1 - beta * logits)
        elif loss_type == "ipo":
            v = (logits - 1 / (2 * beta)) ** 2
        elif loss_type == "simpo":
            z = beta * ((a - b) - gamma / beta)
            v = -math.log(1 / (1 + math.exp(-z))) * (1 - eps) - math.log(1 / (1 + math.exp(z))) * eps
        out.append(v)
    return out


@pytest.mark.parametrize("eps", [0.0, 0.15], ids=lambda e: f"smoothing={e}")
@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "hinge", "ipo", "simpo"])
def test_dpo_family_matches_trl_formulas(loss_type, eps):
    pw, pl, rw, rl, nw, nl, _ = _batch(11, B=9)
    beta, gamma = 0.37, 0.8
    out = mpf.preference_loss(pw, pl, rw, rl, loss_type=loss_type, beta=beta, label_smoothing=eps,
                              chosen_num_tokens=nw, rejected_num_tokens=nl, simpo_gamma=gamma)
    expected = _trl_reference(loss_type, pw.tolist(), pl.tolist(), rw.tolist(), rl.tolist(), nw.tolist(),
                              nl.tolist(), beta, eps if loss_type != "ipo" else 0.0, gamma)
    torch.testing.assert_close(out.losses, torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=1e-12)
    assert float(out.loss) == pytest.approx(sum(expected) / len(expected), rel=1e-12)


def test_mallows_losses_match_formulas():
    pw, pl, rw, rl, nw, nl, c = _batch(12)
    beta, gamma, alpha = 2.0, 0.1, 0.6
    kw = dict(beta=beta, neg_log_dispersion=c, home_advantage=gamma, mixing_alpha=alpha,
              length_normalization=True, chosen_num_tokens=nw, rejected_num_tokens=nl)
    theta = mpf.preference_loss(pw, pl, rw, rl, loss_type="mallows_theta", **kw).losses
    ipo = mpf.preference_loss(pw, pl, rw, rl, loss_type="mallows_ipo", **kw).losses
    for i in range(len(pw)):
        L = (pw[i] / nw[i] - pl[i] / nl[i]) - alpha * (rw[i] / nw[i] - rl[i] / nl[i]) - (1 - alpha) * gamma
        assert float(theta[i]) == pytest.approx(_softplus(-beta * float(c[i]) * float(L)), rel=1e-12)
        assert float(ipo[i]) == pytest.approx((float(c[i]) * float(L) - 1 / (2 * beta)) ** 2, rel=1e-12)


def test_home_advantage_without_mixing_is_subtracted_whole():
    pw, pl, rw, rl, *_ = _batch(13)
    with_gamma = mpf.preference_loss(pw, pl, rw, rl, beta=0.5, home_advantage=0.7).losses
    shifted = mpf.preference_loss(pw - 0.7, pl, rw, rl, beta=0.5).losses
    torch.testing.assert_close(with_gamma, shifted, atol=1e-13, rtol=0)


def test_loss_list_is_the_weighted_sum():
    pw, pl, rw, rl, nw, nl, c = _batch(5)
    kw = dict(beta=0.2, neg_log_dispersion=c, chosen_num_tokens=nw, rejected_num_tokens=nl)
    mixed = mpf.preference_loss(pw, pl, rw, rl, loss_type=["sigmoid", "mallows_phi", "ipo"],
                                loss_weights=[0.5, 2.0, 0.1], **kw)
    parts = [mpf.preference_loss(pw, pl, rw, rl, loss_type=t, **kw).losses for t in ("sigmoid", "mallows_phi", "ipo")]
    torch.testing.assert_close(mixed.losses, 0.5 * parts[0] + 2.0 * parts[1] + 0.1 * parts[2], atol=1e-12, rtol=0)
    unweighted = mpf.preference_loss(pw, pl, rw, rl, loss_type=["sigmoid", "hinge"], **kw).losses
    hinge = mpf.preference_loss(pw, pl, rw, rl, loss_type="hinge", **kw).losses
    torch.testing.assert_close(unweighted, parts[0] + hinge, atol=1e-12, rtol=0)


# -------------------------------------------------------------------------------- add-ons, rewards
def test_sft_and_rpo_add_ons():
    pw, pl, rw, rl, nw, nl, _ = _batch(6)
    base = mpf.preference_loss(pw, pl, rw, rl, beta=0.1).losses
    nll = -pw / nw
    sft = mpf.preference_loss(pw, pl, rw, rl, beta=0.1, add_sft_loss=True, sft_coef=0.3, chosen_num_tokens=nw,
                              rejected_num_tokens=nl)
    torch.testing.assert_close(sft.losses, base + 0.3 * nll, atol=1e-12, rtol=0)
    torch.testing.assert_close(sft.nll_loss, nll, atol=1e-12, rtol=0)
    rpo = mpf.preference_loss(pw, pl, rw, rl, beta=0.1, rpo_alpha=0.4, chosen_num_tokens=nw, rejected_num_tokens=nl)
    torch.testing.assert_close(rpo.losses, 0.4 * base + nll, atol=1e-12, rtol=0)
    # Both, in the official order (SFT inside, then RPO), with the batch token-mean NLL of TRL.
    token_mean = -pw.sum() / nw.sum()
    both = mpf.preference_loss(pw, pl, rw, rl, beta=0.1, add_sft_loss=True, sft_coef=0.3, rpo_alpha=0.4,
                               chosen_nll=token_mean)
    torch.testing.assert_close(both.losses, 0.4 * (base + 0.3 * token_mean) + token_mean, atol=1e-12, rtol=0)
    assert mpf.preference_loss(pw, pl, rw, rl).nll_loss is None


def test_rewards_are_beta_log_ratios_not_scaled_by_dispersion():
    pw, pl, rw, rl, nw, nl, c = _batch(8)
    out = mpf.preference_loss(pw.requires_grad_(True), pl, rw, rl, loss_type="mallows_theta", beta=0.3,
                              neg_log_dispersion=c)
    torch.testing.assert_close(out.chosen_rewards, 0.3 * (pw.detach() - rw), atol=1e-13, rtol=0)
    torch.testing.assert_close(out.rejected_rewards, 0.3 * (pl - rl), atol=1e-13, rtol=0)
    assert not out.chosen_rewards.requires_grad
    ln = mpf.preference_loss(pw, pl, rw, rl, loss_type="ipo", beta=0.3, chosen_num_tokens=nw, rejected_num_tokens=nl)
    torch.testing.assert_close(ln.chosen_rewards, 0.3 * (pw.detach() - rw) / nw, atol=1e-13, rtol=0)
    simpo = mpf.preference_loss(pw, pl, loss_type="simpo", beta=0.3, chosen_num_tokens=nw, rejected_num_tokens=nl)
    torch.testing.assert_close(simpo.rejected_rewards, 0.3 * pl / nl, atol=1e-13, rtol=0)
    free = mpf.preference_loss(pw, pl, rw, rl, beta=0.3, reference_free=True)
    torch.testing.assert_close(free.chosen_rewards, 0.3 * pw.detach(), atol=1e-13, rtol=0)


def test_policy_equal_reference_gives_log2_and_zero_accuracy():
    pw, pl, *_ = _batch(9, dtype=torch.float32)
    out = mpf.preference_loss(pw, pl, pw, pl, beta=0.1)
    assert float(out.loss) == pytest.approx(math.log(2), abs=1e-6)
    metrics = mpf.preference_metrics(out.chosen_rewards, out.rejected_rewards, pw, pl)
    assert float(metrics["rewards/accuracies"]) == 0.0


# --------------------------------------------------------------------------------------- errors
def test_errors_name_the_argument():
    pw, pl, rw, rl, nw, nl, c = _batch(10)
    with pytest.raises(ValueError, match="unknown loss_type 'dpo'"):
        mpf.preference_loss(pw, pl, rw, rl, loss_type="dpo")
    with pytest.raises(ValueError, match="unknown loss_type 'kto'"):
        mpf.preference_loss(pw, pl, rw, rl, loss_type=["sigmoid", "kto"])
    with pytest.raises(ValueError, match="ref_chosen_logps is required"):
        mpf.preference_loss(pw, pl, loss_type="sigmoid")
    with pytest.raises(ValueError, match="ref_rejected_logps is required"):
        mpf.preference_loss(pw, pl, rw, loss_type="sigmoid")
    with pytest.raises(ValueError, match="neg_log_dispersion is required"):
        mpf.preference_loss(pw, pl, rw, rl, loss_type="mallows_phi")
    with pytest.raises(ValueError, match="policy_rejected_logps has shape \\(3,\\)"):
        mpf.preference_loss(pw, pl[:3], rw, rl)
    with pytest.raises(ValueError, match="ref_rejected_logps has shape \\(6,\\)"):
        mpf.preference_loss(pw, pl, rw, rl[:6])
    with pytest.raises(ValueError, match="neg_log_dispersion must have shape \\(7,\\)"):
        mpf.preference_loss(pw, pl, rw, rl, loss_type="mallows_theta", neg_log_dispersion=c[:2])
    with pytest.raises(ValueError, match="chosen_num_tokens is required"):
        mpf.preference_loss(pw, pl, rw, rl, loss_type="ipo")
    with pytest.raises(ValueError, match="chosen_num_tokens is required"):
        mpf.preference_loss(pw, pl, rw, rl, add_sft_loss=True)
    with pytest.raises(ValueError, match="label_smoothing must lie in \\[0.0, 0.5\\)"):
        mpf.preference_loss(pw, pl, rw, rl, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="loss_weights must give one weight per loss type \\(2\\)"):
        mpf.preference_loss(pw, pl, rw, rl, loss_type=["sigmoid", "hinge"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="beta must lie in"):
        mpf.preference_loss(pw, pl, rw, rl, beta=0.0)
    with pytest.raises(ValueError, match="mixing_alpha must lie in"):
        mpf.preference_loss(pw, pl, rw, rl, mixing_alpha=1.5)
    with pytest.raises(ValueError, match="repeated entry"):
        mpf.preference_loss(pw, pl, rw, rl, loss_type=["sigmoid", "sigmoid"])
    with pytest.raises(TypeError, match="policy_chosen_logps must be a torch.Tensor"):
        mpf.preference_loss([1.0], pl, rw, rl)
    with pytest.raises(ValueError, match="policy_chosen_logps must have shape \\[B\\]"):
        mpf.preference_loss(pw.view(7, 1), pl.view(7, 1), rw, rl)
    # Reference-free losses need no reference at all.
    mpf.preference_loss(pw, pl, loss_type="simpo", chosen_num_tokens=nw, rejected_num_tokens=nl)
    mpf.preference_loss(pw, pl, loss_type="mallows_theta", reference_free=True, neg_log_dispersion=c)
