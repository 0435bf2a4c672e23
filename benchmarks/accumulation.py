"""The cost of the float64 row sums in the torch backend's compiled CPU loops, against fp32 sums.

The compiled route (``mallowspo_fast.ops.torch_path``) sums each row's e^{z−m} and e^{z−m}·(z − m) in
float64 (``torch_rows.rows_forward(acc=...)``): H and lse come out as exact as the fp32 inputs allow,
at the price of a wider accumulator in the fused loop. This benchmark times the op's forward + backward
(ours, compiled route forced with ``MALLOWSPO_FAST_TORCH_COMPILE=1``) with float64 sums and with fp32 sums
side by side: each case in its own process, the two accumulators of a shape next to each other in every
round, samples pooled over the rounds (as ``benchmarks.op --rounds``). The backward has no row sums, so
the two differ in the forward only.

The accumulator is chosen per process before the first call: ``torch_path.COMPILED_ACC`` (the dtype the
compiled forward passes as ``acc``) when the library has that switch, else the compiled forward loop is
replaced by the same loop with the other ``acc`` (the only difference). Benchmark use only.

Usage::

    python -m benchmarks.accumulation --n 2048 4096 --vocab 32000 128256 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

import torch

from .harness import Case, Result, log, merge_results, run_case
from .report import write_report

ACCS = ("fp64", "fp32")
ACC_DTYPES = {"fp64": torch.float64, "fp32": torch.float32}
SWITCH = "COMPILED_ACC"  # module constant of mallowspo_fast.ops.torch_path
# the Inductor loops (the native C loops sum in fp32 blocks and float64 across them, whatever this switch)
COMPILED_ENV = {"MALLOWSPO_FAST_TORCH_COMPILE": "1", "MALLOWSPO_FAST_BACKEND": None, "MALLOWSPO_FAST_NATIVE": "0"}


def set_compiled_accumulation(acc: str) -> None:
    """Row-sum dtype of the compiled CPU loops for the rest of this process: "fp64" (the library's) or
    "fp32". Must run before the op's first call in the process (the compiled kernels are built once)."""
    if acc not in ACC_DTYPES:
        raise ValueError(f"acc must be one of {ACCS}, got {acc!r}")
    from mallowspo_fast.ops import torch_path, torch_rows

    if torch_path._CompileState.kernels:
        raise RuntimeError("set_compiled_accumulation: the compiled kernels of this process are already built; "
                           "choose the accumulator before the op's first call")
    dtype = ACC_DTYPES[acc]
    if hasattr(torch_path, SWITCH):
        setattr(torch_path, SWITCH, dtype)
        return

    # A library without the switch: the compiled forward with ``acc`` as its one difference.
    def compiled_forward(z, labels, mask, pre, post, softcap: bool, stats: bool):
        return torch_rows.rows_forward(z, labels, mask, pre, post, softcap=softcap, stats=stats, acc=dtype)

    torch_path._compiled_forward = compiled_forward


def build_case(spec: dict[str, Any]) -> Case:
    """The op's forward + backward case (``benchmarks.op``) of ``ours`` with the accumulator ``spec["acc"]``;
    fails unless the compiled route served it."""
    from mallowspo_fast.ops import torch_path

    from . import op

    case = op.build_case({**spec, "subject": "op", "provider": "ours"})
    case.fn(case.setup() if case.setup else None)  # compiles; then check which route ran
    if torch_path._CompileState.failed is not None or "fwd" not in torch_path._CompileState.kernels:
        raise RuntimeError(f"the compiled route did not run ({torch_path._CompileState.failed or 'not selected'})")
    case.notes = f"{spec['acc']} row sums"
    return case


def sweep(ns: list[int], vocabs: list[int], dtype: str, warmup: int, repeats: int, rounds: int,
          threads: int | None = None, log=log) -> list[Result]:
    """Every (N, V, accumulator) case of forward + backward, ``rounds`` times interleaved, pooled."""
    specs = [{"subject": "accumulation", "device": "cpu", "provider": "ours", "pass": "fwdbwd", "n": n,
              "vocab": v, "dtype": dtype, "acc": acc, "warmup": warmup, "repeats": repeats, "memory": False,
              "threads": threads, "env": COMPILED_ENV}
             for n in ns for v in vocabs for acc in ACCS]
    runs: list[list[Result]] = [[] for _ in specs]
    for r in range(rounds):
        for spec, done in zip(specs, runs):
            label = (f"accumulation N={spec['n']:<6d} V={spec['vocab']:<7d} {dtype} {spec['acc']} sums"
                     + (f" (round {r + 1}/{rounds})" if rounds > 1 else ""))
            done.append(run_case(spec, None, label, log))
    return [merge_results(done) if len(done) > 1 else done[0] for done in runs]


def cost_markdown(results: list[Result]) -> str:
    """Per shape: the fp64 and fp32 medians (wall and CPU time) and the relative cost of float64 sums."""
    by_shape: dict[tuple, dict[str, Result]] = {}
    for r in results:
        by_shape.setdefault((r.spec["n"], r.spec["vocab"], r.spec["dtype"]), {})[r.spec["acc"]] = r
    lines = ["| N | V | dtype | fp64 sums ms [p20, p80] | fp32 sums ms [p20, p80] | fp64 / fp32 (wall) "
             "| fp64 / fp32 (CPU time) |", "|---|---|---|---|---|---|---|"]
    for (n, v, dt), pair in by_shape.items():
        a, b = pair.get("fp64"), pair.get("fp32")
        if a is None or b is None or a.status != "ok" or b.status != "ok":
            bad = next((x for x in (a, b) if x is not None and x.status != "ok"), None)
            lines.append(f"| {n} | {v} | {dt} | {bad.status + ': ' + bad.notes if bad else 'missing'} | - | - | - |")
            continue
        ca, cb = a.extra.get("cpu_median_ms"), b.extra.get("cpu_median_ms")
        cpu = f"{ca / cb:.3f}×" if ca and cb else "-"
        lines.append(f"| {n} | {v} | {dt} | {a.median_ms:.1f} [{a.p20_ms:.1f}, {a.p80_ms:.1f}] | "
                     f"{b.median_ms:.1f} [{b.p20_ms:.1f}, {b.p80_ms:.1f}] | {a.median_ms / b.median_ms:.3f}× | {cpu} |")
    ratios = [pair["fp64"].median_ms / pair["fp32"].median_ms for pair in by_shape.values()
              if all(k in pair and pair[k].status == "ok" for k in ACCS)]
    if ratios:
        lines += ["", f"float64 sums cost {statistics.median(ratios):.3f}× the time of fp32 sums (median over "
                      f"{len(ratios)} shapes; range {min(ratios):.3f}–{max(ratios):.3f}×), forward + backward."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Time the op's forward + backward on the compiled CPU route with "
                                "float64 row sums and with fp32 row sums, side by side")
    p.add_argument("--n", type=int, nargs="+", default=[2048, 4096], help="tokens N")
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds whose samples are pooled")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per case (default: torch's)")
    p.add_argument("--out", default="bench_results", help="output folder (table, CSV)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    results = sweep(args.n, args.vocab, args.dtype, args.warmup, args.repeats, args.rounds, args.threads)
    print(write_report({"accumulation": results}, "cpu", args.out, {"float64 vs fp32 row sums":
                                                                      cost_markdown(results)},
                       plots=False, threads=args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
