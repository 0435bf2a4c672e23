"""Every figure quoted in the README and the docs matches the committed results it comes from.

Two mechanisms:

- a table preceded by ``<!-- quoted-from: results/<file> -->`` must be a verbatim excerpt of that file
  (header and rows);
- figures in the prose are listed below as claims: a phrase with ``{}`` where a number stands, and the
  values, read from the committed files (or computed from the code), that those numbers must show at
  the precision they are written with. Updating a results file and the text is all it takes; the test
  names the phrase and the value when they disagree.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from functools import cache

import pytest
from docs_helpers import DOCS, README, RESULTS, md_section_table, md_table, pages, read, rel

CPU = RESULTS / "benchmarks" / "cpu.md"
NUMBER = r"([+−-]?\d[\d,]*(?:\.\d+)?(?:e[+−-]?\d+)?)"


# ----------------------------------------------------------------------------------------------------
# Verbatim tables


def _quoted() -> list[tuple[str, str, list[str]]]:
    from docs_helpers import quoted_tables

    return [(rel(p), src, rows) for p in pages() for src, rows in quoted_tables(read(p))]


def test_quoted_tables_are_verbatim_excerpts() -> None:
    quoted = _quoted()
    assert len(quoted) >= 10, f"only {len(quoted)} quoted tables found"
    for page, src, rows in quoted:
        path = DOCS / src
        assert path.is_file(), f"{page}: quoted-from {src}, which does not exist"
        source_lines = {line.rstrip() for line in read(path).split("\n")}
        assert len(rows) >= 3, f"{page}: the table quoted from {src} has no rows"
        stale = [r for i, r in enumerate(rows) if i != 1 and r not in source_lines]
        assert not stale, f"{page}: rows quoted from {src} that are not in it (update them from the file): {stale}"


# ----------------------------------------------------------------------------------------------------
# Committed results


@cache
def cpu(section: str) -> list[dict[str, str]]:
    first = {"op": "| pass |", "linear": "| pass |", "loss_step": "| loss |", "train_step": "| model |"}[section]
    return md_section_table(CPU, section, first)


def cpu_rows(section: str, **where: str) -> list[dict[str, str]]:
    rows = [r for r in cpu(section) if all(r[k] == v for k, v in where.items())]
    assert rows, f"no {section} row of {rel(CPU)} with {where}"
    return rows


def cpu_row(section: str, **where: str) -> dict[str, str]:
    rows = cpu_rows(section, **where)
    assert len(rows) == 1, f"{len(rows)} {section} rows of {rel(CPU)} with {where}"
    return rows[0]


def median(row: dict[str, str]) -> float:
    return float(row["median ms [p20, p80]"].split()[0])


def mem_ratio(row: dict[str, str]) -> float:
    m = re.search(r"\(([\d.]+)×\)", row["extra peak MiB (× logits)"])
    assert m, row
    return float(m.group(1))


def ratio(row: dict[str, str], column: str) -> float:
    return float(row[column].rstrip("×"))


@cache
def summary(name: str) -> dict:
    return json.loads((RESULTS / name / "summary.json").read_text(encoding="utf-8"))


@cache
def tiny_runs() -> list[dict[str, str]]:
    with open(RESULTS / "tiny_lm" / "runs.csv", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def bandit_regret(regime: str, method: str) -> float:
    rows = md_table(RESULTS / "bandit" / "results.md", "| regime | method |")
    return next(float(r["regret"].split()[0]) for r in rows if r["regime"] == regime and r["method"] == method)


def bandit_tests(metric: str, regime: str | None = None) -> list[dict]:
    return [t for t in summary("bandit")["tests"] if t["metric"] == metric and regime in (None, t["regime"])]


def dispersion(estimator: str, key: str) -> float:
    return next(s[key] for s in summary("dispersion_vs_truth")["summary"] if s["estimator"] == estimator)


def dispersion_per_n(estimator: str, n: int) -> float:
    return next(s["phi_star_fit"] for s in summary("dispersion_vs_truth")["per_n"]
                if s["estimator"] == estimator and s["n"] == n)


def bundled_pairs() -> int:
    from mallowspo_fast.data import bundled_dataset_path

    with open(bundled_dataset_path(), encoding="utf-8") as f:
        return len(json.load(f))


def demo(key: str):
    from mallowspo_fast.trainer.demo import demo_defaults

    d = demo_defaults()
    return d["model_config"][key] if key in d["model_config"] else d[key]


# ----------------------------------------------------------------------------------------------------
# Claims: (page, phrase with {} for each number, function returning the values)


def _op(provider: str, condition: str = "quiet", pass_: str = "fwdbwd") -> dict[str, str]:
    return cpu_row("op", **{"pass": pass_, "N": "2048", "V": "32000", "condition": condition, "provider": provider})


def _op_pass(pass_: str, column: str, provider: str = "ours") -> list[float]:
    """``column`` of ``provider`` in the quiet condition, for every V of one pass of the op."""
    return [ratio(r, column) for r in cpu_rows("op", **{"pass": pass_, "condition": "quiet", "provider": provider})]


def _floor_ms(row: dict[str, str]) -> float:
    return float(row["floor ms"].split()[0])


def _run_date() -> list[float]:
    m = re.search(r"- date: (\d{4})-(\d{2})-(\d{2})", read(CPU).split("## ", 1)[0])
    assert m, "no date in the header of the CPU run"
    return [float(x) for x in m.groups()]


def _bandwidth() -> float:
    m = re.search(r"Floor of a case = max\(bytes / ([\d.]+) GB/s", read(CPU).split("## CPU floor", 1)[1])
    assert m, "no bandwidth in the CPU floor section"
    return float(m.group(1))


def _exp_rate() -> float:
    m = re.search(r"exp ([\d.]+) G/s", read(CPU).split("## CPU floor", 1)[1])
    assert m, "no exp rate in the CPU floor section"
    return float(m.group(1))


HEAD = ("ours", "compiled-loss", "compiled", "trl", "reference")


def _op_at(provider: str, vocab: int, pass_: str = "fwdbwd") -> dict[str, str]:
    return cpu_row("op", **{"pass": pass_, "N": "2048", "V": str(vocab), "condition": "quiet", "provider": provider})


def _faster(provider: str, vocab: int, pass_: str = "fwdbwd") -> float:
    return median(_op_at(provider, vocab, pass_)) / median(_op_at("ours", vocab, pass_))


def _speedup(provider: str, condition: str = "quiet") -> float:
    """How many times faster ours is than ``provider`` in the README's op case, from the medians shown."""
    return median(_op(provider, condition)) / median(_op("ours", condition))


def _loss(provider: str) -> dict[str, str]:
    return cpu_row("loss_step", loss="mallows_theta", provider=provider)


def _linear(provider: str) -> dict[str, str]:
    return cpu_row("linear", **{"pass": "fwdbwd", "provider": provider})


def _ours_speed(section: str, column: str) -> list[float]:
    return [ratio(r, column) for r in cpu_rows(section, provider="ours")]


def _logits_mib(row: dict[str, str]) -> float:
    return int(row["N"]) * int(row["V"]) * 4 / 2**20


def _default_rows(device: str) -> int:
    from mallowspo_fast.ops.linear import default_chunk_size

    return default_chunk_size(128256, device)


def _chunk_mib(kind: str) -> float:
    from mallowspo_fast.ops import linear

    return getattr(linear, f"CHUNK_BYTES_{kind}") / 2**20


def _tiny_acc() -> list[float]:
    return [float(r["eval_rewards/accuracies"]) for r in tiny_runs()]


def _tiny_seconds() -> list[float]:
    return [float(r["seconds"]) for r in tiny_runs()]


def _const(module: str, name: str) -> float:
    import importlib

    return getattr(importlib.import_module(f"mallowspo_fast.{module}"), name)


def _linear_default(flag: str, cuda: bool) -> list[float]:
    """Default of a ``python -m benchmarks.linear`` shape flag on CUDA or on CPU, read from its source."""
    source = (DOCS.parent / "benchmarks" / "linear.py").read_text(encoding="utf-8")
    m = re.search(rf'"--{flag}".*?default=\[([\d, ]+)\] if cuda else \[([\d, ]+)\]', source)
    assert m, f"benchmarks/linear.py: no CUDA/CPU default for --{flag}"
    return [float(x) for x in m.group(1 if cuda else 2).split(",")]


def _gpu_check_budget_s() -> float:
    from benchmarks.gpu_check.run import DEFAULT_BUDGET_S

    return DEFAULT_BUDGET_S


def _bandit_cfg(key: str):
    return summary("bandit")["config"][key]


_D = summary("tiny_lm")["dispersion"] if (RESULTS / "tiny_lm" / "summary.json").is_file() else {}
_SEQ_DIFFS_32 = [t["mean_diff"] for t in bandit_tests("regret", "32 pairs/prompt")]

CLAIMS: list[tuple[str, str, Callable[[], list[float]]]] = [
    # README headline table: ours, then the baselines side by side (HEAD)
    ("README.md", "| op, forward + backward, N = {}, V = {}: median ms | {} | {} | {} | {} | {} |",
     lambda: [2048, 32000, *(median(_op(p)) for p in HEAD)]),
    ("README.md", "| op, same case: × the machine's floor of {} ms | {}× | {}× | {}× | {}× | {}× |",
     lambda: [_floor_ms(_op("ours")), *(ratio(_op(p), "× floor") for p in HEAD)]),
    ("README.md", "| op, same case: extra peak memory (× logits) | {}× | {}× | {}× | {}× | {}× |",
     lambda: [mem_ratio(_op(p)) for p in HEAD]),
    ("README.md", "| op, same case, busy process (`thread` / `thread+mmap`): median ms | {} / {} | {} / {} | {} / {} "
     "| {} / {} | {} / {} |",
     lambda: [median(_op(p, c)) for p in HEAD for c in ("thread", "thread+mmap")]),
    ("README.md", "| MallowsPO-θ loss step, B = {}, T = {}, V = {}: median ms | {} | {} | {} | {} | {} |",
     lambda: [float(_loss("ours")[k]) for k in ("B", "T", "V")] + [median(_loss(p)) for p in HEAD]),
    ("README.md", "| memory mode, N = {}, H = {}, V = {}: extra peak memory (× logits) | {}× | - | {}× | {}× | {}× |",
     lambda: [float(_linear("ours-chunked")[k]) for k in ("N", "H", "V")]
     + [mem_ratio(_linear(p)) for p in ("ours-chunked", "compiled", "trl", "reference")]),
    ("README.md", "| memory mode, same case, forward + backward: median ms | {} | - | {} | {} | {} |",
     lambda: [median(_linear(p)) for p in ("ours-chunked", "compiled", "trl", "reference")]),
    ("README.md", "ours is {}× faster than `torch.compile` of the whole loss and {}× faster than TRL's one-read kernel",
     lambda: [_speedup("compiled-loss"), _speedup("trl")]),
    ("README.md", "with {}× the extra memory of the first and {}× that of the second",
     lambda: [mem_ratio(_op("ours")) / mem_ratio(_op(p)) for p in ("compiled-loss", "trl")]),
    ("README.md", "The memory mode holds {}× the logits in extra memory, where TRL's chunked head holds {}×, and is "
     "{}× faster than it",
     lambda: [mem_ratio(_linear("ours-chunked")), mem_ratio(_linear("trl")),
              median(_linear("trl")) / median(_linear("ours-chunked"))]),
    ("README.md", "regret at matched KL of {} against DPO's {} with unlimited data",
     lambda: [bandit_regret("infinite data", "theta_true"), bandit_regret("infinite data", "dpo")]),
    ("README.md", "but not with {} pairs per prompt", lambda: [min(r for r in _bandit_cfg("regimes") if r)]),
    ("README.md", "bundled real preference data ({} ShareGPT pairs)", lambda: [bundled_pairs()]),
    ("docs/getting-started.md", "bundled real preference data ({} ShareGPT pairs)", lambda: [bundled_pairs()]),
    # Benchmarks page highlights
    ("docs/benchmarks.md", "against `torch.compile` of the per-token reference (V = {} and {}), ours is "
     "{}–{}× faster in the forward, {}–{}× in the backward and {}–{}× in forward + backward; against the eager "
     "reference {}–{}×, {}–{}× and {}–{}×",
     lambda: [8192, 32000]
     + [f(_op_pass(p, "speed vs compiled")) for p in ("fwd", "bwd", "fwdbwd") for f in (min, max)]
     + [f(_op_pass(p, "speed vs ref")) for p in ("fwd", "bwd", "fwdbwd") for f in (min, max)]),
    ("docs/benchmarks.md", "the op, against `torch.compile` of the whole loss (quiet condition), is {}× (V = {}) and "
     "{}× (V = {}) faster in forward + backward, past our 2× goal; the forward alone is {}× faster (V = {})",
     lambda: [_faster("compiled-loss", 8192), 8192, _faster("compiled-loss", 32000), 32000,
              _faster("compiled-loss", 32000, "fwd"), 32000]
     if min(_faster("compiled-loss", v) for v in (8192, 32000)) >= 2 else [float("nan")] * 6),
    ("docs/benchmarks.md", "against TRL's one-read function, {}× faster in forward + backward at V = {} "
     "({}× at V = {})",
     lambda: [_faster("trl", 32000), 32000, _faster("trl", 8192), 8192]),
    ("docs/benchmarks.md", "against `torch.compile` of the whole step loss, {}× (`sigmoid`) and {}× (`mallows_theta`) "
     "faster",
     lambda: [median(cpu_row("loss_step", loss=x, provider="compiled-loss"))
              / median(cpu_row("loss_step", loss=x, provider="ours")) for x in ("sigmoid", "mallows_theta")]),
    ("docs/benchmarks.md", "TRL's `ChunkedLogProbFunction` takes {}× the logits and {}× our time",
     lambda: [mem_ratio(_linear("trl")), median(_linear("trl")) / median(_linear("ours-chunked"))]),
    ("docs/benchmarks.md", "against the machine's floor ({} G/s of exps, so fp32 is memory-bound here): the forward "
     "takes {}–{}× it, the backward {}–{}× and forward + backward {}–{}×; `torch.compile` of the per-token "
     "reference takes {}–{}× it in forward + backward",
     lambda: [_exp_rate()] + [f(_op_pass(p, "× floor")) for p in ("fwd", "bwd", "fwdbwd") for f in (min, max)]
     + [f(_op_pass("fwdbwd", "× floor", "compiled")) for f in (min, max)]),
    ("docs/benchmarks.md", "busy process at V = {}, forward + backward: ours {} ms (`thread`) and {} ms "
     "(`thread+mmap`) against {} ms quiet; `torch.compile` of the reference {} and {} ms",
     lambda: [32000, median(_op("ours", "thread")), median(_op("ours", "thread+mmap")), median(_op("ours")),
              median(_op("compiled", "thread")), median(_op("compiled", "thread+mmap"))]),
    ("docs/cpu-performance.md", "at N = 4096, V = 32000, fp32 the floor is 2·N·V = {} M exps at {} G/s, {} ms, against "
     "3·L = {} GB at {} GB/s, {} ms",
     lambda: [2 * 4096 * 32000 / 1e6, _exp_rate(), 2 * 4096 * 32000 / _exp_rate() / 1e6, 3 * 4096 * 32000 * 4 / 1e9,
              _bandwidth(), 3 * 4096 * 32000 * 4 / _bandwidth() / 1e6]),
    ("docs/cpu-performance.md", "The full suite's run on a quiet machine ([results/benchmarks/cpu.md]"
     "(results/benchmarks/cpu.md), {}-{}-{}) measured {} G/s of exps and {} GB/s of copy bandwidth",
     lambda: [*_run_date(), _exp_rate(),
              float(re.search(r"copy ([\d.]+) GB/s", read(CPU).split("## CPU floor", 1)[1]).group(1))]),
    ("docs/op.md", "Ours is the native route at this size: {}× faster than `torch.compile` of the whole loss "
     "quiet, {}× and {}× in the busy conditions ({}×, {}× and {}× faster than `torch.compile` of the per-token "
     "reference), at {}× the machine's floor ({} ms, memory-bound)",
     lambda: [_speedup("compiled-loss", c) for c in ("quiet", "thread", "thread+mmap")]
     + [_speedup("compiled", c) for c in ("quiet", "thread", "thread+mmap")]
     + [ratio(_op("ours"), "× floor"), _floor_ms(_op("ours"))]),
    ("docs/benchmarks.md", "the preference-loss step (B = {} pairs, T = {}, V = {}) is {}–{}× faster than compiled "
     "and {}–{}× faster than eager, at {}× the logits in extra memory (compiled: {}×, eager: {}×)",
     lambda: [float(_loss("ours")[k]) for k in ("B", "T", "V")]
     + [min(_ours_speed("loss_step", "speed vs compiled")), max(_ours_speed("loss_step", "speed vs compiled")),
        min(_ours_speed("loss_step", "speed vs ref")), max(_ours_speed("loss_step", "speed vs ref")),
        mem_ratio(_loss("ours")), mem_ratio(_loss("compiled")), mem_ratio(_loss("reference"))]),
    ("docs/benchmarks.md",
     "the tiny-Llama train step is {}–{}× faster than the reference path with {}× its extra memory",
     lambda: [min(_ours_speed("train_step", "speed vs ref")), max(_ours_speed("train_step", "speed vs ref")),
              ratio(cpu_rows("train_step", provider="ours")[0], "memory vs ref")]),
    ("docs/benchmarks.md", "(H = {}: the default {} MiB chunk is a fifth of the {} MiB logits) takes {}× the logits in "
     "extra memory, against {}× for the logits path, and {}× its time",
     lambda: [float(_linear("ours-chunked")["H"]), _chunk_mib("CPU"), _logits_mib(_linear("ours-chunked")),
              mem_ratio(_linear("ours-chunked")), mem_ratio(_linear("ours-logits")),
              median(_linear("ours-chunked")) / median(_linear("ours-logits"))]),
    # Memory mode page
    ("docs/memory-mode.md", "{} sequences × {} tokens × a 128k vocabulary is {} GB in bf16",
     lambda: [16, 4096, 16 * 4096 * 128256 * 2 / 1e9]),
    ("docs/memory-mode.md", "about {} MiB of fp32 logits per chunk on CPU ({} rows at V = 128256",
     lambda: [_chunk_mib("CPU"), _default_rows("cpu")]),
    ("docs/memory-mode.md", "{} MiB on GPUs ({} rows at V = 128256, a multiple of 64)",
     lambda: [_chunk_mib("ACCELERATOR"), _default_rows("meta")]),
    ("docs/memory-mode.md", "default CPU chunk (about {} MiB of fp32 logits) is a fifth of the {} MiB logits",
     lambda: [_chunk_mib("CPU"), _logits_mib(_linear("ours-chunked"))]),
    # Constants of the code quoted in the text
    ("docs/losses.md", "(official name `neg_log_dispersion_mean`, default {}", lambda: [_const("losses.dispersion",
                                                                                             "DEFAULT_PHI_STAR")]),
    ("docs/op.md", "eager chunks of a fixed number of rows (about {} MiB of logits each",
     lambda: [_const("ops.torch_path", "CHUNK_BYTES") / 2**20]),
    ("docs/op.md", "On CPU (fp32/bf16/fp16, V ≥ {}, a C++ compiler present)",
     lambda: [_const("ops.torch_path", "COMPILE_MIN_VOCAB")]),
    ("docs/op.md", "of V capped at {} KiB of input per block ({} bf16/fp16 columns, {} fp32)",
     lambda: [_const("ops.triton_path", "MAX_BLOCK_BYTES") / 2**10, _const("ops.triton_path", "MAX_BLOCK_BYTES") / 2,
              _const("ops.triton_path", "MAX_BLOCK_BYTES") / 4]),
    ("docs/training.md", "buffer shuffle of {} rows", lambda: [_const("trainer.batches", "STREAM_SHUFFLE_BUFFER")]),
    ("docs/benchmarks.md", "The GPU sweep of the memory mode is N = {} tokens, H = {}, V ∈ {{}, {}, {}}, bf16, every "
     "pass; on CPU it is N = {}, H = {}, V = {}, fp32",
     lambda: [*_linear_default("n", True), *_linear_default("hidden", True), *_linear_default("vocab", True),
              *_linear_default("n", False), *_linear_default("hidden", False), *_linear_default("vocab", False)]),
    ("README.md", "then the sweeps ({} min)", lambda: [_gpu_check_budget_s() / 60]),
    ("README.md", "kernel correctness, then the figures, in {} minutes", lambda: [_gpu_check_budget_s() / 60]),
    # Training page (demo)
    ("docs/training.md", "the {} demo runs of the tiny-LM experiment took {}–{} s each",
     lambda: [len(tiny_runs()), min(_tiny_seconds()), max(_tiny_seconds())]),
    ("docs/training.md", "fits the {} training pairs but does not generalise to the {} held-out pairs",
     lambda: [_D["pairs"], bundled_pairs() - _D["pairs"]]),
    ("docs/training.md", "(held-out reward accuracy {}–{} over those {} runs",
     lambda: [min(_tiny_acc()), max(_tiny_acc()), len(tiny_runs())]),
    ("docs/training.md", "(mean normalised entropy {} in seed 0 of that experiment)", lambda: [_D["e_mean"]]),
    ("docs/training.md", "comes out large ({} there)", lambda: [_D["phi_star_auto"]]),
    # The science page
    ("docs/science.md", "python -m experiments.dispersion_vs_truth # {} s in the committed run",
     lambda: [summary("dispersion_vs_truth")["seconds"]]),
    ("docs/science.md", "python -m experiments.bandit # {} s in the committed run",
     lambda: [summary("bandit")["seconds"]]),
    ("docs/science.md", "python -m experiments.tiny_lm # {} min ({} trainer runs)",
     lambda: [summary("tiny_lm")["seconds"] / 60, len(tiny_runs())]),
    ("docs/science.md", "n ∈ {{}, {}, {}, {}, {}}, {} values of −log φ in [{}, {}]",
     lambda: [*summary("dispersion_vs_truth")["config"]["ns"], summary("dispersion_vs_truth")["config"]["n_phi"],
              summary("dispersion_vs_truth")["config"]["c_min"], summary("dispersion_vs_truth")["config"]["c_max"]]),
    ("docs/science.md", "{} sampled rankings per point", lambda: [summary("dispersion_vs_truth")["config"]["samples"]]),
    ("docs/science.md", "Spearman 1 within each n for the exact forms; {}–{} pooled over n",
     lambda: [min(s["spearman_pooled"] for s in summary("dispersion_vs_truth")["summary"]),
              max(s["spearman_pooled"] for s in summary("dispersion_vs_truth")["summary"])]),
    ("docs/science.md", "pairwise marginal P(item d places better comes first) to {} (enumeration",
     lambda: [summary("dispersion_vs_truth")["phi_link_max_abs_err"]]),
    ("docs/science.md", "≈ {} for c < 0.3 and {} for c > 1 with the `sequence`",
     lambda: [dispersion("sequence", "loglog_slope_c<0.3"), dispersion("sequence", "loglog_slope_c>1.0")]),
    ("docs/science.md", "The fitted φ* depends on n ({} at n = 4 to {} at n = 16",
     lambda: [dispersion_per_n("sequence", 4), dispersion_per_n("sequence", 16)]),
    ("docs/science.md", "gives ĉ at a median {}–{}% of the truth here",
     lambda: [100 * min(s["median_ratio_at_0.29"] for s in summary("dispersion_vs_truth")["summary"]),
              100 * max(s["median_ratio_at_0.29"] for s in summary("dispersion_vs_truth")["summary"])]),
    ("docs/science.md", "{} prompts × {} arms; c(x) log-uniform in [{}, {}]",
     lambda: [_bandit_cfg("prompts"), _bandit_cfg("arms"), _bandit_cfg("c_min"), _bandit_cfg("c_max")]),
    ("docs/science.md", "β ∈ {} values from {} to {}",
     lambda: [len(_bandit_cfg("betas")), min(_bandit_cfg("betas")), max(_bandit_cfg("betas"))]),
    ("docs/science.md", "({} Adam steps, lr {})", lambda: [_bandit_cfg("steps"), _bandit_cfg("lr")]),
    ("docs/science.md", "φ_ref = φ^{exp({}·η)}", lambda: [_bandit_cfg("est_noise")]),
    ("docs/science.md", "Spearman(ĉ, c) = {} [{}, {}]",
     lambda: [summary("bandit")["spearman_c_hat"][k] for k in ("mean", "lo", "hi")]),
    ("docs/science.md", "({} fresh pairs per prompt)", lambda: [_bandit_cfg("test_pairs")]),
    ("docs/science.md", "{} seeds; per seed each method", lambda: [_bandit_cfg("seeds")]),
    ("docs/science.md", "Three data regimes: {} and {} pairs per prompt",
     lambda: [r for r in _bandit_cfg("regimes") if r]),
    ("docs/science.md", "mean [95% t-CI] over {} seeds (regret", lambda: [_bandit_cfg("seeds")]),
    ("docs/science.md", "with {} seeds the smallest Holm-adjusted sign-flip p is {}",
     lambda: [_bandit_cfg("seeds"), min(t["p_signflip_holm"] for t in bandit_tests("regret"))]),
    ("docs/science.md", "limit their regret is {} vs DPO's {} (Holm-adjusted sign-flip p = {})",
     lambda: [bandit_regret("infinite data", "theta_true"), bandit_regret("infinite data", "dpo"),
              next(t["p_signflip_holm"] for t in bandit_tests("regret", "infinite data")
                   if t["comparison"].startswith("theta_true"))]),
    ("docs/science.md", "about a third of that ({} vs {})",
     lambda: [bandit_regret("infinite data", "theta_est"), bandit_regret("infinite data", "dpo")]),
    ("docs/science.md", "with {} pairs per prompt every MallowsPO variant is *worse* than DPO (+{} to +{} regret",
     lambda: [min(r for r in _bandit_cfg("regimes") if r), min(_SEQ_DIFFS_32), max(_SEQ_DIFFS_32)]),
    ("docs/science.md", "(the label-noise ceiling is {})", lambda: [summary("bandit")["heldout_ceiling"]["mean"]]),
    ("docs/science.md", "(hidden {}, {} layers), a {}-token BPE tokenizer trained on the bundled {} ShareGPT pairs, "
     "an {}-step SFT warm-up",
     lambda: [demo("hidden_size"), demo("num_hidden_layers"), demo("tokenizer_vocab_size"), bundled_pairs(),
              demo("sft_warmup_steps")]),
    ("docs/science.md", "{}% of the pairs ({}) held out, β = {}, {} epochs = {} optimizer steps",
     lambda: [100 * demo("eval_ratio"), bundled_pairs() - _D["pairs"], demo("beta"), demo("num_train_epochs"),
              float(tiny_runs()[0]["step"])]),
    ("docs/science.md", "mean [95% t-CI] over {} seeds (`python -m experiments.tiny_lm`, {} trainer runs, {} min",
     lambda: [len(summary("tiny_lm")["config"]["seeds"]), len(tiny_runs()), summary("tiny_lm")["seconds"] / 60]),
    ("docs/science.md", "(mean ē {}), so with φ* = auto ({} here) c(x) has mean {} and standard deviation {}, "
     "with 10/50/90% quantiles {}, {} and {} and a long left tail down to {}",
     lambda: [_D["e_mean"], _D["phi_star_auto"], _D["c_mean"], _D["c_std"], *_D["c_quantiles_10_50_90"],
              _D["c_min"]]),
    ("docs/science.md", "is significant at {} seeds", lambda: [len(summary("tiny_lm")["config"]["seeds"])]),
    ("docs/science.md", "memorises its {} training pairs and does not generalise to the {} held-out ones "
     "(held-out accuracy {}–{} over the {} runs, where one pair is {})",
     lambda: [_D["pairs"], bundled_pairs() - _D["pairs"], min(_tiny_acc()), max(_tiny_acc()), len(tiny_runs()),
              1 / (bundled_pairs() - _D["pairs"])]),
    ("docs/science.md", "rank correlation yes (part 1, and {} for a miscalibrated",
     lambda: [summary("bandit")["spearman_c_hat"]["mean"]]),
]


def _routes() -> list[dict[str, str]]:
    return md_table(RESULTS / "benchmarks" / "cpu_routes_cpu.txt", "| N | V |")


def _route(setting: str, pass_: str, n: str = "2048", vocab: str = "32000", dtype: str = "fp32") -> float:
    return next(float(r[f"{pass_} ms"]) for r in _routes() if (r["N"], r["V"], r["dtype"], r["setting"])
                == (n, vocab, dtype, setting))


def _route_fwd_gains() -> list[float]:
    """Forward speed-up of the native loops over the Inductor ones on the same pages, every shape and dtype."""
    return [_route(f"inductor, {pg}", "fwd", r["N"], r["V"], r["dtype"]) / float(r["fwd ms"])
            for r in _routes() for pg in ("4 KiB", "huge") if r["setting"] == f"native, {pg}"]


def _worst_inductor_huge() -> list[float]:
    rows = [r for r in _routes() if r["setting"] == "inductor, huge" and r["dtype"] == "fp32"]
    r = min(rows, key=lambda r: float(r["fwd+bwd speed-up vs inductor, 4 KiB"].rstrip("x")))
    return [float(r["fwd+bwd speed-up vs inductor, 4 KiB"].rstrip("x")), float(r["N"]), float(r["V"])]


SWEEP = RESULTS / "benchmarks" / "op_cpu_goal_sweep" / "results.md"
BUSY = ("quiet", "thread", "thread+mmap")


def _sweep(provider: str = "ours", conditions: tuple[str, ...] = ("quiet",), dtype: str | None = None
           ) -> list[dict[str, str]]:
    return [r for r in md_table(SWEEP, "| pass |") if r["provider"] == provider and r["condition"] in conditions
            and dtype in (None, r["dtype"])]


def _sweep_speed(conditions: tuple[str, ...]) -> list[float]:
    return [float(r["speed vs strongest compiled"].split("×")[0]) for r in _sweep(conditions=conditions)]


def _sweep_floor(dtype: str) -> list[float]:
    return [ratio(r, "× floor") for r in _sweep(dtype=dtype)]


def _sweep_rates() -> list[float]:
    m = re.search(r"copy ([\d.]+) GB/s .*?exp ([\d.]+) G/s", read(SWEEP).split("## floor", 1)[1])
    assert m, "no floor rates in the sweep's report"
    return [float(m.group(2)), float(m.group(1))]


def _profile(route: str, condition: str = "quiet") -> dict[str, str]:
    rows = md_table(RESULTS / "benchmarks" / "profile_native_cpu.md", "| route |")
    return next(r for r in rows if r["route"] == route and r["condition"] == condition)


CLAIMS += [
    ("docs/cpu-performance.md", "the gradient's 250 MiB cost {} page faults per call (quiet); on huge pages {}, and",
     lambda: [_as_float(_profile(r)["minor faults / call"]) for r in ("native-4k", "native")]),
    ("README.md", "quiet and busy, ours is {}–{}× faster than the whole-loss baseline, and {}–{}× when both run "
     "with PyTorch's huge-page allocator",
     lambda: [min(_sweep_speed(BUSY)), max(_sweep_speed(BUSY)), min(_sweep_speed(("thp",))),
              max(_sweep_speed(("thp",)))]),
    ("docs/cpu-performance.md", "in the quiet and the two busy conditions ours is {}–{}× faster than "
     "`torch.compile` of the whole loss, at every one of the {} cases",
     lambda: [min(_sweep_speed(BUSY)), max(_sweep_speed(BUSY)), len(_sweep_speed(BUSY))]
     if min(_sweep_speed(BUSY)) >= 2 else [float("nan")] * 3),
    ("docs/cpu-performance.md", "ours is {}–{}× faster: the goal holds at {} of the {}, not at N = 2048, V = 32000, "
     "bf16",
     lambda: [min(_sweep_speed(("thp",))), max(_sweep_speed(("thp",))),
              sum(v >= 2 for v in _sweep_speed(("thp",))), len(_sweep_speed(("thp",)))]),
    ("docs/cpu-performance.md", "this run measured {} G/s of exps (the native loops' exponential summed over "
     "cache-resident data) and {} GB/s", _sweep_rates),
    ("docs/cpu-performance.md", "ours is within 2× of the floor at {} of the {} fp32 shapes quiet ({}–{}×)",
     lambda: [sum(v <= 2.0 for v in _sweep_floor("fp32")), len(_sweep_floor("fp32")), min(_sweep_floor("fp32")),
              max(_sweep_floor("fp32"))]),
    ("docs/cpu-performance.md", "ours is at {}–{}× its floor quiet, at no bf16 shape within 2×",
     lambda: [min(_sweep_floor("bf16")), max(_sweep_floor("bf16"))] if max(_sweep_floor("bf16")) > 2
     and min(_sweep_floor("bf16")) > 2 else [float("nan")] * 2),
    ("docs/cpu-performance.md", "(2.4× the exp-only time: {} ms for the {} M exps of N = 2048, V = 32000 with every "
     "7th row masked, which take {} ms at {} G/s",
     lambda: [_route("native, huge", "fwd", dtype="bf16"), 2048 * 32000 * 6 / 7 / 1e6,
              2048 * 32000 * 6 / 7 / (_sweep_rates()[0] * 1e9) * 1e3, _sweep_rates()[0]]),
    ("docs/cpu-performance.md", "the gradient's arithmetic and stores into 125 MiB of fresh pages ({} ms)",
     lambda: [_route("native, huge", "fwd+bwd", dtype="bf16") - _route("native, huge", "fwd", dtype="bf16")]),

    ("docs/cpu-performance.md", "The forward is {}–{}× faster in the native loops",
     lambda: [min(_route_fwd_gains()), max(_route_fwd_gains())]),
    ("docs/cpu-performance.md", "on ordinary pages the native forward + backward at N = 2048, V = 32000, fp32 takes "
     "{} ms, on huge pages {} ms",
     lambda: [_route("native, 4 KiB", "fwd+bwd"), _route("native, huge", "fwd+bwd")]),
    ("docs/cpu-performance.md", "make forward + backward {}–{}× faster than the Inductor loops on ordinary pages",
     lambda: [f(float(r["fwd+bwd speed-up vs inductor, 4 KiB"].rstrip("x")) for r in _routes()
                if r["setting"] == "native, huge") for f in (min, max)]),
    ("docs/cpu-performance.md", "Huge pages alone help the Inductor loops less, and not at every shape ({}× at N = {}, "
     "V = {}, fp32 in this run)",
     lambda: _worst_inductor_huge()),
]


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def _as_float(shown: str) -> float:
    return float(shown.replace(",", "").replace("−", "-"))


def _tolerance(shown: str) -> float:
    """Half a unit of the last digit shown: 0.44 stands for [0.435, 0.445]."""
    shown = shown.replace(",", "").lstrip("+−-")
    mantissa, _, exponent = shown.partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 0.5 * 10 ** -decimals * 10 ** int(exponent.replace("−", "-") or 0)


def _claim_regex(phrase: str) -> re.Pattern:
    parts = [re.escape(_squash(p)).replace(r"\ ", " ") for p in phrase.split("{}")]
    return re.compile(NUMBER.join(parts))


@pytest.mark.parametrize("page,phrase,values", CLAIMS, ids=[f"{p}:{s[:40]}" for p, s, _ in CLAIMS])
def test_quoted_figure_matches_its_source(page: str, phrase: str, values: Callable[[], list[float]]) -> None:
    text = _squash(read(README if page == "README.md" else DOCS.parent / page))
    m = _claim_regex(phrase).search(text)
    assert m, f"{page}: the phrase {phrase!r} is gone (reworded?); keep the figure it quotes checked"
    want = values()
    shown = m.groups()
    assert len(shown) == len(want), (phrase, shown, want)
    wrong = [(s, w) for s, w in zip(shown, want) if abs(_as_float(s) - float(w)) > _tolerance(s) + 1e-12]
    assert not wrong, f"{page}: {phrase!r}: shown vs committed value: {wrong}"


def test_qualitative_claims_hold() -> None:
    """The words around the figures: 'a fifth', 'about a third', 'significant', 'less than 0.002'."""
    lin = _linear("ours-chunked")
    assert 0.15 < _chunk_mib("CPU") / _logits_mib(lin) < 0.25
    dpo, true, est = (bandit_regret("infinite data", m) for m in ("dpo", "theta_true", "theta_est"))
    assert 0.25 < (dpo - est) / (dpo - true) < 0.42
    assert all(t["p_signflip_holm"] < 0.05 and t["mean_diff"] > 0 for t in bandit_tests("regret", "32 pairs/prompt"))
    accuracy_diffs = [abs(t["mean_diff"]) for m in ("heldout_accuracy", "ranking_accuracy") for t in bandit_tests(m)]
    assert max(accuracy_diffs) < 0.002
    assert all(t["p_signflip_holm"] >= 0.05 for m in ("heldout_accuracy", "ranking_accuracy") for t in bandit_tests(m))
    assert all(t["p_t"] >= 0.05 and t["p_signflip"] >= 0.05 for t in summary("tiny_lm")["tests"])
    assert all(s["spearman_within_n_min"] == 1 for s in summary("dispersion_vs_truth")["summary"]
               if s["estimator"] != "sequence_sampled")
    text = read(DOCS / "science.md")
    assert "no comparison significant after Holm" in text and "less than 0.002 in every regime" in text


def test_machine_of_the_committed_cpu_run() -> None:
    """Pages that quote the committed CPU run describe its machine as the run's header does."""
    header = read(CPU).split("## ", 1)[0]
    device = re.search(r"- device: (.*)", header).group(1)
    torch_version = re.search(r"- torch: (\d+\.\d+)", header).group(1)
    cores = re.search(r"\((\d+) threads\)", device).group(1)
    date = re.search(r"- date: (\d{4}-\d{2}-\d{2})", header).group(1)
    vendor = re.match(r"(AMD EPYC|Intel Xeon)", device)
    assert vendor, device
    machine = rf"(\d+)-core {vendor.group(1)} (?:VM|virtual machine), torch (\d+\.\d+)"
    for page in (README, DOCS / "op.md", DOCS / "memory-mode.md", DOCS / "benchmarks.md"):
        text = _squash(read(page))
        other = {"AMD EPYC": "Intel Xeon", "Intel Xeon": "AMD EPYC"}[vendor.group(1)]
        assert other not in text, (rel(page), f"names {other}; the run's machine is {device}")
        for m in re.finditer(machine, text):
            assert (m.group(1), m.group(2)) == (cores, torch_version), (rel(page), m.group(0), cores, torch_version)
        m = re.search(machine + r"[^)]*?(\d{4}-\d{2}-\d{2})", text)
        assert m, rel(page)
        assert m.group(3) == date, (rel(page), m.group(0), date)
    # "fp32 forward + backward is memory-bound here": the floor of the quoted op case is set by the bytes
    assert _op("ours")["floor ms"].endswith("(memory)")
    assert "fp32 forward + backward is memory-bound here" in _squash(read(README))


def test_launch_heuristics_table_is_the_code() -> None:
    import torch

    from mallowspo_fast.ops.triton_path import launch_config

    rows = md_table(DOCS / "op.md", "| V | bf16/fp16")
    assert len(rows) >= 4
    for row in rows:
        vocab = int(row["V"].replace(",", ""))
        for column, dtypes in (("bf16/fp16: BLOCK_V, warps, loop trips", (torch.bfloat16, torch.float16)),
                               ("fp32: BLOCK_V, warps, loop trips", (torch.float32,))):
            block, warps, trips = (int(x) for x in row[column].split(","))
            for dtype in dtypes:
                assert launch_config(vocab, dtype) == (block, warps), (vocab, dtype, row[column])
                assert -(-vocab // block) == trips, (vocab, block, trips)


def test_quoted_text_outputs_are_the_committed_files() -> None:
    """A ``text`` block right after a link to a committed ``results/...txt`` file shows lines of that file."""
    found = 0
    for page in pages():
        text = read(page)
        for m in re.finditer(r"\]\((results/[\w/.-]+\.txt)\)\):?\s*\n\s*```text\n(.*?)```", text, re.S):
            source = {line.strip() for line in read(DOCS / m.group(1)).split("\n") if line.strip()}
            shown = [line.strip() for line in m.group(2).split("\n") if line.strip()]
            assert shown and all(line in source for line in shown), f"{rel(page)}: {m.group(1)} quoted wrongly"
            found += 1
    assert found >= 2, f"only {found} quoted text outputs found"
