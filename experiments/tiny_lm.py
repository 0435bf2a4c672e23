"""Part 3: DPO vs MallowsPO-θ vs MallowsPO-φ end to end with the trainer, on the bundled real pairs.

Every run is the trainer's embedded demo (``python -m mallowspo_fast.train --demo``: a tiny Llama-style
model, a BPE tokenizer trained on the bundled 300 ShareGPT pairs, an SFT warm-up on the chosen responses
that becomes the reference, 10% of the pairs held out) with only ``loss_type`` and ``seed`` changed, so
the three losses share data, model, β, steps, learning-rate schedule and (for a seed) the reference.
MallowsPO uses the estimator of spec §2 with phi_star="auto" (mean c(x) = 1, so β means what it means
in DPO). Each run is a subprocess: DeepSpeed initialises its process group once per process.

Reported: the held-out reward accuracy and margin at the end (the trainer's eval_rewards/accuracies and
eval_rewards/margins; margins are β·(log-ratio difference), never scaled by c) per method as mean and
95% t-interval over seeds, paired differences against DPO (t-test and exact sign-flip test), and the
distribution of c(x) over the training pairs under the reference (the paper's histogram), read from the
trainer's reference cache.

Run: ``python -m experiments.tiny_lm [--quick] [--out DIR] [--seed S] [--seeds N]``.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch

import mallowspo_fast as mpf

from .common import (
    REPO_ROOT,
    base_parser,
    configure_torch,
    markdown_table,
    mean_ci,
    out_dir,
    paired_comparison,
    pyplot,
    save_figure,
    write_csv,
    write_json,
)

NAME = "tiny_lm"
METHODS = ("sigmoid", "mallows_theta", "mallows_phi")
LABELS = {"sigmoid": "DPO", "mallows_theta": "MallowsPO-θ", "mallows_phi": "MallowsPO-φ"}
# Keys every run sets on top of the demo defaults: quiet, no export, no intermediate checkpoints.
COMMON = {"report_to": "none", "disable_tqdm": "true", "plot_curves": "false", "export_model": "false",
          "save_steps": "0", "save_total_limit": "1"}
CONFIGS: dict[str, dict[str, Any]] = {
    "full": {"seeds": 8, "overrides": {}},
    # A smoke configuration: a few steps of a smaller model on a slice of the data (checks the plumbing,
    # not the science).
    "quick": {"seeds": 2, "overrides": {
        "max_steps": "3", "sft_warmup_steps": "3", "max_train_samples": "24", "max_eval_samples": "16",
        "max_length": "96", "max_prompt_length": "48", "tokenizer_vocab_size": "512", "eval_ratio": "0.2",
        "model_config.hidden_size": "32", "model_config.intermediate_size": "64",
        "model_config.num_hidden_layers": "1", "logging_steps": "1", "eval_steps": "3",
        "per_device_train_batch_size": "4", "per_device_eval_batch_size": "8"}},
}
EVAL_KEYS = ("eval_rewards/accuracies", "eval_rewards/margins", "eval_loss")


def run_one(method: str, seed: int, overrides: dict[str, str], workdir: str) -> dict[str, Any]:
    """One trainer run in a subprocess; returns its last evaluation record and the run folder."""
    run_dir = os.path.join(workdir, f"{method}_seed{seed}")
    args = {**COMMON, **overrides, "loss_type": method, "seed": str(seed), "output_dir": run_dir,
            # The reference (the SFT warm-up of this seed) is the same for the three losses: share its cache.
            "ref_cache_dir": os.path.join(workdir, f"ref_cache_seed{seed}")}
    cmd = [sys.executable, "-m", "mallowspo_fast.train", "--demo", *(f"{k}={v}" for k, v in args.items())]
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
           "PYTHONPATH": os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"trainer run {method} seed {seed} failed (exit {proc.returncode}):\n"
                           f"{' '.join(cmd)}\n{proc.stderr[-3000:]}")
    records = _read_jsonl(os.path.join(run_dir, "logs", "metrics.jsonl"))
    evals = [r for r in records if all(k in r for k in EVAL_KEYS)]
    if not evals:
        raise RuntimeError(f"trainer run {method} seed {seed}: no record with {EVAL_KEYS} in {run_dir}/logs")
    last = evals[-1]
    return {"method": method, "seed": seed, "step": last["step"], "seconds": time.perf_counter() - start,
            **{k: float(last[k]) for k in EVAL_KEYS}, "ref_cache": args["ref_cache_dir"]}


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"expected the trainer's metrics file at {path}")
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def dispersion_of(ref_cache: str) -> dict[str, np.ndarray]:
    """ē(x) and c(x) (φ* auto, as in training) of every training pair, from the reference cache."""
    files = sorted(glob.glob(os.path.join(ref_cache, "reference_*.pt")))
    if not files:
        raise FileNotFoundError(f"no reference cache (reference_*.pt) under {ref_cache}")
    # The train split is the largest table (the eval split is 10%).
    table = max((torch.load(f, map_location="cpu", weights_only=True) for f in files),
                key=lambda t: len(t["chosen_logps"]))
    vocab = int(table["vocab_size"])
    ent_w, ent_l = table["chosen_entropy"].double(), table["rejected_entropy"].double()
    n_w, n_l = table["chosen_num_tokens"], table["rejected_num_tokens"]
    empty = mpf.empty_response_pairs(n_w, n_l)
    e = mpf.pair_entropy(ent_w, ent_l, vocab)
    phi_star = mpf.auto_phi_star(e, empty_pairs=empty)
    c = mpf.neg_log_dispersion(ent_w, ent_l, vocab, phi_star=phi_star, chosen_num_tokens=n_w,
                               rejected_num_tokens=n_l)
    return {"e": e[~empty].numpy(), "c": c[~empty].numpy(), "phi_star": np.array(phi_star)}


def summarise(runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    seeds = sorted({r["seed"] for r in runs})
    value = {(r["method"], r["seed"]): r for r in runs}
    table, tests = [], []
    for m in METHODS:
        row: dict[str, Any] = {"method": LABELS[m], "loss_type": m, "seeds": len(seeds)}
        for k in EVAL_KEYS:
            row[k] = mean_ci([value[m, s][k] for s in seeds]).fmt(4)
        table.append(row)
    if len(seeds) >= 2:
        for m in METHODS[1:]:
            for k in ("eval_rewards/accuracies", "eval_rewards/margins"):
                t = paired_comparison([value[m, s][k] for s in seeds],
                                      [value["sigmoid", s][k] for s in seeds])
                tests.append({"metric": k, "comparison": f"{LABELS[m]} − DPO", "mean_diff": t.mean_diff,
                              "ci95": f"[{t.ci.lo:.4f}, {t.ci.hi:.4f}]", "p_t": t.p_t,
                              "p_signflip": t.p_signflip, "n_seeds": t.n})
    return table, tests


def plot(runs: list[dict[str, Any]], disp: dict[str, np.ndarray], path: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    axes[0].hist(disp["c"], bins=30, color="tab:blue", alpha=0.8)
    axes[0].set(xlabel="c(x) = −log φ(x)", ylabel="training pairs",
                title=f"dispersion over prompts (φ* auto = {float(disp['phi_star']):.3f})")
    axes[1].hist(disp["e"], bins=30, color="tab:green", alpha=0.8)
    axes[1].set(xlabel="normalised entropy ē(x)", ylabel="training pairs", title="reference entropy ē(x)")
    seeds = sorted({r["seed"] for r in runs})
    for i, m in enumerate(METHODS):
        acc = [next(r for r in runs if r["method"] == m and r["seed"] == s)["eval_rewards/accuracies"]
               for s in seeds]
        ci = mean_ci(acc)
        axes[2].errorbar([i], [ci.mean], yerr=[[ci.mean - ci.lo], [ci.hi - ci.mean]], fmt="o", capsize=4)
        axes[2].scatter(np.full(len(acc), i + 0.12), acc, s=10, color="gray")
    axes[2].set_xticks(range(len(METHODS)), [LABELS[m] for m in METHODS])
    axes[2].set(ylabel="held-out reward accuracy", title=f"end of training, {len(seeds)} seeds (95% t-CI)")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = base_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default: 8, quick: 2)")
    parser.add_argument("--workdir", default=None, help="where the runs go (default: a temporary folder)")
    args = parser.parse_args(argv)
    configure_torch()
    cfg = CONFIGS["quick" if args.quick else "full"]
    n_seeds = args.seeds or cfg["seeds"]
    seeds = [args.seed + s for s in range(n_seeds)]
    path = out_dir(NAME, args.out)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mallowspo_tiny_lm_") as tmp:
        workdir = args.workdir or tmp
        runs = []
        for seed in seeds:
            for m in METHODS:
                runs.append(run_one(m, seed, cfg["overrides"], workdir))
                print(f"{m} seed {seed}: held-out accuracy {runs[-1]['eval_rewards/accuracies']:.4f} "
                      f"({runs[-1]['seconds']:.0f} s)", file=sys.stderr)
        disp = dispersion_of(runs[0]["ref_cache"])
    table, tests = summarise(runs)
    write_csv([{k: v for k, v in r.items() if k != "ref_cache"} for r in runs], f"{path}/runs.csv")
    c = disp["c"]
    dispersion = {"phi_star_auto": float(disp["phi_star"]), "pairs": int(c.size), "c_mean": float(c.mean()),
                  "c_std": float(c.std()), "c_min": float(c.min()), "c_max": float(c.max()),
                  "c_quantiles_10_50_90": np.quantile(c, [0.1, 0.5, 0.9]).tolist(),
                  "e_mean": float(disp["e"].mean())}
    result = {"config": {**cfg, "seeds": seeds, "quick": args.quick}, "table": table, "tests": tests,
              "dispersion": dispersion, "seconds": time.perf_counter() - start}
    write_json(result, f"{path}/summary.json")
    plot(runs, disp, f"{path}/tiny_lm.png")
    with open(f"{path}/results.md", "w") as fh:
        fh.write(f"# Tiny LM, trainer demo ({'quick' if args.quick else 'full'}, seeds {seeds})\n\n")
        fh.write("Held-out metrics at the end of training, mean [95% t-CI] over seeds:\n\n")
        fh.write(markdown_table(table))
        if tests:
            fh.write("\nPaired against DPO (same seed = same data split, model init and reference):\n\n")
            fh.write(markdown_table(tests))
        d = dispersion
        fh.write(f"\nc(x) over the {d['pairs']} training pairs of seed {seeds[0]} (φ* auto = "
                 f"{d['phi_star_auto']:.4f}): mean {d['c_mean']:.3f}, std {d['c_std']:.3f}, "
                 f"range [{d['c_min']:.3f}, {d['c_max']:.3f}], mean ē {d['e_mean']:.3f}.\n")
    print(markdown_table(table) + (markdown_table(tests) if tests else ""), end="")
    print(f"wrote {path} in {result['seconds']:.0f} s", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
