"""Part 4: the mechanism at language-model scale, on a generated task with known, prompt-dependent dispersion.

World (``generated_world``): four prompt families from one right answer (arithmetic, c ∈ [2, 4]) to
many acceptable ones (open choices, c ∈ [0.03, 0.3]); every prompt has 8 candidate responses, a
central ranking and its own dispersion; people are Mallows–Kendall models with that dispersion.

Per seed:
1. Reference: a tiny transformer LM (``ensemble_lm``) trained by SFT on answers sampled from the true
   answer distributions (the top choice of a Mallows ranking) of every prompt.
2. Preference data on the training prompts only: two distinct candidates drawn from the reference, the
   label drawn from the prompt's Mallows model (noisy labels concentrate on high-dispersion prompts).
3. Estimated dispersion ĉ(x) of each pair from the reference's token entropies (spec §2:
   ``mpf.pair_entropy``, φ* = ``mpf.auto_phi_star`` over the training pairs, ``mpf.neg_log_dispersion``);
   its Spearman correlation with the true c(x), per family and overall, at the prompt level (ĉ averaged
   over a prompt's pairs).
4. Policies, all initialised at the reference and trained on the same minibatches for the same number
   of Adam steps, for every β of a common grid: DPO (``sigmoid``), MallowsPO-θ and -φ with ĉ and with the
   true c, Mallows-IPO with ĉ, and the official ``cauchy`` loss.
5. Evaluation on the held-out prompts (no preference data on them), exact over the candidate set plus
   one "anything else" outcome (reward 0, loses every comparison): expected true reward E_π[r], KL(π‖π_ref)
   over those outcomes (a lower bound of the sequence-level KL), the regret at matched KL
   R*(KL) − R with R* the best reward any policy reaches at that KL (π ∝ π_ref·e^{λr}, one λ), the win
   rate against the reference under the true preference model (ties ½), and the accuracy of the implicit
   reward's sign on held-out labelled pairs. All of it overall and split by dispersion level.

Per seed each method is summarised by its mean over β; methods are compared with DPO by paired tests
across seeds (t-test and exact sign-flip test, Holm over the six comparisons of a metric and level).

Run: ``python -m experiments.generated_task [--quick] [--out DIR] [--seed S] [--seeds N]``.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import numpy as np
import torch

import mallowspo_fast as mpf

from . import ensemble_lm as lm
from . import generated_world as gw
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

NAME = "generated_task"
METHODS = ("dpo", "theta_est", "theta_true", "phi_est", "phi_true", "ipo_est", "cauchy")
LOSS_OF = {"dpo": "sigmoid", "theta_est": "mallows_theta", "theta_true": "mallows_theta",
           "phi_est": "mallows_phi", "phi_true": "mallows_phi", "ipo_est": "mallows_ipo", "cauchy": "cauchy"}
DISPERSION_OF = {"theta_est": "est", "theta_true": "true", "phi_est": "est", "phi_true": "true", "ipo_est": "est"}
# Levels of the held-out prompts by true dispersion: the paper's claim is about the high-dispersion ones.
LEVELS = {"all": (0.0, math.inf), "high dispersion (c < 1)": (0.0, 1.0), "low dispersion (c ≥ 1)": (1.0, math.inf)}
CONFIGS: dict[str, dict[str, Any]] = {
    "full": {"seeds": 12, "prompts_per_family": 48, "heldout_per_family": 16, "sft_samples": 64,
             "sft_steps": 1500, "sft_batch": 128, "sft_lr": 3e-3, "pairs_per_prompt": 32, "heldout_pairs": 32,
             "betas": (0.1, 0.3, 1.0, 3.0), "steps": 150, "batch": 64, "lr": 3e-4,
             "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64}},
    "quick": {"seeds": 2, "prompts_per_family": 12, "heldout_per_family": 4, "sft_samples": 32,
              "sft_steps": 150, "sft_batch": 64, "sft_lr": 3e-3, "pairs_per_prompt": 8, "heldout_pairs": 8,
              "betas": (0.1, 0.5), "steps": 20, "batch": 32, "lr": 1e-3,
              "model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32}},
}
FRONTIER_LAMBDAS = np.concatenate([[0.0], np.geomspace(1e-3, 1e3, 1201)])


# ----------------------------------------------------------------------------------------------------
# Reference, data and dispersion


def candidate_logprobs(params: dict[str, torch.Tensor], model_cfg: lm.TinyLMConfig, world: gw.World,
                       prompts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log π(y|x) and mean token entropy of every candidate, [E, len(prompts), K] each."""
    ids, labels = gw.candidate_table(world, prompts)
    logps, ents = lm.evaluate_sequences(params, model_cfg, ids, labels)
    return logps.reshape(len(logps), len(prompts), gw.K), ents.reshape(len(ents), len(prompts), gw.K)


def with_other(logp: np.ndarray) -> np.ndarray:
    """Probabilities over the K candidates and "anything else" [..., K + 1] from candidate log-probs."""
    p = np.exp(logp)
    return np.concatenate([p, np.clip(1.0 - p.sum(-1, keepdims=True), 0.0, 1.0)], axis=-1)


def pair_dispersion(world: gw.World, pairs: dict[str, np.ndarray], ref_entropy: np.ndarray,
                    phi_star: float | None = None) -> tuple[np.ndarray, float]:
    """ĉ of each pair from the reference's mean token entropies [P, K] (spec §2) and the φ* used
    (``auto_phi_star`` of these pairs unless given)."""
    x, w, lose = pairs["x"], pairs["w"], pairs["l"]
    n_w = torch.tensor([len(world.candidates[i][k]) for i, k in zip(x, w)])
    n_l = torch.tensor([len(world.candidates[i][k]) for i, k in zip(x, lose)])
    h_w, h_l = torch.as_tensor(ref_entropy[x, w]), torch.as_tensor(ref_entropy[x, lose])
    vocab = len(gw.VOCAB)
    if phi_star is None:
        phi_star = mpf.auto_phi_star(mpf.pair_entropy(h_w, h_l, vocab), empty_pairs=mpf.empty_response_pairs(n_w, n_l))
    c = mpf.neg_log_dispersion(h_w, h_l, vocab, phi_star=phi_star, chosen_num_tokens=n_w, rejected_num_tokens=n_l)
    return c.numpy(), phi_star


def prompt_mean(values: np.ndarray, x: np.ndarray, n_prompts: int) -> np.ndarray:
    """Mean of per-pair ``values`` over each prompt's pairs (NaN for a prompt without pairs)."""
    total = np.bincount(x, weights=values, minlength=n_prompts)
    count = np.bincount(x, minlength=n_prompts)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def dispersion_agreement(world: gw.World, c_hat_prompt: np.ndarray) -> dict[str, float]:
    """Spearman(ĉ(x), c(x)) over all prompts and within each family."""
    out = {"overall": spearman(c_hat_prompt, world.c)}
    for f, name in enumerate(gw.FAMILIES):
        m = world.family == f
        out[name] = spearman(c_hat_prompt[m], world.c[m])
    return out


# ----------------------------------------------------------------------------------------------------
# Policies


def train_policies(ref: dict[str, torch.Tensor], model_cfg: lm.TinyLMConfig, world: gw.World,
                   pairs: dict[str, np.ndarray], c_pair: dict[str, np.ndarray], ref_logp: np.ndarray,
                   cfg: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Every (method, β) policy as one ensemble, member m·len(betas) + b; returns the trained parameters."""
    betas = cfg["betas"]
    members = [(m, beta) for m in METHODS for beta in betas]
    params = lm.replicate(ref, len(members))
    opt = torch.optim.Adam(params.values(), lr=cfg["lr"])
    x, w, lose = pairs["x"], pairs["w"], pairs["l"]
    ids, labels = gw.pack([world.prompt[i] for i in np.concatenate([x, x])],
                          [world.candidates[i][k] for i, k in zip(np.concatenate([x, x]), np.concatenate([w, lose]))])
    ids, labels = torch.as_tensor(ids), torch.as_tensor(labels)
    ref_w, ref_l = torch.as_tensor(ref_logp[x, w]), torch.as_tensor(ref_logp[x, lose])
    c_of = {k: torch.as_tensor(v) for k, v in c_pair.items()}
    rng = np.random.default_rng(seed)
    n, order = len(x), np.empty(0, dtype=np.int64)
    for _ in range(cfg["steps"]):
        if order.size < cfg["batch"]:
            order = np.concatenate([order, rng.permutation(n)])
        idx, order = order[:cfg["batch"]], order[cfg["batch"]:]
        rows = torch.as_tensor(np.concatenate([idx, idx + n]))
        logps = lm.sequence_stats(params, model_cfg, ids[rows], labels[rows]).logps  # [E, 2·batch]
        pw, pl = logps[:, :len(idx)], logps[:, len(idx):]
        t_idx = torch.as_tensor(idx)
        total = torch.zeros(())
        for e, (method, beta) in enumerate(members):
            disp = DISPERSION_OF.get(method)
            out = mpf.preference_loss(pw[e], pl[e], ref_w[t_idx].float(), ref_l[t_idx].float(),
                                      loss_type=LOSS_OF[method], beta=beta,
                                      neg_log_dispersion=None if disp is None else c_of[disp][t_idx].float())
            total = total + out.loss  # each member's parameters get gradient from its own loss only
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
    return {k: v.detach() for k, v in params.items()}


# ----------------------------------------------------------------------------------------------------
# Evaluation


def oracle_frontier(p_ref: np.ndarray, reward: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean KL, mean reward) over prompts of π_λ ∝ π_ref·e^{λr} on the K + 1 outcomes, for each λ."""
    with np.errstate(divide="ignore"):
        log_ref = np.log(p_ref)
    logits = log_ref[None] + FRONTIER_LAMBDAS[:, None, None] * reward[None]
    top = logits.max(-1, keepdims=True)
    log_pi = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    pi = np.exp(log_pi)
    kl = np.where(pi > 0, pi * (log_pi - np.where(pi > 0, log_ref[None], 0.0)), 0.0).sum(-1)
    return kl.mean(-1), (pi * reward[None]).sum(-1).mean(-1)


def kl_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p‖q) over the last axis, 0·log 0 = 0 (q > 0 wherever p > 0 up to rounding: floored at 1e-300)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - np.log(np.maximum(q, 1e-300))), 0.0)
    return terms.sum(-1)


def evaluate(world: gw.World, prompts: np.ndarray, policy_logp: np.ndarray, ref_logp: np.ndarray,
             pairs: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Per level: reward, KL, regret, win rate and held-out pair accuracy [E] of the policies, the oracle
    frontier (KL, reward) and the reference's reward and the label-noise ceiling.

    policy_logp [E, n, K] and ref_logp [n, K] are the candidates' log-probs on ``prompts``; ``pairs`` are
    held-out labelled pairs on the same prompts (their "x" indexes the world's prompts).
    """
    p_pol, p_ref = with_other(policy_logp), with_other(ref_logp)
    reward = np.concatenate([world.reward[prompts], np.zeros((len(prompts), 1))], axis=1)
    win = gw.true_win_prob(world, prompts)
    local = {int(p): i for i, p in enumerate(prompts)}
    px = np.array([local[int(v)] for v in pairs["x"]])
    implicit = policy_logp - ref_logp[None]  # β·this is the implicit reward; β > 0 keeps its sign
    margin = implicit[:, px, pairs["w"]] - implicit[:, px, pairs["l"]]
    correct = (margin > 0) + 0.5 * (margin == 0)
    out = {}
    for level, (lo, hi) in LEVELS.items():
        sel = (world.c[prompts] >= lo) & (world.c[prompts] < hi)
        f_kl, f_reward = oracle_frontier(p_ref[sel], reward[sel])
        r = (p_pol[:, sel] * reward[sel][None]).sum(-1).mean(-1)
        kl = kl_divergence(p_pol[:, sel], p_ref[sel][None]).mean(-1)
        wr = np.einsum("enk,nkj,nj->en", p_pol[:, sel], win[sel], p_ref[sel]).mean(-1)
        pair_sel = sel[px]
        out[level] = {"reward": r, "kl": kl, "regret": np.interp(kl, f_kl, f_reward) - r, "win_rate": wr,
                      "oracle": (f_kl, f_reward),
                      "accuracy": correct[:, pair_sel].mean(-1),
                      "ref_reward": float((p_ref[sel] * reward[sel]).sum(-1).mean()),
                      "accuracy_ceiling": float(np.mean(world.rank[pairs["x"][pair_sel], pairs["w"][pair_sel]]
                                                        < world.rank[pairs["x"][pair_sel], pairs["l"][pair_sel]]))}
    return out


def run_seed(cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    """One world: its reference, estimator, trained policies and held-out metrics."""
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    world = gw.make_world(cfg["prompts_per_family"], cfg["heldout_per_family"], rng)
    sp, sk = gw.sft_samples(world, cfg["sft_samples"], rng)
    ids, labels = gw.pack([world.prompt[i] for i in sp], [world.candidates[i][k] for i, k in zip(sp, sk)])
    model_cfg = lm.TinyLMConfig(vocab_size=len(gw.VOCAB), max_len=ids.shape[1], **cfg["model"])
    ref = lm.train_sft(model_cfg, ids, labels, steps=cfg["sft_steps"], batch=cfg["sft_batch"], lr=cfg["sft_lr"],
                       seed=seed)
    sft_seconds = time.perf_counter() - start
    all_prompts = np.arange(len(world.prompt))
    ref_logp, ref_ent = (a[0] for a in candidate_logprobs(ref, model_cfg, world, all_prompts))
    sampler = np.exp(ref_logp) / np.exp(ref_logp).sum(1, keepdims=True)
    train_prompts, test_prompts = np.flatnonzero(~world.heldout), np.flatnonzero(world.heldout)
    pairs = gw.preference_pairs(world, train_prompts, cfg["pairs_per_prompt"], sampler, rng)
    test_pairs = gw.preference_pairs(world, test_prompts, cfg["heldout_pairs"], sampler, rng)
    c_est, phi_star = pair_dispersion(world, pairs, ref_ent)
    c_test, _ = pair_dispersion(world, test_pairs, ref_ent, phi_star)
    n = len(world.prompt)
    c_hat_prompt = np.where(world.heldout, prompt_mean(c_test, test_pairs["x"], n), prompt_mean(c_est, pairs["x"], n))
    c_pair = {"est": c_est, "true": world.c[pairs["x"]]}
    policies = train_policies(ref, model_cfg, world, pairs, c_pair, ref_logp, cfg, seed)
    policy_logp, _ = candidate_logprobs(policies, model_cfg, world, test_prompts)
    metrics = evaluate(world, test_prompts, policy_logp, ref_logp[test_prompts], test_pairs)
    e_ref = with_other(ref_logp)
    return {"seed": seed, "world": world, "metrics": metrics, "c_hat_prompt": c_hat_prompt, "phi_star": phi_star,
            "spearman": dispersion_agreement(world, c_hat_prompt),
            "ref_other_mass": float(e_ref[:, -1].mean()),
            "ref_tv": float(0.5 * (np.abs(e_ref[:, :-1] - world.answer_probs()).sum(1) + e_ref[:, -1]).mean()),
            "sft_seconds": sft_seconds, "seconds": time.perf_counter() - start}


# ----------------------------------------------------------------------------------------------------
# Reporting

SUMMARIES = {  # per seed, method and level: how the β grid is summarised
    "regret": ("mean", "regret at matched KL, mean over β (lower is better)"),
    "win_rate": ("max", "win rate against the reference, best β"),
    "reward": ("max", "expected true reward, best β"),
    "accuracy": ("mean", "held-out pair accuracy, mean over β"),
}
TESTED = ("regret", "win_rate", "accuracy")


def per_seed(runs: list[dict[str, Any]], level: str, key: str) -> np.ndarray:
    """[seeds, methods]: the metric of each method summarised over its β grid."""
    how = SUMMARIES[key][0]
    vals = np.array([r["metrics"][level][key].reshape(len(METHODS), -1) for r in runs])  # [S, M, B]
    return vals.mean(-1) if how == "mean" else vals.max(-1)


def aggregate(cfg: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Intervals across seeds, paired tests against DPO (Holm within each metric and level), frontier."""
    methods, tests, frontier = [], [], []
    for level in LEVELS:
        summary = {key: per_seed(runs, level, key) for key in SUMMARIES}
        for m, method in enumerate(METHODS):
            methods.append({"level": level, "method": method, "loss_type": LOSS_OF[method],
                            **{key: mean_ci(summary[key][:, m]).fmt(4) for key in SUMMARIES}})
        for key in TESTED if len(runs) >= 2 else ():  # a paired test needs two seeds
            block = []
            for m, method in enumerate(METHODS[1:], start=1):
                t = paired_comparison(summary[key][:, m], summary[key][:, 0])
                block.append({"level": level, "metric": key, "comparison": f"{method} − dpo",
                              "mean_diff": t.mean_diff, "ci95": f"[{t.ci.lo:.4f}, {t.ci.hi:.4f}]", "t": t.t,
                              "p_t": t.p_t, "p_signflip": t.p_signflip, "n_seeds": t.n})
            for row, adj in zip(block, holm([r["p_signflip"] for r in block])):
                row["p_signflip_holm"] = adj
            tests += block
        for m, method in enumerate(METHODS):
            for b, beta in enumerate(cfg["betas"]):
                e = m * len(cfg["betas"]) + b
                vals = {k: np.array([r["metrics"][level][k][e] for r in runs])
                        for k in ("kl", "reward", "regret", "win_rate", "accuracy")}
                frontier.append({"level": level, "method": method, "beta": float(beta),
                                 "kl": float(vals["kl"].mean()), **{k: mean_ci(v).fmt(4) for k, v in vals.items()
                                                                    if k != "kl"}})
    agreement = []
    for name in ("overall", *gw.FAMILIES):
        agreement.append({"prompts": name, "spearman_c_hat_c": mean_ci([r["spearman"][name] for r in runs]).fmt(3),
                          "min_over_seeds": min(r["spearman"][name] for r in runs)})
    reference = {key: mean_ci([r[key] for r in runs]).__dict__ for key in ("phi_star", "ref_other_mass", "ref_tv")}
    reference |= {f"ref_reward {level}": mean_ci([r["metrics"][level]["ref_reward"] for r in runs]).__dict__
                  for level in LEVELS}
    reference |= {f"accuracy_ceiling {level}": mean_ci([r["metrics"][level]["accuracy_ceiling"] for r in runs]).__dict__
                  for level in LEVELS}
    return {"methods": methods, "tests": tests, "frontier": frontier, "agreement": agreement, "reference": reference}


def plot(cfg: dict[str, Any], runs: list[dict[str, Any]], path: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(15, 9))
    colours = dict(zip(METHODS, plt.cm.tab10(np.arange(len(METHODS)))))
    nb = len(cfg["betas"])
    for ax, level in zip(axes[0], LEVELS):
        kl = np.array([r["metrics"][level]["kl"] for r in runs]).reshape(len(runs), len(METHODS), nb)
        reward = np.array([r["metrics"][level]["reward"] for r in runs]).reshape(len(runs), len(METHODS), nb)
        grid = np.linspace(0.0, kl.mean(0).max() * 1.05, 200)
        best = np.mean([np.interp(grid, *r["metrics"][level]["oracle"]) for r in runs], axis=0)
        ax.plot(grid, best, "k-", lw=2, label="best possible (π_ref·e^{λr})")
        for m, method in enumerate(METHODS):
            ax.plot(kl[:, m].mean(0), reward[:, m].mean(0), "o-", ms=3, color=colours[method], label=method)
        ax.set(xlabel="KL(π‖π_ref), held-out prompts", ylabel="expected true reward",
               title=f"{level}: frontier over β, mean of {len(runs)} seeds")
    axes[0, 0].legend(fontsize=7)
    ax = axes[1, 0]
    c_true = np.concatenate([r["world"].c for r in runs])
    c_hat = np.concatenate([r["c_hat_prompt"] for r in runs])
    fam = np.concatenate([r["world"].family for r in runs])
    for f, name in enumerate(gw.FAMILIES):
        ax.scatter(c_true[fam == f], c_hat[fam == f], s=5, alpha=0.5, label=name)
    ax.set(xscale="log", yscale="log", xlabel="true c(x)", ylabel="estimated ĉ(x) (φ* auto, mean over pairs)",
           title="the estimator from the reference's token entropies")
    ax.legend(fontsize=7)
    for ax, key in zip(axes[1, 1:], ("regret", "win_rate")):
        for li, level in enumerate(LEVELS):
            stats = [mean_ci(v) for v in per_seed(runs, level, key).T]
            x = np.arange(len(METHODS)) + 0.25 * (li - 1)
            err = [[s.mean - s.lo for s in stats], [s.hi - s.mean for s in stats]]
            ax.errorbar(x, [s.mean for s in stats], yerr=err, fmt="o", ms=4, capsize=3, label=level)
        ax.set_xticks(range(len(METHODS)), METHODS, fontsize=8, rotation=30)
        ax.set(ylabel=SUMMARIES[key][1], title=f"95% t-CI over {len(runs)} seeds")
        ax.legend(fontsize=7)
    save_figure(fig, path)


def write_results(path: str, cfg: dict[str, Any], agg: dict[str, Any], seeds: list[int], quick: bool) -> None:
    ref = agg["reference"]
    with open(f"{path}/results.md", "w") as fh:
        fh.write(f"# Generated language task with known dispersion ({'quick' if quick else 'full'}, seeds "
                 f"{seeds[0]}–{seeds[-1]})\n\n")
        fh.write(f"{len(seeds)} seeds; {cfg['prompts_per_family']} prompts per family × {len(gw.FAMILIES)} families "
                 f"({cfg['heldout_per_family']} per family held out); {gw.K} candidates per prompt; vocabulary "
                 f"{len(gw.VOCAB)} words; model {cfg['model']}; SFT {cfg['sft_steps']} steps × {cfg['sft_batch']} on "
                 f"{cfg['sft_samples']} sampled answers per prompt; {cfg['pairs_per_prompt']} preference pairs per "
                 f"training prompt, {cfg['heldout_pairs']} per held-out prompt; β ∈ {list(cfg['betas'])}; "
                 f"{cfg['steps']} Adam steps × {cfg['batch']} pairs at lr {cfg['lr']} for every policy.\n\n")
        fh.write(f"Reference: φ* auto = {Interval(**ref['phi_star']).fmt(3)}; mass off the candidate set "
                 f"{Interval(**ref['ref_other_mass']).fmt(4)}; total variation to the true answer distribution "
                 f"{Interval(**ref['ref_tv']).fmt(4)}. Held-out reward of the reference: "
                 + "; ".join(f"{lv} {Interval(**ref[f'ref_reward {lv}']).fmt(4)}" for lv in LEVELS)
                 + ". Accuracy of the true order on the held-out labels (the label-noise ceiling): "
                 + "; ".join(f"{lv} {Interval(**ref[f'accuracy_ceiling {lv}']).fmt(4)}" for lv in LEVELS) + ".\n\n")
        fh.write("Spearman correlation of the estimated ĉ(x) with the true c(x) over prompts, mean [95% t-CI] over "
                 "seeds:\n\n" + markdown_table(agg["agreement"]))
        fh.write("\nPer method and dispersion level of the held-out prompts, mean [95% t-CI] over seeds "
                 "(regret and accuracy: mean over β; win rate and reward: best β):\n\n")
        fh.write(markdown_table(agg["methods"]))
        if agg["tests"]:
            fh.write("\nPaired against DPO (per-seed summaries as above; t-test and exact sign-flip test; Holm over "
                     "the six comparisons of a metric and level):\n\n" + markdown_table(agg["tests"]))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = base_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default: the configuration's)")
    args = parser.parse_args(argv)
    configure_torch()
    cfg = CONFIGS["quick" if args.quick else "full"]
    # Seed 0 of base 0 served the pilot runs that chose the learning rate, steps and β grid: left out.
    seeds = [args.seed * 1000 + 1 + s for s in range(args.seeds or cfg["seeds"])]
    start = time.perf_counter()
    runs = []
    for seed in seeds:
        runs.append(run_seed(cfg, seed))
        print(f"seed {seed}: {runs[-1]['seconds']:.0f} s, Spearman(ĉ, c) {runs[-1]['spearman']['overall']:.3f}",
              file=sys.stderr)
    agg = aggregate(cfg, runs)
    path = out_dir(NAME, args.out)
    rows = [{"seed": r["seed"], "level": level, "method": method, "beta": float(beta),
             **{k: round(float(r["metrics"][level][k][m * len(cfg["betas"]) + b]), 6)
                for k in ("reward", "kl", "regret", "win_rate", "accuracy")}}
            for r in runs for level in LEVELS for m, method in enumerate(METHODS)
            for b, beta in enumerate(cfg["betas"])]
    write_csv(rows, f"{path}/per_seed.csv")
    write_csv(agg.pop("frontier"), f"{path}/frontier.csv")
    write_csv([{"seed": r["seed"], **{k: round(v, 6) for k, v in r["spearman"].items()},
                "phi_star": round(r["phi_star"], 6), "seconds": round(r["seconds"], 1)} for r in runs],
              f"{path}/seeds.csv")
    result = {"config": {**cfg, "seeds": seeds, "quick": args.quick}, **agg,
              "seconds": time.perf_counter() - start}
    write_json(result, f"{path}/summary.json")
    plot(cfg, runs, f"{path}/frontier.png")
    write_results(path, cfg, agg, seeds, args.quick)
    print(markdown_table(agg["agreement"]) + markdown_table(agg["methods"]), end="")
    print(f"wrote {path} in {result['seconds']:.0f} s", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
