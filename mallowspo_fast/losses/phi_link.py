"""The Kendall (Mallows-φ) link of MallowsPO-φ and its negative log, evaluated stably.

For 0 < φ < 1 and s > 0 the link is

    g_φ(s) = (s + 1) / (1 − φ^(s+1)) − s / (1 − φ^s),        g_φ(s) = 1 − g_φ(−s) for s < 0,

the Mallows-φ probability that an item ranked s places better is preferred (exact for integer s;
g_φ(1) = 1 / (1 + φ) = σ(−log φ)). It jumps at s = 0: g(0⁺) = 1/(1 − φ) − 1/k > ½ with k = −log φ.
This module evaluates s = 0 on the right branch, so the loss there is −log g(0⁺) (not log 2) and its
slope is finite and non-zero: training started from π_θ = π_ref (every s exactly 0) moves at once.

Evaluation. With t = |s|, u = k·t, a = e^(−u), ε = 1 − φ, the upper tail is

    q(t) = 1 − g_φ(t) = a · P(u) / (1 − aφ),    P(u) = (D/k) · r(u) + φ · (r(u) − 1),
    r(u) = u / (1 − e^(−u)),                    D = ε − φk = Σ_{n≥2} εⁿ / (n(n−1)) ≥ 0,

which is the spec's a·(t(1−φ) − φ(1−a)) / ((1−a)(1−aφ)) with the numerator split into two
non-negative parts. The raw numerator cancels catastrophically when t → 0 (0/0 at t = 0) and when
φ → 1 (its two terms agree to ~ε/2); the split form has no cancellation left except inside r(u) − 1
and D, which switch to their Taylor series near u → 0 and φ → 1. The series for r(u) − 1 is the
"series near t → 0" of the spec: at t = 0 it gives q(0) = 1/k − φ/(1−φ) and the slope
g′(0⁺) = (1 − φk/(1−φ))/(1−φ) − ½ through autograd. Then

    s ≥ 0:  −log g = −log1p(−q)
    s < 0:  −log g = −log q = u − log P(u) + log(1 − aφ)      (no exp/log round trip, no underflow)

Both branches are finite for every t ≥ 0, so ``torch.where`` between them is safe in value and
gradient; the series/direct switches feed each side a safe input so neither side produces a NaN.

Precision. The formulas above work in any float dtype and give float32 values to ~1e-7. The slope
does not: near s = 0 with φ → 1 it is ~(1−φ)/3, the difference of two terms of size ~1/(2(1−φ)),
so a float32 evaluation loses most of its digits (25% error at φ = 1 − 1e-6). The link therefore runs
in float64 whatever the input dtype (it acts on [B] tensors, so this costs nothing) and casts the
result back; only on devices without float64 (MPS) does it run in the input dtype.
"""

from __future__ import annotations

import torch

__all__ = ["PHI_MIN", "PHI_MAX", "mallows_phi_link", "mallows_phi_link_nll"]

PHI_MIN = 1e-6
PHI_MAX = 1.0 - 1e-6

# Below this u the direct r(u) − 1 = (u + expm1(−u)) / −expm1(−u) loses ~2·eps/u relative digits, so
# the Bernoulli series takes over; through u^10 its truncation error at u = 0.1 is ~1e-25.
_R_SERIES_BELOW = 0.1
# u/(1 − e^(−u)) − 1 = u/2 + u²/12 − u⁴/720 + u⁶/30240 − u⁸/1209600 + u¹⁰/47900160 − …
_R_COEFFS = (1.0 / 12.0, -1.0 / 720.0, 1.0 / 30240.0, -1.0 / 1209600.0, 1.0 / 47900160.0)
# Below this ε = 1 − φ the direct D = ε + φ·log φ cancels (D ~ ε²/2); the series Σ εⁿ/(n(n−1)) through
# n = 25 is exact to ~5e-17 relative at ε = 0.25, and above it the direct form loses < 3 bits.
_D_SERIES_BELOW = 0.25
_D_SERIES_TERMS = 25


def _r_minus_one(u: torch.Tensor) -> torch.Tensor:
    """u / (1 − e^(−u)) − 1 for u ≥ 0 (→ u/2 as u → 0), accurate to a few ulp."""
    small = u < _R_SERIES_BELOW
    u_s = torch.where(small, u, torch.zeros_like(u))
    u_d = torch.where(small, torch.full_like(u, _R_SERIES_BELOW), u)  # keeps the direct side off 0/0
    u2 = u_s * u_s
    poly = torch.zeros_like(u_s)
    for coef in reversed(_R_COEFFS[1:]):
        poly = (poly + coef) * u2
    series = u_s * (0.5 + u_s * (_R_COEFFS[0] + poly))
    direct = (u_d + torch.expm1(-u_d)) / -torch.expm1(-u_d)
    return torch.where(small, series, direct)


def _d_coefficient(phi: torch.Tensor) -> torch.Tensor:
    """D = (1 − φ) + φ·log φ ≥ 0, without the cancellation near φ → 1."""
    eps = 1.0 - phi
    small = eps < _D_SERIES_BELOW
    e_s = torch.where(small, eps, torch.zeros_like(eps))
    acc = torch.zeros_like(eps)
    for n in range(_D_SERIES_TERMS, 1, -1):
        acc = acc * e_s + 1.0 / (n * (n - 1))
    return torch.where(small, acc * e_s * e_s, eps + phi * torch.log(phi))


def _prepare(s: torch.Tensor, phi: torch.Tensor | float, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(s, torch.Tensor) or not s.is_floating_point():
        raise TypeError(f"{where}: s must be a floating-point tensor, got {type(s).__name__}"
                        + (f" of dtype {s.dtype}" if isinstance(s, torch.Tensor) else ""))
    if isinstance(phi, bool):
        raise TypeError(f"{where}: phi must be a tensor or a number in (0, 1), got a bool")
    if isinstance(phi, (int, float)):
        phi = torch.tensor(float(phi), dtype=s.dtype, device=s.device)
    if not isinstance(phi, torch.Tensor) or not phi.is_floating_point():
        raise TypeError(f"{where}: phi must be a floating-point tensor or a number, got {type(phi).__name__}")
    try:
        torch.broadcast_shapes(s.shape, phi.shape)
    except RuntimeError:
        raise ValueError(
            f"{where}: phi of shape {tuple(phi.shape)} does not broadcast with s of shape {tuple(s.shape)}"
        ) from None
    # φ is a per-example constant (it comes from the reference model): no gradient flows into it.
    work = _compute_dtype(s)
    phi = phi.detach().to(work).clamp(PHI_MIN, PHI_MAX)
    return s.to(work), phi


def _compute_dtype(s: torch.Tensor) -> torch.dtype:
    return s.dtype if s.device.type == "mps" else torch.float64


def _upper_tail(s: torch.Tensor, phi: torch.Tensor):
    """q = 1 − g_φ(|s|) and the pieces the two loss branches need."""
    k = -torch.log(phi)
    d_over_k = _d_coefficient(phi) / k
    # |s| with the right-hand slope at s = 0 (torch.abs would give a zero gradient there).
    t = torch.where(s >= 0, s, -s)
    u = k * t
    r1 = _r_minus_one(u)
    p = d_over_k * (1.0 + r1) + phi * r1
    one_minus_a_phi = -torch.expm1(-(u + k))
    q = torch.exp(-u) * p / one_minus_a_phi
    return q, u, p, one_minus_a_phi


def mallows_phi_link(s: torch.Tensor, phi: torch.Tensor | float) -> torch.Tensor:
    """The Mallows-φ (Kendall) link g_φ(s), a probability in (0, 1); s = 0 gives g(0⁺).

    Args:
        s: [...] float, the scaled margin (β·L in MallowsPO-φ).
        phi: dispersion φ(x) in (0, 1), a tensor broadcastable to ``s`` or a number; clamped to
            [PHI_MIN, PHI_MAX] and treated as a constant (detached).

    Returns:
        g_φ(s), same shape and dtype as ``s`` (after broadcasting), differentiable in ``s``.

    Raises:
        TypeError: ``s`` not a floating-point tensor, or ``phi`` neither a floating-point tensor nor a
            number (bools are refused).
        ValueError: ``phi`` that does not broadcast with ``s``.

    Examples:
        >>> mallows_phi_link(torch.tensor([1.0]), 0.5)     # 1 / (1 + φ) at s = 1: tensor([0.6667])
    """
    s_in = s
    s, phi = _prepare(s, phi, "mallows_phi_link")
    q = _upper_tail(s, phi)[0]
    return torch.where(s >= 0, 1.0 - q, q).to(s_in.dtype)


def mallows_phi_link_nll(s: torch.Tensor, phi: torch.Tensor | float) -> torch.Tensor:
    """−log g_φ(s): the per-pair MallowsPO-φ loss at s = β·L, stable in float32 and float64.

    Finite value and gradient for every finite s and φ in [PHI_MIN, PHI_MAX]; at s = 0 the value is
    −log g(0⁺) and the slope −g′(0⁺)/g(0⁺) (finite, non-zero): see the module docstring.

    Args:
        s: [...] float, the scaled margin β·L.
        phi: dispersion φ(x), tensor broadcastable to ``s`` or a number (clamped, detached).

    Returns:
        −log g_φ(s), same shape and dtype as ``s`` (after broadcasting); computed in float64.

    Raises:
        TypeError: as :func:`mallows_phi_link`.
        ValueError: as :func:`mallows_phi_link`.

    Examples:
        >>> mallows_phi_link_nll(torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.5]))  # [0.5846, 0.4055]
    """
    s_in = s
    s, phi = _prepare(s, phi, "mallows_phi_link_nll")
    q, u, p, one_minus_a_phi = _upper_tail(s, phi)
    right = -torch.log1p(-q)
    left = u - torch.log(p) + torch.log(one_minus_a_phi)
    return torch.where(s >= 0, right, left).to(s_in.dtype)
