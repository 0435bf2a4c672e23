"""Correctness of every Triton kernel variant the public ops launch: the plan of checks, launch
coverage against the ahead-of-time enumeration, and the child-process entry point.

Runs in its own process, one per group (every dtype and V; then the large-offset check)::

    python -m benchmarks.gpu_check.correctness '<json group>'

so that a device fault in one group cannot take the others (or the sweeps) down with it, and so that
``TRITON_INTERPRET=1`` (dry run on CPU) is in the environment before Triton is imported. Each check
prints one JSON row after :data:`~benchmarks.gpu_check.checks.MARKER` as soon as it is done; the parent
collects what came out even when it had to stop the process at the deadline. The checks themselves are
in :mod:`benchmarks.gpu_check.checks`.
"""

from __future__ import annotations

import json
import math
import sys
import time
import traceback
from typing import Any

from mallowspo_fast.testing import DTYPE_NAMES, DTYPES_BY_NAME

from .checks import CHECKS, UPSTREAMS, emit

# Options of a check and their defaults; a check's name lists those it changes, in this order (the
# upstream grads last, so that no check's name is a prefix of another's: --inject-error matches substrings).
OPTION_DEFAULTS = {"temperature": 1.0, "softcap": None, "logit_scale": 1.0, "stats": False, "inplace": False,
                   "upstream": "both", "labels": True}
# The soft-capped transform of the checks: Gemma's cap, a logit scale and a temperature (z within ±cap/T).
SOFTCAP = {"softcap": 30.0, "logit_scale": 2.0, "temperature": 0.7}

# ---------------------------------------------------------------------------------------------- plan


def group_checks(group: dict[str, Any]) -> list[dict[str, Any]]:
    """The checks of one group in run order. For each dtype and V: every public op on its Triton path
    with each option (transforms, statistics, in place, which upstream grads); then the reduction block
    sweep, the out-of-range labels (the checks most likely to fault a device, so that a fault costs the
    fewest rows) and the large-offset check."""
    shape = group["shape"]
    checks: list[dict[str, Any]] = []

    def add(kind, op, dtype, vocab, **options):
        given = {**OPTION_DEFAULTS, **options}
        opts = " ".join(f"{k}={given[k]}" for k, default in OPTION_DEFAULTS.items() if given[k] != default)
        name = f"{kind}/{op}/{dtype}/V={vocab}" + (f"/{opts.replace(' ', '/')}" if opts else "")
        checks.append({"check": name, "kind": kind, "op": op, "dtype": dtype, "vocab": vocab, "shape": shape,
                       "options": opts, "seed": len(checks), "inject": group.get("inject"), **OPTION_DEFAULTS,
                       **options})

    mm = {"hidden": group.get("hidden", 64), "chunk_size": group.get("chunk_size", 8)}
    dtypes = group.get("dtypes", [])
    for dtype in dtypes:
        for vocab in group["vocabs"]:
            for op in ("token_logprobs", "sequence_logprobs"):
                for upstream in UPSTREAMS:
                    add("values", op, dtype, vocab, upstream=upstream)
                add("values", op, dtype, vocab, inplace=True)
            add("values", "token_logprobs", dtype, vocab, temperature=0.7)
            add("values", "sequence_logprobs", dtype, vocab, temperature=2.5, upstream="entropy")
            # The transforms: every backward variant through the tanh; a negative scale without a cap.
            for upstream in UPSTREAMS:
                add("values", "token_logprobs", dtype, vocab, upstream=upstream, **SOFTCAP)
            add("values", "sequence_logprobs", dtype, vocab, inplace=True, **SOFTCAP)
            add("values", "sequence_logprobs", dtype, vocab, temperature=1.3, logit_scale=-1.5)
            for cap in ({}, SOFTCAP):
                add("values", "token_logprobs", dtype, vocab, stats=True, **cap)
            add("memory mode", "linear_token_logprobs", dtype, vocab, **mm)
            add("memory mode", "linear_token_logprobs", dtype, vocab, stats=True, **SOFTCAP, **mm)
            for upstream in UPSTREAMS:
                add("memory mode", "linear_sequence_logprobs", dtype, vocab, upstream=upstream, **mm)
            for cap in ({}, SOFTCAP):
                for upstream in ("both", "entropy", "lse"):
                    add("no labels", "token_entropy", dtype, vocab, upstream=upstream, **cap)
                add("no labels", "token_entropy", dtype, vocab, stats=True, **cap)
            add("no labels", "token_entropy", dtype, vocab, inplace=True, temperature=0.7)
            add("no labels", "token_logprobs", dtype, vocab)
            add("-inf logits", "token_logprobs", dtype, vocab)
            add("-inf logits", "token_logprobs", dtype, vocab, **SOFTCAP)
            # The raw forward of the vocab-parallel ops: labels or none, soft cap or not, statistics or not.
            for labels in (True, False):
                for cap in ({}, SOFTCAP):
                    for stats in (False, True):
                        add("vocab shard", "forward_raw", dtype, vocab, labels=labels, stats=stats, **cap)
    if group.get("reduce_seqs"):
        for dtype in reduce_dtypes(group):
            add("reduce blocks", "sequence_logprobs", dtype, group["reduce_vocab"], seqs=list(group["reduce_seqs"]),
                mask_frac=group.get("reduce_mask_frac", 0.25), shape=[group.get("reduce_batch", 2), 0])
    for dtype in dtypes:
        for vocab in group["vocabs"]:
            add("out-of-range labels", "token_logprobs", dtype, vocab)
    if group.get("large"):
        dtype, rows, vocab = group["large"]
        add("offsets > 2^31", "token_logprobs", dtype, vocab, rows=rows)
    return checks


def reduce_dtypes(group: dict[str, Any]) -> list[str]:
    """Dtypes of the values the reduction sums in this group: fp32, and fp64 when fp64 logits are checked."""
    return ["fp32"] + (["fp64"] if "fp64" in group.get("dtypes", []) else [])


# ------------------------------------------------------------------------------------------ coverage


class LaunchLog:
    """Wraps the kernels the Triton launchers call: records each launch's compile-time parameters
    (variant, logits dtype, block, warps), then runs it."""

    def __init__(self):
        self.launches: set[tuple] = set()

    def install(self, module) -> None:
        for name, kernel in list(vars(module).items()):
            if name.startswith("_") and name.endswith("_kernel") and hasattr(kernel, "__getitem__"):
                setattr(module, name, _Recording(kernel, name, self.launches))


class _Recording:
    def __init__(self, kernel, name: str, launches: set):
        self.kernel, self.name, self.launches = kernel, name, launches

    def __getitem__(self, grid):
        from mallowspo_fast.ops import aot

        launch = self.kernel[grid]

        def run(*args, **kwargs):
            variant = aot.variant_name(self.name, kwargs)
            block = kwargs.get("BLOCK_V", kwargs.get("BLOCK_T"))
            # The reduction is recorded under the dtype of the values it sums (fp32, or fp64).
            dtype = DTYPE_NAMES.get(args[1 if variant == "sequence_reduce" else 0].dtype)
            self.launches.add((variant, dtype, block, kwargs.get("num_warps")))
            return launch(*args, **kwargs)

        return run


def expected_variants(dtype: str | None, vocabs: list[int], reduce: list[str] | None = None) -> set[tuple]:
    """(variant, dtype, block, warps) of every kernel the ahead-of-time report enumerates for logits of
    ``dtype`` with these V (``dtype=None``: the per-sequence reduction of the ``reduce`` value dtypes,
    which depends on T only): the one list of the variants the public ops can launch."""
    from mallowspo_fast.ops import aot

    if dtype is None:
        return {(name, d, block, warps) for d in reduce or ["fp32"]
                for name, _fn, _sig, _c, warps, block in aot._reduce_variants(d)}
    return {(name, dtype, block, warps) for vocab in vocabs
            for name, _fn, _sig, _c, warps, block in aot._variants(DTYPES_BY_NAME[dtype], vocab)}


def coverage_row(dtype: str | None, vocabs: list[int], launches: set[tuple],
                 reduce: list[str] | None = None) -> dict[str, Any]:
    expected = expected_variants(dtype, vocabs, reduce)
    is_reduce = dtype is None
    seen = {launch for launch in launches
            if (launch[0] == "sequence_reduce") == is_reduce and (is_reduce or launch[1] == dtype)}
    missing, unknown = sorted(expected - seen, key=str), sorted(seen - expected, key=str)
    notes = []
    if missing:
        notes.append("never launched: " + ", ".join(f"{v}/{d}/BLOCK={b}/warps={w}" if is_reduce
                                                   else f"{v}/BLOCK={b}/warps={w}" for v, d, b, w in missing))
    if unknown:
        notes.append("not in the AOT enumeration: " + ", ".join(f"{v}/BLOCK={b}/warps={w}" for v, _, b, w in unknown))
    ok = not missing and not unknown
    return {"check": f"coverage/{dtype or 'sequence_reduce'}", "kind": "coverage", "op": "all",
            "dtype": dtype or "any", "vocab": "all" if dtype else "any",
            "options": f"{len(expected & seen)}/{len(expected)} variants launched", "status": "pass" if ok else "FAIL",
            "worst": 0.0 if ok else math.inf, "notes": "; ".join(notes)}


def coverage_placeholders(group: dict[str, Any]) -> list[dict[str, Any]]:
    """The coverage rows a group reports at its end (one per dtype, one for the reduction), as specs."""
    if not group.get("coverage", False):
        return []
    names = [*group.get("dtypes", []), *(["sequence_reduce"] if group.get("reduce_seqs") else [])]
    return [{"check": f"coverage/{n}", "kind": "coverage", "op": "all", "dtype": n, "vocab": "all"} for n in names]


# ---------------------------------------------------------------------------------------------- main


def run_group(group: dict[str, Any]) -> int:
    """Run the checks of ``group`` until its deadline; one JSON row per check on stdout, then one
    coverage row per dtype (and for the reduction) when every check ran."""
    from mallowspo_fast.ops import triton_path

    log = LaunchLog()
    log.install(triton_path)
    ran_all = True
    for spec in group_checks(group):
        if time.time() >= group["deadline"]:
            emit({**spec, "status": "skipped", "notes": "time budget exhausted"})
            ran_all = False
            continue
        t0 = time.perf_counter()
        try:
            row = CHECKS[spec["kind"]](spec, group["device"])
        except Exception as e:  # noqa: BLE001  (a crashing check is a failing row, not a lost run)
            where = traceback.extract_tb(e.__traceback__)[-1]
            message = str(e).splitlines()[0][:300] if str(e) else ""
            row = {**spec, "status": "error", "worst": math.inf,
                   "notes": f"{type(e).__name__}: {message} ({where.filename.split('/')[-1]}:{where.lineno})"}
        row["seconds"] = round(time.perf_counter() - t0, 3)
        emit(row)
    if not group.get("coverage", False):
        return 0
    targets = [(d, group["vocabs"]) for d in group["dtypes"]] + ([(None, [])] if group.get("reduce_seqs") else [])
    for dtype, vocabs in targets:
        if ran_all:
            emit(coverage_row(dtype, vocabs, log.launches, reduce_dtypes(group)))
        else:
            emit({"check": f"coverage/{dtype or 'sequence_reduce'}", "kind": "coverage", "op": "all",
                  "dtype": dtype or "sequence_reduce", "vocab": "all", "status": "skipped",
                  "notes": "not every check of the group ran"})
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m benchmarks.gpu_check.correctness '<json group>'")
    return run_group(json.loads(argv[0]))


if __name__ == "__main__":
    sys.exit(main())
