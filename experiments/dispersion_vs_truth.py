"""Part 1: does the entropy-based estimate of c(x) = −log φ(x) track the true Mallows dispersion?

Ground truth: Mallows–Kendall models over n items with known φ (experiments/mallows.py). Their ranking
is a sequence of choices (the top item, then the next among those left, ...), the analogue of an LM
emitting tokens. The estimator of spec §2 is c_hat = −φ*·ln ē with ē the entropy of that sequence of
choices normalised by its maximum. Three normalisations are compared (see mallows.normalised_entropy):

- sequence:   ē = H(σ) / log n!                (the whole sequence over its maximum; mpf.neg_log_dispersion
                                                  with the ranking as one token from a vocabulary of n!)
- per_choice: ē = mean_t H(J_t) / log n         (spec §2 literally: every step over the same log V, V = n;
                                                  computed with mpf.neg_log_dispersion)
- top_choice: ē = H(first choice) / log n
- sequence_sampled: the sequence form with H estimated by plug-in from S observed rankings per prompt.

For each: the fitted φ* (least squares of −log φ = φ*·(−ln ē) through the origin, the estimator's form),
its R², Spearman's rank correlation between c_hat and −log φ pooled over all (n, φ) and within each n,
the local log–log slopes of −log φ against −ln ē for c < 0.3 and c > 1 (1 where the linear form holds),
and the median of c_hat/c at the official φ* = 0.29. A second table checks
that the library's φ-link equals the exact pairwise marginal of the model (enumeration and sampling),
which is what makes MallowsPO-φ the exact likelihood of the bandit's labels in part 2.

Run: ``python -m experiments.dispersion_vs_truth [--quick] [--out DIR] [--seed S]``.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import numpy as np
import torch

import mallowspo_fast as mpf
from mallowspo_fast.losses.dispersion import ENTROPY_FLOOR

from . import mallows
from .common import (
    base_parser,
    configure_torch,
    fit_through_origin,
    markdown_table,
    out_dir,
    pyplot,
    save_figure,
    spearman,
    write_csv,
    write_json,
)

NAME = "dispersion_vs_truth"
CONFIGS: dict[str, dict[str, Any]] = {
    "full": {"ns": (4, 6, 8, 12, 16), "n_phi": 40, "c_min": 0.02, "c_max": 4.0, "samples": 64,
             "link_samples": 200_000},
    "quick": {"ns": (4, 8), "n_phi": 12, "c_min": 0.05, "c_max": 3.0, "samples": 32, "link_samples": 20_000},
}
ESTIMATORS = ("sequence", "per_choice", "top_choice", "sequence_sampled")
LINK_PHIS = (0.2, 0.5, 0.8, 0.95)
LINK_N = 6
LOW_C, HIGH_C = 0.3, 1.0  # regimes of the local log-log slope


def entropy_estimates(ns: tuple[int, ...], cs: np.ndarray, samples: int,
                      rng: np.random.Generator) -> list[dict[str, Any]]:
    """One row per (n, φ): the true c and ē under each estimator."""
    rows = []
    for n in ns:
        phis = np.exp(-cs)
        top = mallows.normalised_entropy(n, phis, "top_choice")
        h = torch.as_tensor(mallows.sequence_entropy(n, phis), dtype=torch.float64)
        # Both forms through the library (both "responses" of the pair are the ranking, φ* = 1, so
        # ē = exp(−c)): per_choice is n tokens of mean entropy H/n over a vocabulary of n items;
        # sequence is the ranking read as one token drawn from a vocabulary of n! rankings.
        seq = torch.exp(-mpf.neg_log_dispersion(h, h, math.factorial(n), phi_star=1.0)).numpy()
        per_choice = torch.exp(-mpf.neg_log_dispersion(h / n, h / n, n, phi_star=1.0)).numpy()
        for i, (c, phi) in enumerate(zip(cs, phis)):
            sampled = mallows.sample_rankings(n, float(phi), samples, rng)
            h_hat = mallows.plugin_sequence_entropy(sampled) / math.lgamma(n + 1)
            rows.append({"n": n, "phi": float(phi), "c_true": float(c), "sequence": float(seq[i]),
                         "per_choice": float(per_choice[i]), "top_choice": float(top[i]),
                         "sequence_sampled": float(h_hat)})
    return rows


def summarise(rows: list[dict[str, Any]],
              ns: tuple[int, ...]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The estimator table and the per-n fitted φ* table."""
    c = np.array([r["c_true"] for r in rows])
    n_col = np.array([r["n"] for r in rows])
    summary, per_n = [], []
    for est in ESTIMATORS:
        e = np.array([r[est] for r in rows])
        x = -np.log(np.maximum(e, ENTROPY_FLOOR))  # c_hat with φ* = 1
        phi_star, r2 = fit_through_origin(x, c)
        # Local log-log slopes of −log φ against −ln ē in the ambiguous and the confident regime (1 where
        # the linear form c = φ*·(−ln ē) holds). The sampled estimator can reach ē = 1 (x = 0): excluded.
        slopes = {}
        for regime, mask in (("low", c < LOW_C), ("high", c > HIGH_C)):
            m = mask & (x > 0)
            fitted = np.polyfit(np.log(x[m]), np.log(c[m]), 1)[0] if m.sum() > 2 else float("nan")
            slopes[regime] = float(fitted)
        within = [spearman(x[n_col == n], c[n_col == n]) for n in ns]
        summary.append({"estimator": est, "phi_star_fit": phi_star, "r2_linear": r2,
                        "spearman_pooled": spearman(x, c), "spearman_within_n_min": min(within),
                        f"loglog_slope_c<{LOW_C}": slopes["low"], f"loglog_slope_c>{HIGH_C}": slopes["high"],
                        "median_ratio_at_0.29": float(np.median(0.29 * x / c))})
        for n in ns:
            k, r2n = fit_through_origin(x[n_col == n], c[n_col == n])
            per_n.append({"estimator": est, "n": n, "phi_star_fit": k, "r2_linear": r2n})
    return summary, per_n


def link_check(samples: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """mpf's φ-link at integer d against the model's exact pairwise marginal (enumeration, sampling)."""
    rows = []
    d = np.arange(1, LINK_N)
    for phi in LINK_PHIS:
        perms, probs = mallows.exact_distribution(LINK_N, phi)
        place = np.argsort(perms, axis=1)
        exact = np.array([probs[place[:, 0] < place[:, k]].sum() for k in d])
        drawn = np.argsort(mallows.sample_rankings(LINK_N, phi, samples, rng), axis=1)
        freq = np.array([(drawn[:, 0] < drawn[:, k]).mean() for k in d])
        lib = mpf.mallows_phi_link(torch.as_tensor(d, dtype=torch.float64), phi).numpy()
        closed = mallows.pair_prob(d, phi)
        for k in range(d.size):
            rows.append({"phi": phi, "d": int(d[k]), "mpf_link": float(lib[k]),
                         "exact_enumeration": float(exact[k]),
                         "closed_form": float(closed[k]), "rim_frequency": float(freq[k]),
                         "abs_err_vs_exact": abs(float(lib[k] - exact[k]))})
    return rows


def plot(rows: list[dict[str, Any]], summary: list[dict[str, Any]], ns: tuple[int, ...], path: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(ns)))
    fit = {s["estimator"]: s["phi_star_fit"] for s in summary}
    for col, n in zip(colours, ns):
        sub = [r for r in rows if r["n"] == n]
        phi = np.array([r["phi"] for r in sub])
        c = np.array([r["c_true"] for r in sub])
        axes[0].plot(phi, [r["sequence"] for r in sub], color=col, label=f"n={n} sequence")
        axes[0].plot(phi, [r["per_choice"] for r in sub], color=col, ls="--")
        for ax, est in ((axes[1], "sequence"), (axes[2], "per_choice")):
            x = -np.log(np.maximum([r[est] for r in sub], ENTROPY_FLOOR))
            ax.plot(c, fit[est] * x, "o-", color=col, ms=3, label=f"n={n}")
        xs = -np.log(np.maximum([r["sequence_sampled"] for r in sub], ENTROPY_FLOOR))
        axes[1].plot(c, fit["sequence_sampled"] * xs, "x", color=col, ms=4, alpha=0.6)
    axes[0].set(xlabel="true φ", ylabel="normalised entropy ē",
                title="ē vs φ (solid: sequence, dashed: per choice)")
    axes[0].legend(fontsize=7)
    for ax, est in ((axes[1], "sequence"), (axes[2], "per_choice")):
        lim = [min(r["c_true"] for r in rows), max(r["c_true"] for r in rows)]
        ax.plot(lim, lim, "k:", lw=1, label="y = x")
        ax.set(xscale="log", yscale="log", xlabel="true c = −log φ", ylabel=f"c_hat (φ* = {fit[est]:.3f})",
               title=f"estimate vs truth: {est}" + (" (x: sampled)" if est == "sequence" else ""))
        ax.legend(fontsize=7)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = base_parser(NAME, __doc__.splitlines()[0]).parse_args(argv)
    configure_torch()
    cfg = CONFIGS["quick" if args.quick else "full"]
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    cs = np.geomspace(cfg["c_min"], cfg["c_max"], cfg["n_phi"])
    rows = entropy_estimates(cfg["ns"], cs, cfg["samples"], rng)
    summary, per_n = summarise(rows, cfg["ns"])
    link = link_check(cfg["link_samples"], rng)
    path = out_dir(NAME, args.out)
    write_csv(rows, f"{path}/points.csv")
    write_csv(link, f"{path}/phi_link_check.csv")
    result = {"config": {**cfg, "seed": args.seed, "quick": args.quick}, "summary": summary, "per_n": per_n,
              "phi_link_max_abs_err": max(r["abs_err_vs_exact"] for r in link),
              "seconds": time.perf_counter() - start}
    write_json(result, f"{path}/summary.json")
    plot(rows, summary, cfg["ns"], f"{path}/estimate_vs_truth.png")
    with open(f"{path}/results.md", "w") as fh:
        mode = "quick" if args.quick else "full"
        fh.write(f"# Dispersion estimator vs truth ({mode}, seed {args.seed})\n\n")
        fh.write(f"n ∈ {list(cfg['ns'])}, {cfg['n_phi']} values of −log φ in [{cfg['c_min']}, "
                 f"{cfg['c_max']}] (geometric), {cfg['samples']} rankings per point for the sampled "
                 "estimator.\n\n")
        fh.write(markdown_table(summary))
        fh.write("\nFitted φ* per number of items:\n\n")
        fh.write(markdown_table([r for r in per_n if r["estimator"] in ("sequence", "per_choice")]))
        fh.write(f"\nφ-link vs exact Mallows pair marginals (n = {LINK_N}): max |error| = "
                 f"{result['phi_link_max_abs_err']:.2e}\n\n")
        fh.write(markdown_table(link))
    print(markdown_table(summary), end="")
    print(f"wrote {path} in {result['seconds']:.1f} s", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
