"""Statistics and output helpers shared by the experiment scripts.

scipy is not a dependency, so the few tests the scripts need are written here: Student-t intervals and
the paired t-test (t distribution through mpmath's regularised incomplete beta function), percentile
bootstrap intervals, an exact sign-flip permutation test, Spearman's rank correlation and Holm's step-down
correction. Each is checked against closed forms or brute force in tests/experiments/test_common.py.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import mpmath
import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_ROOT = os.path.join(REPO_ROOT, "docs", "results")

# ----------------------------------------------------------------------------------------------------
# Validation


def _as_1d(x: Sequence[float] | np.ndarray, name: str, min_len: int = 1) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-d sequence of numbers, found shape {arr.shape}")
    if arr.size < min_len:
        raise ValueError(f"{name}: expected at least {min_len} values, found {arr.size}")
    if not np.all(np.isfinite(arr)):
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise ValueError(f"{name}: expected finite values, found {arr[bad]} at index {bad}")
    return arr


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: expected a confidence level in (0, 1), found {level}")


# ----------------------------------------------------------------------------------------------------
# Student t distribution


def t_sf_two_sided(t: float, df: float) -> float:
    """P(|T| >= |t|) for T ~ Student-t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"df: expected a positive number of degrees of freedom, found {df}")
    if math.isinf(t):
        return 0.0
    x = df / (df + t * t)
    return float(mpmath.betainc(df / 2.0, 0.5, 0.0, x, regularized=True))


def t_ppf(q: float, df: float) -> float:
    """Quantile of the Student-t distribution (bisection on the two-sided tail; 1e-12 absolute)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"q: expected a probability in (0, 1), found {q}")
    if q == 0.5:
        return 0.0
    tail = 2.0 * min(q, 1.0 - q)
    lo, hi = 0.0, 1.0
    while t_sf_two_sided(hi, df) > tail:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_sf_two_sided(mid, df) > tail:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    t = 0.5 * (lo + hi)
    return t if q > 0.5 else -t


# ----------------------------------------------------------------------------------------------------
# Intervals


@dataclass(frozen=True)
class Interval:
    mean: float
    lo: float
    hi: float

    def fmt(self, digits: int = 3) -> str:
        return f"{self.mean:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"


def mean_ci(x: Sequence[float] | np.ndarray, level: float = 0.95) -> Interval:
    """Student-t confidence interval for the mean (a single value gives a zero-width interval)."""
    _check_level(level)
    arr = _as_1d(x, "x")
    m = float(arr.mean())
    if arr.size == 1:
        return Interval(m, m, m)
    half = t_ppf(0.5 + level / 2.0, arr.size - 1) * float(arr.std(ddof=1)) / math.sqrt(arr.size)
    return Interval(m, m - half, m + half)


def bootstrap_ci(
    x: Sequence[float] | np.ndarray,
    level: float = 0.95,
    n_boot: int = 10_000,
    seed: int = 0,
    stat: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Interval:
    """Percentile bootstrap interval of ``stat`` (default: the mean, vectorised over resamples)."""
    _check_level(level)
    arr = _as_1d(x, "x")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arr.size, size=(n_boot, arr.size))
    stat = stat or (lambda a: a.mean(axis=-1))
    boots = np.asarray(stat(arr[idx]), dtype=np.float64)
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(np.asarray(stat(arr[None, :]))[0]), float(lo), float(hi))


# ----------------------------------------------------------------------------------------------------
# Paired tests


@dataclass(frozen=True)
class PairedTest:
    mean_diff: float
    ci: Interval
    t: float
    p_t: float
    p_signflip: float
    n: int


def paired_t_test(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Two-sided paired t-test of mean(a - b) = 0; returns (t, p)."""
    a_arr, b_arr = _as_1d(a, "a", 2), _as_1d(b, "b", 2)
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"paired samples: expected equal lengths, found {a_arr.size} and {b_arr.size}")
    d = a_arr - b_arr
    sd = float(d.std(ddof=1))
    if sd == 0.0:
        return (0.0, 1.0) if float(d.mean()) == 0.0 else (math.copysign(math.inf, float(d.mean())), 0.0)
    t = float(d.mean()) / (sd / math.sqrt(d.size))
    return t, t_sf_two_sided(t, d.size - 1)


def sign_flip_test(d: Sequence[float] | np.ndarray, n_mc: int = 200_000, seed: int = 0) -> float:
    """Two-sided sign-flip permutation test of mean(d) = 0 (exact up to n = 20, Monte Carlo beyond).

    Under the null each paired difference is symmetric about 0, so every sign pattern is equally likely;
    the p-value is the share of patterns whose |mean| reaches the observed one.
    """
    arr = _as_1d(d, "d")
    n = arr.size
    observed = abs(float(arr.mean()))
    # Tolerance: sign patterns that tie with the observed statistic must count as "as extreme".
    tol = 1e-12 * max(1.0, float(np.abs(arr).max()))
    if n <= 20:
        count, total, chunk = 0, 1 << n, 1 << 16
        bits = np.arange(n, dtype=np.int64)
        for start in range(0, total, chunk):
            codes = np.arange(start, min(start + chunk, total), dtype=np.int64)
            signs = ((codes[:, None] >> bits) & 1) * 2 - 1
            count += int(np.count_nonzero(np.abs(signs @ arr) / n >= observed - tol))
        return count / total
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, n_mc, 20_000):
        signs = rng.choice(np.array([-1.0, 1.0]), size=(min(20_000, n_mc - start), n))
        hits += int(np.count_nonzero(np.abs(signs @ arr) / n >= observed - tol))
    return (hits + 1) / (n_mc + 1)


def paired_comparison(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray,
                      level: float = 0.95) -> PairedTest:
    """Mean of a - b with its t interval, the paired t-test and the sign-flip test."""
    a_arr, b_arr = _as_1d(a, "a", 2), _as_1d(b, "b", 2)
    t, p_t = paired_t_test(a_arr, b_arr)
    d = a_arr - b_arr
    return PairedTest(float(d.mean()), mean_ci(d, level), t, p_t, sign_flip_test(d), d.size)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control, any dependence)."""
    p = _as_1d(pvalues, "pvalues")
    order = np.argsort(p, kind="stable")
    adjusted = np.empty_like(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (p.size - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


# ----------------------------------------------------------------------------------------------------
# Correlation and fits


def rankdata(x: Sequence[float] | np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    arr = _as_1d(x, "x")
    order = np.argsort(arr, kind="stable")
    ranks = np.empty(arr.size, dtype=np.float64)
    sorted_vals = arr[order]
    start = 0
    for end in range(1, arr.size + 1):
        if end == arr.size or sorted_vals[end] != sorted_vals[start]:
            ranks[order[start:end]] = 0.5 * (start + end - 1) + 1.0
            start = end
    return ranks


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    xa, ya = _as_1d(x, "x", 2), _as_1d(y, "y", 2)
    if xa.shape != ya.shape:
        raise ValueError(f"pearson: expected equal lengths, found {xa.size} and {ya.size}")
    xc, yc = xa - xa.mean(), ya - ya.mean()
    denom = math.sqrt(float(xc @ xc) * float(yc @ yc))
    if denom == 0.0:
        raise ValueError("pearson: one of the inputs is constant; the correlation is undefined")
    return float(xc @ yc) / denom


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman's rank correlation (Pearson correlation of average ranks)."""
    return pearson(rankdata(x), rankdata(y))


def fit_through_origin(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares slope of y = k·x and the R² of that fit (1 − SSE / sum of squares about the mean)."""
    xa, ya = _as_1d(x, "x", 2), _as_1d(y, "y", 2)
    k = float(xa @ ya) / float(xa @ xa)
    sse = float(((ya - k * xa) ** 2).sum())
    sst = float(((ya - ya.mean()) ** 2).sum())
    return k, 1.0 - sse / sst


# ----------------------------------------------------------------------------------------------------
# Outputs


def base_parser(name: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m experiments.{name}", description=description)
    parser.add_argument("--quick", action="store_true", help="reduced configuration (seconds, for tests)")
    parser.add_argument("--out", default=None, help=f"output folder (default docs/results/{name})")
    parser.add_argument("--seed", type=int, default=0, help="base seed; every run is a function of it")
    return parser


def out_dir(name: str, out: str | None) -> str:
    path = out or os.path.join(RESULTS_ROOT, name)
    os.makedirs(path, exist_ok=True)
    return path


def _fmt_cell(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0.0 else f"{v:.2e}"
    return str(v)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        raise ValueError("markdown_table: expected at least one row")
    cols = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt_cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[dict[str, Any]], path: str) -> None:
    if not rows:
        raise ValueError(f"write_csv: no rows to write to {path}")
    cols = list(rows[0].keys())
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=cols)
        writer.writeheader()
        writer.writerows(rows)


def write_json(obj: Any, path: str) -> None:
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, default=float)
        fh.write("\n")


def save_figure(fig: Any, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    import matplotlib.pyplot as plt

    plt.close(fig)


def pyplot() -> Any:
    """matplotlib.pyplot with a file-only backend (scripts run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def configure_torch() -> None:
    """One intra-op thread: the tensors here are tiny, and on a shared CPU extra threads only spin-wait
    (measured 10-50x slower per call with 2 threads on a loaded 2-core machine)."""
    import torch

    torch.set_num_threads(1)
