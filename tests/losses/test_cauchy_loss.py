"""The ``cauchy`` preference loss −log(atan(β·L)/π + ½) (official MallowsPO code): float64 reference at
high precision, per-dtype tolerances, odd batch sizes, gradients (gradcheck and the closed form), the
extremes where the official expression breaks, and its place among the loss types."""

import math

import mpmath
import pytest
import torch

import mallowspo_fast as mpf
from mallowspo_fast.losses.preference import _cauchy_nll

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float64, id="fp64")]
RTOL = {torch.float32: 2e-6, torch.float64: 1e-13}
# Both signs, both branches, 0, and magnitudes where the naive float32 formula is wrong or infinite.
ZS = [-1e30, -1e8, -1e6, -1234.5, -37.0, -1.0, -0.3, -1e-7, 0.0, 1e-7, 0.25, 1.0, 3.5, 80.0, 1e4, 1e8, 1e30]

mpmath.mp.dps = 60


def _ref(z: float) -> float:
    """−log(atan(z)/π + ½) at 60 digits."""
    z = mpmath.mpf(z)
    return float(-mpmath.log(mpmath.atan(z) / mpmath.pi + mpmath.mpf(1) / 2))


def _ref_grad(z: float) -> float:
    """d/dz −log F(z) = −f(z)/F(z), f the Cauchy density 1/(π(1 + z²))."""
    z = mpmath.mpf(z)
    f = 1 / (mpmath.pi * (1 + z * z))
    return float(-f / (mpmath.atan(z) / mpmath.pi + mpmath.mpf(1) / 2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_values_match_the_high_precision_reference(dtype):
    z = torch.tensor(ZS, dtype=dtype)
    got = _cauchy_nll(z)
    assert got.dtype == dtype
    want = torch.tensor([_ref(float(v)) for v in z.double()], dtype=torch.float64)  # at the rounded inputs
    torch.testing.assert_close(got.double(), want, rtol=RTOL[dtype], atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_matches_the_closed_form_everywhere(dtype):
    z = torch.tensor(ZS, dtype=dtype, requires_grad=True)
    _cauchy_nll(z).sum().backward()
    assert bool(torch.isfinite(z.grad).all())
    want = torch.tensor([_ref_grad(float(v)) for v in z.detach().double()], dtype=torch.float64)
    # At |z| = 1e30 the true slopes are ~1e-30 and ~1e-61; in float32 atan2's backward squares z (overflow),
    # so they flush to 0 there: an absolute tolerance far below any slope that can move a parameter.
    atol = 1e-18 if dtype == torch.float32 else 0.0
    torch.testing.assert_close(z.grad.double(), want, rtol=RTOL[dtype] * 10, atol=atol)


def test_gradcheck_across_both_branches():
    z = torch.tensor([-50.0, -2.0, -0.5, -1e-3, 0.0, 1e-3, 0.7, 3.0, 40.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_cauchy_nll, (z,), eps=1e-6, atol=1e-9, rtol=1e-7)
    assert torch.autograd.gradgradcheck(_cauchy_nll, (z,), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_official_expression_agrees_where_it_is_accurate():
    z = torch.linspace(-100, 100, 2001, dtype=torch.float64)
    official = -(z.atan() / math.pi + 0.5).log()
    torch.testing.assert_close(_cauchy_nll(z), official, rtol=1e-11, atol=0)


def test_official_float32_expression_breaks_where_ours_does_not():
    z = torch.tensor([-1e8, 1e8], dtype=torch.float32)
    official = -(z.atan() / math.pi + 0.5).log()
    assert math.isinf(float(official[0])) and float(official[1]) == 0.0
    ours = _cauchy_nll(z)
    assert float(ours[0]) == pytest.approx(math.log(math.pi * 1e8), rel=1e-6)
    assert float(ours[1]) == pytest.approx(1 / (math.pi * 1e8), rel=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 7, 13])
def test_preference_loss_is_the_link_of_beta_times_the_margin(B, dtype):
    gen = torch.Generator().manual_seed(B)
    pw, pl, rw, rl = (-(torch.rand(B, generator=gen, dtype=torch.float64) * 60 + 1) for _ in range(4))
    beta = 0.37
    out = mpf.preference_loss(pw.to(dtype), pl.to(dtype), rw.to(dtype), rl.to(dtype), loss_type="cauchy",
                              beta=beta)
    margins = (pw.to(dtype) - pl.to(dtype) - (rw.to(dtype) - rl.to(dtype))).double()
    want = torch.tensor([_ref(beta * float(m)) for m in margins], dtype=torch.float64)
    assert out.losses.shape == (B,) and out.loss.dtype == dtype
    # float32 rounds β·L and the margin's summands: 1e-6 absolute as for the spec's golden values.
    atol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out.losses.double(), want, rtol=0, atol=atol)
    torch.testing.assert_close(out.loss.double(), want.mean(), rtol=0, atol=atol)
    torch.testing.assert_close(out.chosen_rewards, beta * (pw.to(dtype) - rw.to(dtype)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_at_initialisation_loss_is_log2_and_the_gradient_is_two_over_pi(dtype):
    pw = torch.tensor([-20.0, -7.0, -3.0], dtype=dtype, requires_grad=True)
    pl = torch.tensor([-21.0, -9.0, -2.0], dtype=dtype, requires_grad=True)
    beta = 0.1
    out = mpf.preference_loss(pw, pl, pw.detach(), pl.detach(), loss_type="cauchy", beta=beta)
    torch.testing.assert_close(out.losses, torch.full_like(out.losses, math.log(2)), rtol=0, atol=1e-7)
    out.loss.backward()
    # d/dz −log F at 0 is −f(0)/F(0) = −2/π; the batch mean divides by B = 3.
    want = torch.full_like(pw, -2 / math.pi * beta / 3)
    torch.testing.assert_close(pw.grad, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(pl.grad, -want, rtol=1e-6, atol=0)


def test_loss_decreases_with_the_margin_and_tails_are_heavy():
    z = torch.linspace(-30, 30, 601, dtype=torch.float64)
    loss = _cauchy_nll(z)
    assert bool((loss.diff() < 0).all())
    # A badly mis-ordered pair costs ~log(π|z|), far less than the sigmoid's ~|z|: bounded influence.
    sigmoid = torch.nn.functional.softplus(-z)
    assert float(loss[0]) < 0.2 * float(sigmoid[0])


def test_label_smoothing_and_dispersion_do_not_enter():
    gen = torch.Generator().manual_seed(3)
    pw, pl, rw, rl = (-(torch.rand(5, generator=gen, dtype=torch.float64) * 30) for _ in range(4))
    plain = mpf.preference_loss(pw, pl, rw, rl, loss_type="cauchy", beta=0.5).losses
    other = mpf.preference_loss(pw, pl, rw, rl, loss_type="cauchy", beta=0.5, label_smoothing=0.3,
                                neg_log_dispersion=torch.full((5,), 2.0, dtype=torch.float64)).losses
    torch.testing.assert_close(plain, other, rtol=0, atol=0)


def test_in_a_list_of_losses_it_adds_with_its_weight():
    gen = torch.Generator().manual_seed(4)
    pw, pl, rw, rl = (-(torch.rand(6, generator=gen, dtype=torch.float64) * 30) for _ in range(4))
    both = mpf.preference_loss(pw, pl, rw, rl, loss_type=["sigmoid", "cauchy"], loss_weights=[1.0, 0.25],
                               beta=0.2).losses
    dpo = mpf.preference_loss(pw, pl, rw, rl, loss_type="sigmoid", beta=0.2).losses
    cauchy = mpf.preference_loss(pw, pl, rw, rl, loss_type="cauchy", beta=0.2).losses
    torch.testing.assert_close(both, dpo + 0.25 * cauchy, rtol=0, atol=1e-14)


def test_it_is_a_loss_type_and_needs_the_reference():
    assert "cauchy" in mpf.LOSS_TYPES
    x = torch.tensor([-1.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="ref_chosen_logps is required"):
        mpf.preference_loss(x, x, loss_type="cauchy")
    out = mpf.preference_loss(x, x - 1, loss_type="cauchy", reference_free=True, beta=1.0)
    assert float(out.loss) == pytest.approx(_ref(1.0), abs=1e-14)
