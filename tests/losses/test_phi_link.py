"""The Kendall (Mallows-φ) link: golden values, high-precision agreement, stability, gradients."""

import math

import mpmath
import pytest
import torch

import mallowspo_fast as mpf

TOL = {torch.float32: dict(atol=1e-6, rtol=2e-6), torch.float64: dict(atol=1e-12, rtol=1e-12)}
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float64, id="fp64")]

# Spec §5, O6: g_φ(s) for φ = 0.2, 0.5, 0.8.
GOLDEN_G = {
    -1.0: (0.1666666667, 0.3333333333, 0.4444444444),
    0.1: (0.6530536927, 0.5686468072, 0.5222917951),
    1.0: (0.8333333333, 0.6666666667, 0.5555555556),
    2.0: (0.9408602151, 0.7619047619, 0.5919854281),
    5.0: (0.9987835124, 0.9339477727, 0.6947331748),
}
GOLDEN_G0 = {0.2: 0.6286650654, 0.5: 0.5573049591, 0.8: 0.5185798823}


def _mp_g(s: float, phi: float) -> mpmath.mpf:
    """g_φ(s) straight from the definition, at a precision that survives its cancellations."""
    s, phi = mpmath.mpf(s), mpmath.mpf(phi)
    k = -mpmath.log(phi)
    if s == 0:
        return 1 / (1 - phi) - 1 / k  # the right-hand limit g(0⁺)
    t = abs(s)
    g = (t + 1) / (1 - phi ** (t + 1)) - t / (1 - phi**t)
    return g if s > 0 else 1 - g


def _mp_nll(s: float, phi: float) -> float:
    # 1 − g(50) at φ = 1e-6 is ~1e-300: the definition needs ~330 digits to resolve it.
    with mpmath.workdps(360):
        return float(-mpmath.log(_mp_g(s, phi)))


def _mp_dnll(s: float, phi: float) -> float:
    with mpmath.workdps(360):
        return float(mpmath.diff(lambda x: -mpmath.log(_mp_g(x, phi)), mpmath.mpf(s)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("s", sorted(GOLDEN_G), ids=lambda s: f"s={s}")
def test_golden_link_values(s, dtype):
    phi = torch.tensor([0.2, 0.5, 0.8], dtype=dtype)
    g = mpf.mallows_phi_link(torch.full((3,), s, dtype=dtype), phi)
    torch.testing.assert_close(g, torch.tensor(GOLDEN_G[s], dtype=dtype), atol=1e-6 if dtype == torch.float32
                               else 1e-10, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_golden_value_at_zero_is_right_limit(dtype):
    phi = torch.tensor(list(GOLDEN_G0), dtype=dtype)
    g = mpf.mallows_phi_link(torch.zeros(3, dtype=dtype), phi)
    expected = torch.tensor(list(GOLDEN_G0.values()), dtype=dtype)
    torch.testing.assert_close(g, expected, atol=1e-6 if dtype == torch.float32 else 1e-10, rtol=0)
    # The documented s = 0 decision: the loss is −log g(0⁺), strictly below log 2.
    nll = mpf.mallows_phi_link_nll(torch.zeros(3, dtype=dtype), phi)
    torch.testing.assert_close(nll, -torch.log(expected), atol=2e-6 if dtype == torch.float32 else 1e-10, rtol=0)
    assert bool((nll < math.log(2)).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_golden_precision_near_one(dtype):
    # The naive formula gives 0.467 here; the spec's value is 0.4999166250.
    g = mpf.mallows_phi_link(torch.tensor([1e-9], dtype=dtype), torch.tensor([0.999], dtype=dtype))
    torch.testing.assert_close(1 - g, torch.tensor([0.4999166250], dtype=dtype),
                               atol=1e-6 if dtype == torch.float32 else 1e-10, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_integer_s_is_kendall_probability_and_one_is_sigmoid(dtype):
    phi = torch.tensor([1e-6, 0.01, 0.3, 0.7, 0.99, 1 - 1e-6], dtype=dtype)
    g1 = mpf.mallows_phi_link(torch.ones_like(phi), phi)
    torch.testing.assert_close(g1, 1 / (1 + phi), **TOL[dtype])
    torch.testing.assert_close(g1, torch.sigmoid(-torch.log(phi)), **TOL[dtype])
    s = torch.tensor([0.3, 1.7, 4.0, 33.0], dtype=dtype)
    for p in (0.1, 0.6, 0.95):
        torch.testing.assert_close(mpf.mallows_phi_link(-s, p), 1 - mpf.mallows_phi_link(s, p), **TOL[dtype])


S_GRID = sorted({*[float(x) for x in torch.linspace(-50, 50, 41).tolist()],
                 *[sgn * m for sgn in (-1, 1) for m in (1e-9, 1e-5, 0.01, 0.099, 0.101, 0.3, 0.75)], 0.0})
PHI_GRID = [1e-6, 1e-3, 0.05, 0.2, 0.5, 0.8, 0.95, 0.999, 1 - 1e-6]


@pytest.fixture(scope="module")
def mp_grid():
    """High-precision −log g on the grid, at the float64 inputs."""
    return {(s, p): _mp_nll(s, p) for s in S_GRID for p in PHI_GRID}


def _grid_tensors(dtype):
    s = torch.tensor([s for s in S_GRID for _ in PHI_GRID], dtype=dtype)
    phi = torch.tensor([p for _ in S_GRID for p in PHI_GRID], dtype=dtype)
    return s, phi


def test_agrees_with_mpmath_fp64(mp_grid):
    s, phi = _grid_tensors(torch.float64)
    got = mpf.mallows_phi_link_nll(s, phi)
    expected = torch.tensor([mp_grid[(a, b)] for a in S_GRID for b in PHI_GRID], dtype=torch.float64)
    torch.testing.assert_close(got, expected, atol=1e-13, rtol=1e-11)


def test_agrees_with_mpmath_fp32():
    # Compare against the exact value at the float32-rounded inputs (φ = 1 − 1e-6 is not representable).
    s, phi = _grid_tensors(torch.float32)
    got = mpf.mallows_phi_link_nll(s, phi)
    expected = torch.tensor([_mp_nll(float(a), float(b)) for a, b in zip(s.tolist(), phi.tolist())],
                            dtype=torch.float64)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=2e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_finite_value_and_gradient_over_the_grid(dtype):
    s, phi = _grid_tensors(dtype)
    s.requires_grad_(True)
    nll = mpf.mallows_phi_link_nll(s, phi)
    (grad,) = torch.autograd.grad(nll, s, torch.randn_like(nll))
    assert bool(torch.isfinite(nll).all()) and bool(torch.isfinite(grad).all())
    assert bool((nll >= 0).all())
    # −log g is decreasing in s (g is increasing); the positive tail may flush to 0 in float32.
    (slope,) = torch.autograd.grad(mpf.mallows_phi_link_nll(s, phi).sum(), s)
    assert bool((slope <= 0).all())


def test_gradient_matches_mpmath_fp64():
    pts = [(s, p) for s in (-20.0, -1.3, -0.05, -1e-6, 1e-6, 0.05, 0.7, 3.0, 20.0) for p in (1e-4, 0.3, 0.9, 0.9999)]
    s = torch.tensor([a for a, _ in pts], dtype=torch.float64, requires_grad=True)
    phi = torch.tensor([b for _, b in pts], dtype=torch.float64)
    (grad,) = torch.autograd.grad(mpf.mallows_phi_link_nll(s, phi).sum(), s)
    expected = torch.tensor([_mp_dnll(a, b) for a, b in pts], dtype=torch.float64)
    torch.testing.assert_close(grad, expected, atol=1e-12, rtol=1e-8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("phi", [1e-6, 0.2, 0.5, 0.8, 0.999, 1 - 1e-6], ids=lambda p: f"phi={p:g}")
def test_gradient_at_zero_is_right_slope(phi, dtype):
    s = torch.zeros(1, dtype=dtype, requires_grad=True)
    (grad,) = torch.autograd.grad(mpf.mallows_phi_link_nll(s, phi).sum(), s)
    assert bool(torch.isfinite(grad).all()) and float(grad) < 0.0
    p = float(torch.tensor(phi, dtype=dtype))
    with mpmath.workdps(60):
        pm = mpmath.mpf(p)
        k = -mpmath.log(pm)
        g0 = 1 / (1 - pm) - 1 / k
        dg0 = (1 - pm * k / (1 - pm)) / (1 - pm) - mpmath.mpf(1) / 2  # spec §4, g′(0⁺)
        expected = float(-dg0 / g0)
    assert float(grad) == pytest.approx(expected, rel=1e-5 if dtype == torch.float32 else 1e-9)


def test_spec_slope_formula_matches_one_sided_derivative():
    # Forward difference at high precision: (g(h) − g(0⁺)) / h = g′(0⁺) + O(h).
    for p in (0.2, 0.5, 0.8):
        with mpmath.workdps(80):
            pm = mpmath.mpf(p)
            k = -mpmath.log(pm)
            formula = (1 - pm * k / (1 - pm)) / (1 - pm) - mpmath.mpf(1) / 2
            h = mpmath.mpf("1e-30")
            numeric = (_mp_g(h, p) - _mp_g(0, p)) / h
        assert float(formula) == pytest.approx(float(numeric), rel=1e-12)


@pytest.mark.parametrize("phi", [1e-5, 0.3, 0.97, 1 - 1e-5], ids=lambda p: f"phi={p:g}")
def test_gradcheck_fp64(phi):
    gen = torch.Generator().manual_seed(0)
    # Both signs, magnitudes across the series/direct switch at u = 0.1, away from the jump at 0.
    mag = torch.cat([torch.rand(6, generator=gen, dtype=torch.float64) * 0.2 + 1e-3,
                     torch.rand(6, generator=gen, dtype=torch.float64) * 40 + 0.5])
    s = (mag * torch.tensor([1.0, -1.0] * 6, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: mpf.mallows_phi_link_nll(x, phi), (s,), eps=1e-7, atol=1e-8)
    assert torch.autograd.gradgradcheck(lambda x: mpf.mallows_phi_link_nll(x, phi), (s,), eps=1e-6, atol=1e-6)


def test_phi_outside_unit_interval_is_clamped():
    s = torch.tensor([-2.0, 0.0, 2.0], dtype=torch.float64)
    for bad, edge in ((0.0, mpf.losses.phi_link.PHI_MIN), (1.0, mpf.losses.phi_link.PHI_MAX)):
        torch.testing.assert_close(mpf.mallows_phi_link_nll(s, bad), mpf.mallows_phi_link_nll(s, edge))


def test_phi_is_a_constant():
    phi = torch.tensor([0.4, 0.6], requires_grad=True)
    out = mpf.mallows_phi_link_nll(torch.tensor([0.5, -0.5], requires_grad=True), phi)
    out.sum().backward()
    assert phi.grad is None


def test_bad_inputs():
    with pytest.raises(TypeError, match="s must be a floating-point tensor"):
        mpf.mallows_phi_link_nll(torch.tensor([1, 2]), 0.5)
    with pytest.raises(ValueError, match="does not broadcast"):
        mpf.mallows_phi_link_nll(torch.zeros(3), torch.full((2,), 0.5))
    with pytest.raises(TypeError, match="phi"):
        mpf.mallows_phi_link(torch.zeros(3), "0.5")


def test_float32_arithmetic_fallback(monkeypatch):
    """Devices without float64 (MPS) run the same formulas in float32: values stay accurate, the
    gradient stays finite and of the right sign everywhere (its digits fade only as φ → 1)."""
    from mallowspo_fast.losses import phi_link

    monkeypatch.setattr(phi_link, "_compute_dtype", lambda s: s.dtype)
    s, phi = _grid_tensors(torch.float32)
    s.requires_grad_(True)
    got = mpf.mallows_phi_link_nll(s, phi)
    expected = torch.tensor([_mp_nll(float(a), float(b)) for a, b in zip(s.tolist(), phi.tolist())],
                            dtype=torch.float64)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=2e-6)
    (grad,) = torch.autograd.grad(got.sum(), s)
    assert bool(torch.isfinite(grad).all()) and bool((grad <= 0).all())
    zero = torch.zeros(len(PHI_GRID), requires_grad=True)
    (g0,) = torch.autograd.grad(mpf.mallows_phi_link_nll(zero, torch.tensor(PHI_GRID)).sum(), zero)
    assert bool((g0 < 0).all())
    moderate = torch.tensor(PHI_GRID) <= 0.95
    with monkeypatch.context() as m:
        m.setattr(phi_link, "_compute_dtype", lambda s: torch.float64)
        zero64 = torch.zeros(len(PHI_GRID), requires_grad=True)
        (g64,) = torch.autograd.grad(mpf.mallows_phi_link_nll(zero64, torch.tensor(PHI_GRID)).sum(), zero64)
    torch.testing.assert_close(g0[moderate], g64[moderate], rtol=1e-4, atol=0)
