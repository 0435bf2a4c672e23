"""Ahead-of-time compilation report of every kernel for sm_80 / sm_90 (no GPU or driver needed).

For each kernel variant x architecture x dtype x V (the per-sequence reduction: x BLOCK_T, which depends
on T only, and x the dtype of the values it sums), compiles the shipped launch configuration with
``triton.compile`` against a ``GPUTarget`` and reads the resource usage of the resulting cubin with the
``cuobjdump`` shipped in Triton's NVIDIA backend: registers per thread, spill stores/loads (bytes), static
shared memory, plus the kernel's launch config, an occupancy estimate and the public ops whose Triton
path launches it.

A variant is everything fixed at compile time: the kernel, its constexprs (``HAS_LABELS``, ``HAS_SOFTCAP``,
``RETURN_STATS``, ``RETURN_RAW``, ``HAS_GRAD_*``, ``BLOCK_V``, ``BLOCK_T``), the logits dtype (which also
fixes the accumulation dtype: float64 for fp64 logits) and ``num_warps``. Names read ``fwd[_nolabels]
[_softcap][_stats][_raw]``, ``bwd[_nolabels][_<which grads>][_softcap]``. The ``_raw`` forward variants
(the raw accumulators of a vocabulary shard) serve the vocab-parallel ops, which launch the ordinary
backward variants on their shard; a shard's width picks BLOCK_V and the warps, so those variants are
also compiled at each shard width (a vocabulary split evenly over 2, 4 or 8 ranks) whose launch
configuration no vocabulary of the report has. The transform's multipliers (temperature, logit
scale, soft cap value) are runtime arguments: one binary serves every value. The memory mode
(``linear_token_logprobs`` / ``linear_sequence_logprobs``) calls the same launchers on each chunk of
recomputed logits, so it runs the same variants as the logits-level ops: its row counts, transform and
ignore_index are runtime arguments, and its in-place backward only passes the chunk buffer as both
logits and gradient (the pointers alias; nothing is recompiled). It never launches ``sequence_reduce``
(its per-sequence sums are torch reductions). ``tests/ops/test_aot.py`` records the launches each public
op makes and checks them against :data:`USED_BY` and this report. Strides are compiled here as generic
64-bit integers; at run time Triton's JIT also specialises integer arguments by value (== 1, multiples
of 16), so the binaries it builds are specialisations of these variants.

Usage::

    python -m mallowspo_fast.ops.aot [--arch 80 90] [--dtype bf16 fp16 fp32 fp64] [--vocab 32000 ...]
                                     [--json report.json]

Must run without TRITON_INTERPRET=1 (the interpreter replaces the compiler).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

import torch

ARCHS = (80, 90)
# Every logits dtype the public ops accept on the Triton path; fp64 logits are computed in float64 (the
# kernels take their accumulation dtype from the logits pointer, so fp64 is a dtype, not an extra flag).
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
VOCABS = (32000, 128256, 151936, 256000)
LOGITS_OPS = ("token_logprobs", "sequence_logprobs")
MEMORY_MODE_OPS = ("linear_token_logprobs", "linear_sequence_logprobs")
# Without labels (``token_logprobs(logits, None)`` routes here): HAS_LABELS=False variants.
ENTROPY_OPS = ("token_entropy",)
# Ops that take ``return_stats=True`` (the RETURN_STATS forward variants); every op takes a soft cap.
STATS_OPS = ("token_logprobs", "linear_token_logprobs")
ENTROPY_STATS_OPS = ("token_entropy",)
# The vocab-parallel ops (a vocabulary shard per rank): the RETURN_RAW forward variants and the ordinary
# backward ones; the sequence form also the per-sequence reduction.
VP_LOGITS_OPS = ("vocab_parallel_token_logprobs", "vocab_parallel_sequence_logprobs")
VP_MEMORY_MODE_OPS = ("vocab_parallel_linear_token_logprobs", "vocab_parallel_linear_sequence_logprobs")
VP_ENTROPY_OPS = ("vocab_parallel_token_entropy",)
VP_STATS_OPS = ("vocab_parallel_token_logprobs", "vocab_parallel_linear_token_logprobs")
VP_ENTROPY_STATS_OPS = ("vocab_parallel_token_entropy",)
VP_OPS = VP_LOGITS_OPS + VP_MEMORY_MODE_OPS + VP_ENTROPY_OPS
# Ranks a vocabulary is split over for the shard-width rows (ceil(V / tp) columns per shard).
SHARD_TPS = (2, 4, 8)
# Backward variants by upstream grads (HAS_GRAD_LOGP, HAS_GRAD_ENTROPY): on both outputs, on the first
# only, on the entropies only. Without labels the HAS_GRAD_LOGP slot carries the grad of lse.
GRAD_SUFFIX = {(True, True): "", (True, False): "_logp_only", (False, True): "_entropy_only"}
NOLABELS_GRAD_SUFFIX = {(True, True): "", (True, False): "_lse_only", (False, True): "_entropy_only"}
SOFTCAP_SUFFIX = {False: "", True: "_softcap"}


def _used_by() -> dict[str, tuple[str, ...]]:
    """Public ops whose Triton path launches each variant: every backward variant is reachable from each
    op (upstream grads on both outputs, on one only), with or without a soft cap; the statistics are a
    forward-only flag (not differentiable), so a call with them runs the same backward variants."""
    used: dict[str, tuple[str, ...]] = {"sequence_reduce": ("sequence_logprobs", "vocab_parallel_sequence_logprobs")}
    for cap in SOFTCAP_SUFFIX.values():
        used["fwd" + cap] = LOGITS_OPS + MEMORY_MODE_OPS
        used["fwd" + cap + "_stats"] = STATS_OPS
        used["fwd_nolabels" + cap] = ENTROPY_OPS
        used["fwd_nolabels" + cap + "_stats"] = ENTROPY_STATS_OPS
        used["fwd" + cap + "_raw"] = VP_LOGITS_OPS + VP_MEMORY_MODE_OPS
        used["fwd" + cap + "_stats_raw"] = VP_STATS_OPS
        used["fwd_nolabels" + cap + "_raw"] = VP_ENTROPY_OPS
        used["fwd_nolabels" + cap + "_stats_raw"] = VP_ENTROPY_STATS_OPS
        for grads in GRAD_SUFFIX.values():
            used["bwd" + grads + cap] = LOGITS_OPS + MEMORY_MODE_OPS + VP_LOGITS_OPS + VP_MEMORY_MODE_OPS
        for grads in NOLABELS_GRAD_SUFFIX.values():
            used["bwd_nolabels" + grads + cap] = ENTROPY_OPS + VP_ENTROPY_OPS
    return used


def shard_vocabs(dtype: torch.dtype, vocabs=VOCABS) -> tuple[int, ...]:
    """Shard widths of ``vocabs`` split evenly over :data:`SHARD_TPS` ranks (ceil(V / tp) columns) whose
    launch configuration (BLOCK_V, warps) for ``dtype`` none of ``vocabs`` has: the smallest width of each
    new configuration (the width itself is a runtime argument)."""
    from .triton_path import launch_config

    known = {launch_config(v, dtype) for v in vocabs}
    new: dict[tuple[int, int], int] = {}
    for width in sorted({-(-v // tp) for v in vocabs for tp in SHARD_TPS}):
        config = launch_config(width, dtype)
        if config not in known:
            new.setdefault(config, width)
    return tuple(sorted(new.values()))


USED_BY = _used_by()
# BLOCK_T of the per-sequence reduction = min(1024, next power of two of max(T, 16)) (triton_path): one
# variant per power of two and per dtype of the per-token values (fp32, or fp64 for fp64 logits),
# whatever V (rows with V "any").
REDUCE_BLOCKS = tuple(2**i for i in range(4, 11))
REDUCE_DTYPES = ("fp32", "fp64")
# Registers per SM and the per-thread limit are the same on A100 and H100.
REGS_PER_SM, MAX_THREADS_PER_SM, MAX_CTAS_PER_SM = 65536, 2048, 32
SMEM_PER_SM = {80: 164 * 1024, 90: 228 * 1024}


@dataclass
class KernelReport:
    kernel: str
    arch: int
    dtype: str  # the logits dtype; for sequence_reduce the dtype of the per-token values it sums
    vocab: int | None  # None: the kernel does not depend on V
    block: int
    num_warps: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    occupancy: float  # resident warps / max warps per SM, from registers and shared memory
    used_by: list[str]  # public ops whose Triton path launches this variant


def _triton_type(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
            torch.bool: "i1", torch.int64: "i64"}[dtype]


def variant_name(kernel: str, constexprs: dict) -> str:
    """Report name of a launch of ``kernel`` (the jit function's name) with these constexprs."""
    labels = bool(constexprs.get("HAS_LABELS", True))
    base = "" if labels else "_nolabels"
    cap = SOFTCAP_SUFFIX[bool(constexprs.get("HAS_SOFTCAP", False))]
    if kernel == "_token_logprobs_fwd_kernel":
        return ("fwd" + base + cap + ("_stats" if constexprs["RETURN_STATS"] else "")
                + ("_raw" if constexprs.get("RETURN_RAW", False) else ""))
    if kernel == "_sequence_reduce_kernel":
        return "sequence_reduce"
    if kernel == "_token_logprobs_bwd_kernel":
        flags = (bool(constexprs["HAS_GRAD_LOGP"]), bool(constexprs["HAS_GRAD_ENTROPY"]))
        return "bwd" + base + (GRAD_SUFFIX if labels else NOLABELS_GRAD_SUFFIX)[flags] + cap
    raise ValueError(f"variant_name: unknown kernel {kernel!r}")


def _fwd_signature(logits: str, acc: str, has_labels: bool, return_stats: bool, raw: bool = False) -> dict[str, str]:
    """The types the JIT sees for a forward launch: unused output slots get the lse tensor (triton_path), or
    the raw buffer (``forward_raw``, whose every output slot is that accumulation-dtype buffer)."""
    if raw:
        has_labels = False  # no bool slot: is_top1_ptr is the raw buffer too
    out = "*" + acc
    return {
        "logits_ptr": logits, "labels_ptr": "*i64", "logp_ptr": out, "entropy_ptr": out, "lse_ptr": out,
        "lse_lo_ptr": out, "log_sum_sq_probs_ptr": out, "mean_logits_ptr": out,
        "is_top1_ptr": "*i1" if has_labels and return_stats else out, "raw_ptr": out,
        "seq_len": "i32", "vocab_size": "i32",
        "stride_logits_b": "i64", "stride_logits_t": "i64", "stride_labels_b": "i64", "stride_labels_t": "i64",
        "ignore_index": "i32", "pre": "fp32", "post": "fp32", "pre_fp64": "fp64", "post_fp64": "fp64",
        "HAS_LABELS": "constexpr", "HAS_SOFTCAP": "constexpr", "RETURN_STATS": "constexpr",
        "RETURN_RAW": "constexpr", "BLOCK_V": "constexpr",
    }


def _variants(dtype: torch.dtype, vocab: int, shard_only: bool = False):
    """(name, jit fn, signature, constexprs, num_warps, block) of every kernel the launchers can run on
    logits of ``dtype`` with ``vocab`` columns (``shard_only``: those the vocab-parallel ops launch)."""
    from .._kernels import _token_logprobs_bwd_kernel, _token_logprobs_fwd_kernel
    from .triton_path import accumulation_dtype, launch_config

    block, warps = launch_config(vocab, dtype)
    t = "*" + _triton_type(dtype)
    acc = _triton_type(accumulation_dtype(dtype))
    for raw in (False, True) if not shard_only else (True,):
        for has_labels in (True, False):
            for softcap in (False, True):
                for stats in (False, True):
                    consts = {"HAS_LABELS": has_labels, "HAS_SOFTCAP": softcap, "RETURN_STATS": stats,
                              "RETURN_RAW": raw, "BLOCK_V": block}
                    yield (variant_name("_token_logprobs_fwd_kernel", consts), _token_logprobs_fwd_kernel,
                           _fwd_signature(t, acc, has_labels, stats, raw), consts, warps, block)
    bwd_sig = {
        "logits_ptr": t, "grad_logits_ptr": t, "labels_ptr": "*i64", "lse_ptr": "*" + acc,
        "lse_lo_ptr": "*" + acc, "entropy_ptr": "*" + acc, "grad_logp_ptr": "*" + acc,
        "grad_entropy_ptr": "*" + acc, "seq_len": "i32", "vocab_size": "i32",
        **{f"stride_{n}_{d}": "i64" for n in ("logits", "grad", "labels", "glogp", "gent") for d in "bt"},
        "ignore_index": "i32", "pre": "fp32", "post": "fp32", "pre_fp64": "fp64", "post_fp64": "fp64",
        "HAS_GRAD_LOGP": "constexpr", "HAS_GRAD_ENTROPY": "constexpr", "HAS_LABELS": "constexpr",
        "HAS_SOFTCAP": "constexpr", "BLOCK_V": "constexpr",
    }
    for has_labels in (True, False):
        for softcap in (False, True):
            for has_g, has_h in GRAD_SUFFIX:
                consts = {"HAS_GRAD_LOGP": has_g, "HAS_GRAD_ENTROPY": has_h, "HAS_LABELS": has_labels,
                          "HAS_SOFTCAP": softcap, "BLOCK_V": block}
                name = variant_name("_token_logprobs_bwd_kernel", consts)
                yield name, _token_logprobs_bwd_kernel, bwd_sig, consts, warps, block


def _reduce_variants(value_dtype: str):
    """The per-sequence reduction of ``value_dtype`` per-token values at every BLOCK_T its launcher can
    pick (it depends on T only)."""
    from .._kernels import _sequence_reduce_kernel

    v = "*" + value_dtype
    red_sig = {
        "labels_ptr": "*i64", "logp_ptr": v, "entropy_ptr": v, "seq_logp_ptr": v,
        "seq_entropy_ptr": v, "seq_count_ptr": "*i64", "seq_len": "i32",
        "stride_labels_b": "i64", "stride_labels_t": "i64", "ignore_index": "i32", "BLOCK_T": "constexpr",
    }
    for block in REDUCE_BLOCKS:
        yield "sequence_reduce", _sequence_reduce_kernel, red_sig, {"BLOCK_T": block}, 4, block


def _pointer_alignment(fn, signature):
    """Tell the compiler what the JIT infers for real tensors: 16-byte aligned pointers."""
    return {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, v in signature.items() if v.startswith("*")}


def _resource_usage(cubin: bytes) -> dict[str, int]:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if m is None:
        raise RuntimeError(f"could not parse cuobjdump output:\n{out}")
    reg, stack, shared, local = (int(x) for x in m.groups())
    return {"registers": reg, "stack": stack, "shared": shared, "local": local}


def _spills(ptx_log: str) -> tuple[int, int]:
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptx_log)
    if m is None:
        raise RuntimeError(f"ptxas -v printed no spill statistics:\n{ptx_log}")
    return int(m.group(1)), int(m.group(2))


def _ptxas_spills(ptx: str, arch: int) -> tuple[int, int]:
    import triton

    # Triton emits PTX newer than its bundled sm_80/90 ptxas reads directly; the newer ptxas it ships
    # for Blackwell reads it and reports the same register allocation statistics.
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    tool = os.path.join(bindir, "ptxas-blackwell")
    if not os.path.exists(tool):
        tool = os.path.join(bindir, "ptxas")
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([tool, "-v", f"-arch=sm_{arch}{suffix}", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True, check=True)
    return _spills(res.stderr + res.stdout)


def _occupancy(registers: int, warps: int, shared: int, arch: int) -> float:
    threads = warps * 32
    # Registers are allocated per warp in units of 256.
    regs_per_warp = ((max(registers, 1) * 32 + 255) // 256) * 256
    by_regs = REGS_PER_SM // (regs_per_warp * warps)
    by_threads = MAX_THREADS_PER_SM // threads
    by_smem = SMEM_PER_SM[arch] // shared if shared else MAX_CTAS_PER_SM
    ctas = max(0, min(by_regs, by_threads, by_smem, MAX_CTAS_PER_SM))
    return ctas * warps / (MAX_THREADS_PER_SM // 32)


def compile_report(archs=ARCHS, dtypes=tuple(DTYPES), vocabs=VOCABS) -> list[KernelReport]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("AOT compilation needs TRITON_INTERPRET unset (the interpreter replaces the compiler)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    reports, cache = [], {}

    def add(arch, dname, vocab, name, fn, sig, consts, warps, block):
        key = (name, arch, dname, tuple(sorted(consts.items())), warps)
        if key not in cache:
            src = ASTSource(fn, sig, constexprs=consts, attrs=_pointer_alignment(fn, sig))
            kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
            usage = _resource_usage(kernel.asm["cubin"])
            spill_st, spill_ld = _ptxas_spills(kernel.asm["ptx"], arch)
            # Local memory in the final cubin is where spills would live: count it too.
            spill_st = max(spill_st, usage["local"])
            shared = max(usage["shared"], int(kernel.metadata.shared))
            cache[key] = (usage["registers"], spill_st, spill_ld, shared)
        regs, st, ld, shared = cache[key]
        reports.append(KernelReport(name, arch, dname, vocab, block, warps, regs, st, ld, shared,
                                    round(_occupancy(regs, warps, shared, arch), 3), list(USED_BY[name])))

    for arch in archs:
        for dname in dtypes:
            for vocab in vocabs:
                for variant in _variants(DTYPES[dname], vocab):
                    add(arch, dname, vocab, *variant)
            for vocab in shard_vocabs(DTYPES[dname], vocabs):
                for variant in _variants(DTYPES[dname], vocab, shard_only=True):
                    add(arch, dname, vocab, *variant)
        for value_dtype in REDUCE_DTYPES:
            for variant in _reduce_variants(value_dtype):
                add(arch, value_dtype, None, *variant)
    return reports


def format_table(reports: list[KernelReport]) -> str:
    head = "| kernel | sm | dtype | V | BLOCK | warps | regs | spill st/ld (B) | smem (B) | occupancy | used by |"
    lines = [head, "|" + "---|" * 11]
    for r in reports:
        lines.append(f"| {r.kernel} | {r.arch} | {r.dtype} | {r.vocab or 'any'} | {r.block} | {r.num_warps} | "
                     f"{r.registers} | {r.spill_stores}/{r.spill_loads} | {r.shared_bytes} | {r.occupancy:.2f} | "
                     f"{', '.join(r.used_by)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    p.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--vocab", type=int, nargs="+", default=list(VOCABS))
    p.add_argument("--json", help="also write the report as JSON to this path")
    args = p.parse_args(argv)
    reports = compile_report(args.arch, args.dtype, args.vocab)
    print(format_table(reports))
    print(f"\nThe memory mode ({', '.join(MEMORY_MODE_OPS)}) launches the same variants as the logits-level ops "
          "(kernels, constexprs, dtypes, warps); its in-place backward passes one buffer as logits and gradient.")
    shards = sorted({v for d in args.dtype for v in shard_vocabs(DTYPES[d], args.vocab)})
    print(f"The vocab-parallel ops ({', '.join(VP_OPS)}) launch the _raw forward variants and the backward "
          f"variants at the width of their shard; the rows at V = {', '.join(map(str, shards)) or '(none)'} are "
          f"shards of the vocabularies above split over {', '.join(map(str, SHARD_TPS))} ranks with a launch "
          "configuration of their own.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in reports], f, indent=1)
    spilled = [r for r in reports if r.spill_stores or r.spill_loads]
    if spilled:
        print(f"\n{len(spilled)} configurations spill registers", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
