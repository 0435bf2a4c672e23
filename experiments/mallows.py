"""The Mallows model under Kendall's distance: sampling, exact probabilities and entropies.

P(σ) ∝ φ^{d_K(σ, σ₀)} over rankings of n items, φ ∈ (0, 1], central ranking σ₀ = (0, 1, ..., n−1)
(item 0 is the best). Kendall's distance splits into independent sequential choices: fill the ranking
top-down; when m items remain (listed in central order), choosing the j-th of them (j = 0..m−1) adds j
discordant pairs, so the choice index J_m has the truncated geometric law P(J_m = j) = φ^j / Z_m with
Z_m = Σ_{j<m} φ^j, independently across steps. This is the repeated-insertion model read top-down: it
samples exactly, and the ranking is a bijection of the choice sequence, so the Mallows entropy is
H(σ) = Σ_{m=1..n} H(J_m), which is log n! at φ = 1 (uniform) and 0 as φ → 0.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

NORMALISATIONS = ("sequence", "per_choice", "top_choice")


def _check_phi(phi: np.ndarray | float, where: str) -> np.ndarray:
    arr = np.asarray(phi, dtype=np.float64)
    if not np.all((arr > 0.0) & (arr <= 1.0)):
        bad = arr[~((arr > 0.0) & (arr <= 1.0))].ravel()[0]
        raise ValueError(f"{where}: expected a dispersion φ in (0, 1], found {bad}")
    return arr


def _check_n(n: int, where: str) -> None:
    if not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"{where}: expected a positive integer number of items, found {n!r}")


def choice_log_probs(m: int, phi: np.ndarray | float) -> np.ndarray:
    """log P(J_m = j) for j = 0..m−1, shape phi.shape + (m,)."""
    _check_n(m, "choice_log_probs(m)")
    phi_arr = _check_phi(phi, "choice_log_probs(phi)")
    j = np.arange(m, dtype=np.float64)
    logits = j * np.log(phi_arr)[..., None]
    lse = np.log(np.exp(logits - logits.max(axis=-1, keepdims=True)).sum(axis=-1, keepdims=True))
    return logits - logits.max(axis=-1, keepdims=True) - lse


def choice_entropy(m: int, phi: np.ndarray | float) -> np.ndarray:
    """Entropy (nats) of the choice among m remaining items, shape phi.shape."""
    logp = choice_log_probs(m, phi)
    return -(np.exp(logp) * logp).sum(axis=-1)


def sequence_entropy(n: int, phi: np.ndarray | float) -> np.ndarray:
    """Entropy (nats) of the Mallows–Kendall distribution over rankings of n items."""
    _check_n(n, "sequence_entropy(n)")
    return sum(choice_entropy(m, phi) for m in range(1, n + 1))


def normalised_entropy(n: int, phi: np.ndarray | float, kind: str = "sequence") -> np.ndarray:
    """The entropy of the sequence of choices divided by its maximum, in (0, 1].

    kind="sequence": H(σ) / log n!, the entropy of the whole choice sequence over its maximum.
    kind="per_choice": (1/n) Σ_m H(J_m) / log n, the per-token form of the estimator (every step
        normalised by the same "vocabulary" of n items, as an LM normalises every position by log V);
        its maximum is log n! / (n log n) < 1.
    kind="top_choice": H(J_n) / log n, the entropy of the first choice only.
    """
    _check_n(n, "normalised_entropy(n)")
    if n < 2:
        raise ValueError(f"normalised_entropy(n): expected at least 2 items (one has no choice), found {n}")
    if kind == "sequence":
        return sequence_entropy(n, phi) / math.lgamma(n + 1)
    if kind == "per_choice":
        return sequence_entropy(n, phi) / (n * math.log(n))
    if kind == "top_choice":
        return choice_entropy(n, phi) / math.log(n)
    raise ValueError(f"normalised_entropy(kind): expected one of {NORMALISATIONS}, found {kind!r}")


def sample_rankings(n: int, phi: np.ndarray | float, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``size`` rankings, int64 [size, n]: row r lists the items from first place to last.

    ``phi`` is a scalar or one dispersion per draw (shape [size]).
    """
    _check_n(n, "sample_rankings(n)")
    phi_arr = np.broadcast_to(_check_phi(phi, "sample_rankings(phi)"), (size,))
    remaining = np.tile(np.arange(n, dtype=np.int64), (size, 1))
    out = np.empty((size, n), dtype=np.int64)
    rows = np.arange(size)
    for t in range(n):
        m = n - t
        cdf = np.cumsum(np.exp(choice_log_probs(m, phi_arr)), axis=-1)
        u = rng.random(size)[:, None]
        # argmax of (cdf > u) is the inverse CDF; the min() guards the last bin against cdf[-1] = 1 - ulp.
        j = np.minimum((cdf <= u).sum(axis=-1), m - 1)
        out[:, t] = remaining[rows, j]
        keep = np.ones((size, m), dtype=bool)
        keep[rows, j] = False
        remaining = remaining[keep].reshape(size, m - 1)
    return out


def kendall_distance(ranking: np.ndarray) -> np.ndarray:
    """Discordant pairs with the central ranking (0, 1, ..., n−1); ranking [..., n] lists items by place."""
    r = np.asarray(ranking)
    n = r.shape[-1]
    i, j = np.triu_indices(n, k=1)
    return (r[..., i] > r[..., j]).sum(axis=-1)


def exact_distribution(n: int, phi: float) -> tuple[np.ndarray, np.ndarray]:
    """All n! rankings [n!, n] and their Mallows probabilities (n ≤ 8: brute force, for checks)."""
    _check_n(n, "exact_distribution(n)")
    if n > 8:
        raise ValueError(f"exact_distribution(n): enumerates n! rankings, expected n <= 8, found {n}")
    phi_val = float(_check_phi(phi, "exact_distribution(phi)"))
    perms = np.array(list(itertools.permutations(range(n))), dtype=np.int64)
    logw = kendall_distance(perms) * math.log(phi_val)
    w = np.exp(logw - logw.max())
    return perms, w / w.sum()


def pair_prob(d: np.ndarray | int, phi: np.ndarray | float) -> np.ndarray:
    """P(the item d places better in σ₀ is ranked first) = (d+1)/(1−φ^{d+1}) − d/(1−φ^d), integer d ≥ 1.

    The exact pairwise marginal of the Mallows–Kendall model (it depends on d only, not on n or on the
    items' places). In float64 with φ < 1; φ → 1 is the limit 1/2.
    """
    d_arr = np.asarray(d, dtype=np.float64)
    bad = (d_arr < 1) | (d_arr != np.round(d_arr))
    if np.any(bad):
        raise ValueError(f"pair_prob(d): expected integers >= 1, found {d_arr[bad].ravel()[0]}")
    phi_arr = _check_phi(phi, "pair_prob(phi)")
    if np.any(phi_arr >= 1.0):
        raise ValueError("pair_prob(phi): expected φ < 1 (φ = 1 is the uniform model, probability 1/2)")
    return (d_arr + 1) / -np.expm1((d_arr + 1) * np.log(phi_arr)) - d_arr / -np.expm1(d_arr * np.log(phi_arr))


def choice_indices(rankings: np.ndarray) -> np.ndarray:
    """The choice sequence of each ranking, int64 [..., n]: entry t is J_{n−t}, the number of items
    better in σ₀ than the one placed t-th that are still unplaced (so 0 ≤ J ≤ n−1−t)."""
    r = np.asarray(rankings)
    later = np.triu(np.ones((r.shape[-1], r.shape[-1]), dtype=bool), k=1)
    return ((r[..., None, :] < r[..., :, None]) & later).sum(axis=-1)


def plugin_sequence_entropy(rankings: np.ndarray) -> float:
    """Plug-in estimate of H(σ) = Σ_m H(J_m) from observed rankings [S, n] (biased low for small S)."""
    j = choice_indices(rankings)
    total = 0.0
    for t in range(j.shape[-1] - 1):
        counts = np.bincount(j[:, t], minlength=j.shape[-1] - t).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        total -= float((p * np.log(p)).sum())
    return total
