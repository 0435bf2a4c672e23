"""Part 2: a synthetic contextual bandit where prompts differ in their true preference dispersion.

World (one per seed). P prompts, K arms. Prompt x has a hidden best-to-worst order of its arms and a
true dispersion φ(x) = exp(−c(x)), c(x) spread log-uniformly over [c_min, c_max]. An arm's true reward
is its place on the rank scale, r(x, a) = (K − 1 − rank(a)) / (K − 1) ∈ [0, 1]. The reference policy
π_ref(·|x) = softmax(z), z ~ N(0, σ_ref²), knows nothing of the rewards. A preference pair: two distinct
arms drawn from π_ref, a ranking drawn from the Mallows–Kendall model (central order, φ(x)) by repeated
insertion, and the arm placed first wins; so P(a ≻ b) = g_φ(x)(d), d the gap in true rank, which is
MallowsPO-φ's link (checked in part 1).

Policies. Tabular softmax π_θ(·|x), initialised at π_ref, trained full-batch with Adam for a fixed
budget on the same pairs by each method (same steps, learning rate and data), for every β of a grid:
- dpo:            loss_type="sigmoid"
- theta_true:     "mallows_theta" with the true c(x)
- theta_est:      "mallows_theta" with ĉ(x) from the entropy estimator (below)
- theta_shuffled: "mallows_theta" with the true c values permuted across prompts (a control: same
                  weights, wrong prompts)
- phi_true:       "mallows_phi" with the true c(x)
- phi_est:        "mallows_phi" with ĉ(x)
Estimated dispersion: the reference "model" emits a ranking as a sequence of choices with a miscalibrated
dispersion φ_ref(x) = φ(x)^{exp(τ·η_x)}, η_x ~ N(0, 1); ē(x) is the entropy of that sequence normalised
by its maximum log K! (the "sequence" form of part 1) and ĉ = mpf.neg_log_dispersion(..., phi_star=auto).

Data regimes (config "regimes"): N sampled pairs per prompt, or 0 for the infinite-data limit, where
every ordered pair enters the loss with its probability under the sampler (the population optimum).

Metrics per (method, β): expected true reward E_π[r] and KL(π‖π_ref), averaged over prompts (the
frontier over β); the regret at matched KL, R*(KL) − R, where R* is the best reward any policy can reach
at that KL (π ∝ π_ref·exp(λr) with one λ for all prompts); held-out pair accuracy (sign of the implicit
reward margin β·(log π/π_ref)(w) − ..., ties count ½) on fresh pairs; ranking accuracy over all arm pairs
against the true order. Per seed each method is summarised by the mean over β; methods are compared with
DPO by paired tests across seeds (t-test and exact sign-flip test, Holm-adjusted).

Run: ``python -m experiments.bandit [--quick] [--out DIR] [--seed S]``.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

import mallowspo_fast as mpf

from . import mallows
from .common import (
    Interval,
    base_parser,
    configure_torch,
    holm,
    markdown_table,
    mean_ci,
    out_dir,
    paired_comparison,
    pyplot,
    save_figure,
    spearman,
    write_csv,
    write_json,
)

NAME = "bandit"
METHODS = ("dpo", "theta_true", "theta_est", "theta_shuffled", "phi_true", "phi_est")
LOSS_OF = {"dpo": "sigmoid", "theta_true": "mallows_theta", "theta_est": "mallows_theta",
           "theta_shuffled": "mallows_theta", "phi_true": "mallows_phi", "phi_est": "mallows_phi"}
# "regimes": training pairs per prompt; 0 is the infinite-data limit (every pair weighted by its probability).
CONFIGS: dict[str, dict[str, Any]] = {
    "full": {"seeds": 12, "prompts": 16, "arms": 8, "regimes": (32, 256, 0), "test_pairs": 400, "c_min": 0.1,
             "c_max": 3.0, "ref_std": 1.0, "est_noise": 0.5,
             "betas": tuple(float(b) for b in np.geomspace(0.05, 5.0, 9).round(4)),
             "steps": 300, "lr": 0.1},
    "quick": {"seeds": 3, "prompts": 8, "arms": 6, "regimes": (32, 0), "test_pairs": 100, "c_min": 0.1,
              "c_max": 3.0, "ref_std": 1.0, "est_noise": 0.5, "betas": (0.1, 0.5, 2.0), "steps": 60,
              "lr": 0.1},
}
FRONTIER_LAMBDAS = np.concatenate([[0.0], np.geomspace(1e-3, 1e3, 2001)])


# ----------------------------------------------------------------------------------------------------
# The world


def make_world(cfg: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    p, k = cfg["prompts"], cfg["arms"]
    c = np.exp(rng.uniform(math.log(cfg["c_min"]), math.log(cfg["c_max"]), size=p))
    rank = np.argsort(rng.random((p, k)), axis=1)  # rank[x, a]: 0 = best arm of prompt x
    reward = (k - 1 - rank) / (k - 1)
    z = rng.normal(0.0, cfg["ref_std"], size=(p, k))
    log_ref = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return {"c": c, "phi": np.exp(-c), "rank": rank, "reward": reward, "log_ref": log_ref}


def sample_pairs(world: dict[str, np.ndarray], per_prompt: int,
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Pairs (x, winner, loser): arms from π_ref, labels from a Mallows ranking per pair."""
    p, k = world["rank"].shape
    x = np.repeat(np.arange(p), per_prompt)
    probs = np.exp(world["log_ref"][x])
    a = _inverse_cdf(probs, rng)
    probs[np.arange(x.size), a] = 0.0  # the second arm is drawn from π_ref without the first
    b = _inverse_cdf(probs / probs.sum(axis=1, keepdims=True), rng)
    place = np.argsort(mallows.sample_rankings(k, world["phi"][x], x.size, rng), axis=1)
    rank_a, rank_b = world["rank"][x, a], world["rank"][x, b]
    a_first = place[np.arange(x.size), rank_a] < place[np.arange(x.size), rank_b]
    return {"x": x, "w": np.where(a_first, a, b), "l": np.where(a_first, b, a),
            "weight": np.full(x.size, p / x.size)}


def population_pairs(world: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every ordered pair (x, w, l), weighted by its probability under the sampler: the infinite-data limit.

    P(draw {a, b}) = π(a)π(b)/(1 − π(a)) + π(b)π(a)/(1 − π(b)) and P(a ≻ b) = g_φ(x)(rank gap).
    """
    p, k = world["rank"].shape
    x, a, b = (g.ravel() for g in np.meshgrid(np.arange(p), np.arange(k), np.arange(k), indexing="ij"))
    keep = a != b
    x, a, b = x[keep], a[keep], b[keep]
    pi = np.exp(world["log_ref"])
    draw = pi[x, a] * pi[x, b] * (1.0 / (1.0 - pi[x, a]) + 1.0 / (1.0 - pi[x, b]))
    gap = world["rank"][x, b] - world["rank"][x, a]  # > 0 when a is truly better
    p_a_wins = np.where(gap > 0, mallows.pair_prob(np.abs(gap), world["phi"][x]),
                        1.0 - mallows.pair_prob(np.abs(gap), world["phi"][x]))
    return {"x": x, "w": a, "l": b, "weight": draw * p_a_wins}  # sums to 1 over each prompt's pairs


def _inverse_cdf(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cdf = np.cumsum(probs, axis=1)
    return np.minimum((cdf <= rng.random((probs.shape[0], 1)) * cdf[:, -1:]).sum(axis=1), probs.shape[1] - 1)


def estimated_c(world: dict[str, np.ndarray], noise: float, rng: np.random.Generator) -> np.ndarray:
    """ĉ(x) from the entropy of a miscalibrated reference's choice sequence (module docstring)."""
    k = world["rank"].shape[1]
    phi_ref = np.clip(world["phi"] ** np.exp(noise * rng.normal(size=world["phi"].shape)), 1e-12, 1.0)
    h = torch.as_tensor(mallows.sequence_entropy(k, phi_ref), dtype=torch.float64)
    vocab = math.factorial(k)  # the ranking read as one token out of K! rankings: ē = H / log K!
    phi_star = mpf.auto_phi_star(mpf.pair_entropy(h, h, vocab))
    return mpf.neg_log_dispersion(h, h, vocab, phi_star=phi_star).numpy()


# ----------------------------------------------------------------------------------------------------
# Training and evaluation


def train(world: dict[str, np.ndarray], pairs: dict[str, np.ndarray], c_by_method: dict[str, np.ndarray],
          cfg: dict[str, Any]) -> torch.Tensor:
    """Train every (method, β) policy at once; returns log π_θ [M, B, P, K] (float64)."""
    betas = torch.tensor(cfg["betas"], dtype=torch.float64)
    log_ref = torch.as_tensor(world["log_ref"])
    theta = log_ref.expand(len(METHODS), betas.numel(), *log_ref.shape).clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=cfg["lr"])
    x, win, lose = (torch.as_tensor(pairs[key]) for key in ("x", "w", "l"))
    # Per-pair weights summing to the number of prompts: the loss is a sum over prompts of each prompt's
    # mean pair loss (the sampled pairs weigh 1/N each; population pairs their probability).
    weight = torch.as_tensor(pairs["weight"]).repeat(betas.numel())
    ref_w, ref_l = log_ref[x, win], log_ref[x, lose]
    for _ in range(cfg["steps"]):
        opt.zero_grad(set_to_none=True)
        logp = torch.log_softmax(theta, dim=-1)
        total = torch.zeros((), dtype=torch.float64)
        for m, method in enumerate(METHODS):
            # β enters every loss used here only through β·L, so the β grid is batched by scaling all
            # log-probs by β and passing beta=1 (one library call per method and step).
            scale = betas[:, None]
            c = torch.as_tensor(c_by_method[method])[x].expand(betas.numel(), -1).reshape(-1)
            out = mpf.preference_loss(
                (scale * logp[m][:, x, win]).reshape(-1), (scale * logp[m][:, x, lose]).reshape(-1),
                (scale * ref_w).reshape(-1), (scale * ref_l).reshape(-1),
                loss_type=LOSS_OF[method], beta=1.0, neg_log_dispersion=None if method == "dpo" else c)
            # Every policy has its own parameters: the sum over slices trains each one on exactly its
            # own objective (Adam's per-coordinate scaling keeps them independent).
            total = total + (out.losses * weight).sum()
        total.backward()
        opt.step()
    return torch.log_softmax(theta.detach(), dim=-1)


def oracle_frontier(world: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(mean KL, mean reward) of π_λ ∝ π_ref·exp(λ r) over λ: the best reward at each KL budget."""
    logits = world["log_ref"][None] + FRONTIER_LAMBDAS[:, None, None] * world["reward"][None]
    log_pi = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    pi = np.exp(log_pi)
    kl = (pi * (log_pi - world["log_ref"][None])).sum(-1).mean(-1)
    return kl, (pi * world["reward"][None]).sum(-1).mean(-1)


def evaluate(world: dict[str, np.ndarray], log_pi: torch.Tensor, test: dict[str, np.ndarray],
             frontier: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    """Metrics [M, B] (and per-prompt KL [M, B, P]) of the trained policies."""
    lp = log_pi.numpy()
    pi = np.exp(lp)
    kl_prompt = (pi * (lp - world["log_ref"])).sum(-1)
    reward = (pi * world["reward"]).sum(-1).mean(-1)
    kl = kl_prompt.mean(-1)
    implicit = lp - world["log_ref"]  # β·this is the implicit reward; β > 0 leaves its sign alone
    margin = implicit[..., test["x"], test["w"]] - implicit[..., test["x"], test["l"]]
    accuracy = ((margin > 0) + 0.5 * (margin == 0)).mean(-1)
    i, j = np.triu_indices(world["rank"].shape[1], k=1)
    truth = np.sign(world["rank"][:, j] - world["rank"][:, i])  # +1 when arm i is truly better
    learned = np.sign(implicit[..., i] - implicit[..., j])
    ranking = ((learned == truth) + 0.5 * (learned == 0)).mean(axis=(-1, -2))
    f_kl, f_reward = frontier
    regret = np.interp(kl, f_kl, f_reward) - reward  # the frontier's KL rises monotonically with λ
    return {"reward": reward, "kl": kl, "regret": regret, "heldout_accuracy": accuracy,
            "ranking_accuracy": ranking, "kl_prompt": kl_prompt}


def regime_name(n_pairs: int) -> str:
    return "infinite data" if n_pairs == 0 else f"{n_pairs} pairs/prompt"


def run_seed(cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    """One world, its estimator, and every regime's trained policies and metrics."""
    rng = np.random.default_rng(seed)
    world = make_world(cfg, rng)
    test_pairs = sample_pairs(world, cfg["test_pairs"], rng)
    c_hat = estimated_c(world, cfg["est_noise"], rng)
    c_by_method = {"dpo": np.ones_like(world["c"]), "theta_true": world["c"], "theta_est": c_hat,
                   "theta_shuffled": rng.permutation(world["c"]), "phi_true": world["c"], "phi_est": c_hat}
    frontier = oracle_frontier(world)
    metrics = {}
    for n_pairs in cfg["regimes"]:
        pairs = population_pairs(world) if n_pairs == 0 else sample_pairs(world, n_pairs, rng)
        torch.manual_seed(seed)
        metrics[n_pairs] = evaluate(world, train(world, pairs, c_by_method, cfg), test_pairs, frontier)
    return {"seed": seed, "world": world, "metrics": metrics, "c_hat": c_hat, "frontier": frontier,
            "spearman_c_hat": spearman(c_hat, world["c"]),
            # The true order's accuracy on the held-out labels: the ceiling set by the label noise.
            "heldout_ceiling": float(np.mean(world["rank"][test_pairs["x"], test_pairs["w"]]
                                             < world["rank"][test_pairs["x"], test_pairs["l"]]))}


# ----------------------------------------------------------------------------------------------------
# Reporting

SUMMARY_METRICS = ("regret", "heldout_accuracy", "ranking_accuracy")


def per_seed_summary(runs: list[dict[str, Any]], n_pairs: int) -> dict[str, np.ndarray]:
    """Each metric averaged over β: [seeds, methods]."""
    return {key: np.array([r["metrics"][n_pairs][key].mean(-1) for r in runs]) for key in SUMMARY_METRICS}


def aggregate(cfg: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per regime: intervals across seeds and paired tests against DPO (Holm within each metric)."""
    methods, tests, frontier = [], [], []
    for n_pairs in cfg["regimes"]:
        regime = regime_name(n_pairs)
        per_seed = per_seed_summary(runs, n_pairs)
        for m, method in enumerate(METHODS):
            methods.append({"regime": regime, "method": method, "loss_type": LOSS_OF[method],
                            **{key: mean_ci(per_seed[key][:, m]).fmt(4) for key in SUMMARY_METRICS}})
        for key in SUMMARY_METRICS:
            block = []
            for m, method in enumerate(METHODS[1:], start=1):
                t = paired_comparison(per_seed[key][:, m], per_seed[key][:, 0])
                block.append({"regime": regime, "metric": key, "comparison": f"{method} − dpo",
                              "mean_diff": t.mean_diff, "ci95": f"[{t.ci.lo:.4f}, {t.ci.hi:.4f}]", "t": t.t,
                              "p_t": t.p_t, "p_signflip": t.p_signflip, "n_seeds": t.n})
            for row, adj in zip(block, holm([r["p_signflip"] for r in block])):
                row["p_signflip_holm"] = adj
            tests += block
        for b, beta in enumerate(cfg["betas"]):
            for m, method in enumerate(METHODS):
                vals = {k: np.array([r["metrics"][n_pairs][k][m, b] for r in runs])
                        for k in ("kl", "reward", "regret")}
                frontier.append({"regime": regime, "beta": float(beta), "method": method,
                                 "kl": float(vals["kl"].mean()), "reward": mean_ci(vals["reward"]).fmt(4),
                                 "regret": mean_ci(vals["regret"]).fmt(4)})
    return {"methods": methods, "tests": tests, "frontier": frontier,
            "spearman_c_hat": asdict(mean_ci([r["spearman_c_hat"] for r in runs])),
            "heldout_ceiling": asdict(mean_ci([r["heldout_ceiling"] for r in runs]))}


def plot(cfg: dict[str, Any], runs: list[dict[str, Any]], path: str) -> None:
    plt = pyplot()
    regimes = cfg["regimes"]
    rows = math.ceil((len(regimes) + 3) / 3)
    fig, axes = plt.subplots(rows, 3, figsize=(14, 4.3 * rows))
    axes = axes.ravel()
    for ax in axes[len(regimes) + 3:]:
        ax.set_visible(False)
    colours = dict(zip(METHODS, plt.cm.tab10(np.arange(len(METHODS)))))
    for ax, n_pairs in zip(axes, regimes):
        kl = np.array([r["metrics"][n_pairs]["kl"] for r in runs])  # [S, M, B]
        reward = np.array([r["metrics"][n_pairs]["reward"] for r in runs])
        grid = np.linspace(0.0, kl.mean(0).max() * 1.05, 200)
        ax.plot(grid, np.mean([np.interp(grid, *r["frontier"]) for r in runs], axis=0), "k-", lw=2,
                label="best possible")
        for m, method in enumerate(METHODS):
            ax.plot(kl[:, m].mean(0), reward[:, m].mean(0), "o-", ms=3, color=colours[method], label=method)
        ax.set(xlabel="KL(π‖π_ref), mean over prompts", ylabel="expected true reward",
               title=f"{regime_name(n_pairs)}: frontier over β")
    axes[0].legend(fontsize=7)
    ax = axes[len(regimes)]
    for m, method in enumerate(METHODS):
        stats = [mean_ci(per_seed_summary(runs, n)["regret"][:, m]) for n in regimes]
        ax.errorbar(np.arange(len(regimes)) + 0.06 * (m - 2.5), [s.mean for s in stats],
                    yerr=[[s.mean - s.lo for s in stats], [s.hi - s.mean for s in stats]], fmt="o-", ms=4,
                    capsize=3, color=colours[method], label=method)
    ax.set_xticks(range(len(regimes)), [regime_name(n) for n in regimes], fontsize=8)
    ax.set(ylabel="regret at matched KL (mean over β)", title=f"regret, 95% CI over {len(runs)} seeds")
    ax = axes[len(regimes) + 1]
    b_mid, n_last = len(cfg["betas"]) // 2, regimes[-1]
    c_true = np.concatenate([r["world"]["c"] for r in runs])
    for method in ("dpo", "theta_true", "phi_true"):
        kl_p = np.concatenate([r["metrics"][n_last]["kl_prompt"][METHODS.index(method), b_mid] for r in runs])
        ax.scatter(c_true, kl_p, s=6, alpha=0.4, color=colours[method], label=method)
    ax.set(xscale="log", xlabel="true c(x) = −log φ(x)", ylabel="KL(π‖π_ref) of the prompt",
           title=f"where the KL goes ({regime_name(n_last)}, β = {cfg['betas'][b_mid]})")
    ax.legend(fontsize=7)
    ax = axes[len(regimes) + 2]
    ax.scatter(c_true, np.concatenate([r["c_hat"] for r in runs]), s=6, alpha=0.5, color="tab:brown")
    ax.set(xscale="log", yscale="log", xlabel="true c(x)", ylabel="estimated ĉ(x) (φ* auto)",
           title=f"the estimator (τ = {cfg['est_noise']}), all seeds")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = base_parser(NAME, __doc__.splitlines()[0]).parse_args(argv)
    configure_torch()
    cfg = CONFIGS["quick" if args.quick else "full"]
    start = time.perf_counter()
    runs = [run_seed(cfg, args.seed * 1000 + s) for s in range(cfg["seeds"])]
    agg = aggregate(cfg, runs)
    path = out_dir(NAME, args.out)
    # Committed files stay small: per seed the means over β (what the tests compare), per β the means
    # over seeds (the frontier); per_seed.csv and frontier.csv regenerate the tables and figures' numbers.
    rows = [{"seed": r["seed"], "regime": regime_name(n), "method": method,
             **{key: round(float(r["metrics"][n][key][m].mean()), 6)
                for key in ("reward", "kl", *SUMMARY_METRICS)}}
            for r in runs for n in cfg["regimes"] for m, method in enumerate(METHODS)]
    write_csv(rows, f"{path}/per_seed.csv")
    write_csv(agg.pop("frontier"), f"{path}/frontier.csv")
    result = {"config": {**cfg, "seed": args.seed, "quick": args.quick}, **agg,
              "seconds": time.perf_counter() - start}
    write_json(result, f"{path}/summary.json")
    plot(cfg, runs, f"{path}/frontier.png")
    with open(f"{path}/results.md", "w") as fh:
        fh.write(f"# Synthetic bandit ({'quick' if args.quick else 'full'}, base seed {args.seed})\n\n")
        fh.write(f"{cfg['seeds']} seeds; {cfg['prompts']} prompts × {cfg['arms']} arms; training data "
                 f"{[regime_name(n) for n in cfg['regimes']]}; {cfg['test_pairs']} held-out pairs per "
                 "prompt; "
                 f"c(x) log-uniform in [{cfg['c_min']}, {cfg['c_max']}]; β ∈ {list(cfg['betas'])}; "
                 f"{cfg['steps']} full-batch Adam steps at lr {cfg['lr']} for every method; estimator noise "
                 f"τ = {cfg['est_noise']}.\n\n")
        fh.write(f"Spearman(ĉ, c) across prompts: {Interval(**agg['spearman_c_hat']).fmt(3)}. Held-out "
                 f"accuracy of the true order (the label-noise ceiling): "
                 f"{Interval(**agg['heldout_ceiling']).fmt(4)}.\n\n")
        fh.write("Per method, mean over β, mean [95% t-CI] over seeds:\n\n" + markdown_table(agg["methods"]))
        fh.write("\nPaired against DPO (per-seed means over β; t-test and exact sign-flip test; Holm over "
                 "the five comparisons of a metric and regime):\n\n" + markdown_table(agg["tests"]))
    regret_tests = [t for t in agg["tests"] if t["metric"] == "regret"]
    print(markdown_table(agg["methods"]) + markdown_table(regret_tests), end="")
    print(f"wrote {path} in {result['seconds']:.1f} s", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
