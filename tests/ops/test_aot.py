"""Ahead-of-time compilation of every kernel for sm_80 and sm_90, without a GPU (docs/kernels.md
§Verification without a GPU), and coverage of every launch the public ops make, the memory mode and the
vocab-parallel ops (on a one-rank gloo group, at full and at shard widths) included."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from vp_ranks import free_port

import mallowspo_fast as mpf
from mallowspo_fast.ops import aot, triton_path

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}
KERNELS = ("_token_logprobs_fwd_kernel", "_token_logprobs_bwd_kernel", "_sequence_reduce_kernel")
FWD = {"fwd" + labels + cap + stats + raw for labels in ("", "_nolabels") for cap in ("", "_softcap")
       for stats in ("", "_stats") for raw in ("", "_raw")}
FWD_RAW = {name for name in FWD if name.endswith("_raw")}
BWD = {"bwd" + grads + cap for grads in ("", "_logp_only", "_entropy_only") for cap in ("", "_softcap")}
BWD |= {"bwd_nolabels" + grads + cap for grads in ("", "_lse_only", "_entropy_only") for cap in ("", "_softcap")}
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Run the report script as a user would, in a process without the interpreter flag."""
    out = tmp_path_factory.mktemp("aot") / "report.json"
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "mallowspo_fast.ops.aot", "--json", str(out)],
        capture_output=True, text=True, env=ENV, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_every_kernel_compiles_for_both_archs_all_dtypes_and_vocabs(report):
    rows, _ = report
    combos = {(r["kernel"], r["arch"], r["dtype"], r["vocab"], r["block"]) for r in rows}
    # Forward: labels or not x soft cap or not x statistics or not x raw (a vocabulary shard) or not;
    # backward: which upstream grads x soft cap.
    assert len(FWD) == 16 and len(BWD) == 12 and set(aot.USED_BY) == FWD | BWD | {"sequence_reduce"}
    expected = {(k, a, d, v, triton_path.launch_config(v, aot.DTYPES[d])[0]) for k in FWD | BWD for a in (80, 90)
                for d in ("bf16", "fp16", "fp32", "fp64") for v in (32000, 128256, 151936, 256000)}
    # The vocab-parallel ops' variants at the shard widths with a launch configuration of their own: a 4000-column
    # shard (32000 over 8 ranks) in bf16/fp16 takes BLOCK_V = 4096 and 8 warps, which no full vocabulary does.
    assert {d: aot.shard_vocabs(t) for d, t in aot.DTYPES.items()} == {"bf16": (4000,), "fp16": (4000,), "fp32": (),
                                                                     "fp64": ()}
    expected |= {(k, a, d, 4000, 4096) for k in FWD_RAW | BWD for a in (80, 90) for d in ("bf16", "fp16")}
    # The per-sequence reduction depends on T only: one row per BLOCK_T, 16 ... 1024, and per dtype of the
    # values it sums (fp32; fp64 for fp64 logits).
    expected |= {("sequence_reduce", a, d, None, 2**i) for a in (80, 90) for d in ("fp32", "fp64")
                 for i in range(4, 11)}
    assert combos == expected and len(rows) == len(expected)


def test_zero_register_spills(report):
    rows, _ = report
    spilled = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, spilled


def test_resources_are_plausible_and_printed(report):
    rows, stdout = report
    for r in rows:
        assert 16 <= r["registers"] <= 255, r  # 255: the per-thread limit (beyond it ptxas spills)
        assert r["shared_bytes"] <= 48 * 1024, r
        assert 0 < r["occupancy"] <= 1, r
    assert "| fwd | 90 | bf16 | 128256 |" in stdout and "| fwd_softcap_stats | 80 | fp64 | 32000 |" in stdout
    assert "linear_token_logprobs, linear_sequence_logprobs |" in stdout  # the used-by column
    assert "The memory mode (linear_token_logprobs, linear_sequence_logprobs) launches the same" in stdout
    assert "| fwd_softcap_stats_raw | 90 | bf16 | 4000 | 4096 | 8 |" in stdout
    assert "the rows at V = 4000 are shards of the vocabularies above split over 2, 4, 8 ranks" in stdout


# ----------------------------------------------------------------------- launches of the public ops


class _Recorder:
    """Stands in for a jit kernel in ``triton_path``: records each launch's compile-time parameters
    (variant, dtype, block, warps) and whether logits and gradient alias; runs nothing. The dtype is the
    logits' (the reduction: that of the values it sums)."""

    def __init__(self, name: str, launches: list):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        def launch(*args, num_warps, **constexprs):
            variant = aot.variant_name(self.name, constexprs)
            block = constexprs.get("BLOCK_V", constexprs.get("BLOCK_T"))
            dtype = DTYPE_NAMES[args[1 if variant == "sequence_reduce" else 0].dtype]
            inplace = variant.startswith("bwd") and args[0].data_ptr() == args[1].data_ptr()
            self.launches.append((variant, dtype, block, num_warps, inplace))

        return launch


def _accepts(fn, options: dict) -> bool:
    return all(name in inspect.signature(fn).parameters for name in options)


def _call(op: str, logits_source: torch.Tensor, upstream: str, inplace: bool, **options) -> None:
    """One forward + backward of a public op on its Triton path; ``upstream``: which outputs get grads;
    ``options``: the transform / statistics keywords (the call is skipped where the op takes none). The
    vocab-parallel ops run on the one-rank group, their shard being the whole of ``logits_source``."""
    fn = getattr(mpf, op)
    if not _accepts(fn, options):
        return
    if op in aot.VP_OPS:
        options = dict(options, vocab_start=0)
    gen = torch.Generator().manual_seed(0)
    vocab, device, dtype = logits_source.shape[-1], logits_source.device, logits_source.dtype
    labels = torch.randint(0, vocab, (2, 5), generator=gen)
    labels[0, :2] = -100
    labels = labels.to(device)
    logits = logits_source.detach().clone().requires_grad_(True)
    if op in aot.ENTROPY_OPS + aot.VP_ENTROPY_OPS:  # no labels: upstream grads on entropy and/or lse
        out = fn(logits[:, :-1], backend="triton", inplace_backward=inplace, **options)
        outputs = {"both": [out.entropy, out.lse], "logp": [out.lse], "entropy": [out.entropy]}[upstream]
    else:
        if "linear" in op:
            hidden = torch.randn(2, 5, 8, generator=gen).to(device, dtype).requires_grad_(True)
            weight = torch.randn(vocab, 8, generator=gen).to(device, dtype).requires_grad_(True)
            out = fn(hidden, weight, labels, backend="triton", **options)
        else:
            out = fn(logits[:, :-1], labels, backend="triton", inplace_backward=inplace, **options)
        outputs = {"both": [out.logps, out.entropy], "logp": [out.logps], "entropy": [out.entropy]}[upstream]
    torch.autograd.backward([t.sum() for t in outputs])


@pytest.fixture(scope="module")
def launches():
    """(op, dtype, V) -> launches recorded over every upstream-grad combination, in-place flag and soft
    cap, and a call with the statistics (soft cap or not). The vocab-parallel ops also at the shard widths
    with a launch configuration of their own."""
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: conftest sets TRITON_INTERPRET=1
    found: dict[tuple, set] = {}
    saved = {k: getattr(triton_path, k) for k in KERNELS}
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    all_ops = aot.LOGITS_OPS + aot.MEMORY_MODE_OPS + aot.ENTROPY_OPS + aot.VP_OPS
    try:
        for dtype in DTYPE_NAMES:
            widths = [(v, all_ops) for v in aot.VOCABS] + [(v, aot.VP_OPS) for v in aot.shard_vocabs(dtype)]
            for vocab, ops in widths:
                source = torch.randn(2, 6, vocab, generator=torch.Generator().manual_seed(vocab)).to(device, dtype)
                for op in ops:
                    log: list = []
                    for k in KERNELS:
                        setattr(triton_path, k, _Recorder(k, log))
                    in_place = (False,) if op in aot.MEMORY_MODE_OPS + aot.VP_MEMORY_MODE_OPS else (False, True)
                    for softcap in ({}, {"softcap": 30.0}):
                        for upstream in ("both", "logp", "entropy"):
                            for inplace in in_place:
                                _call(op, source, upstream, inplace, **softcap)
                        _call(op, source, "both", False, return_stats=True, **softcap)
                    found[(op, DTYPE_NAMES[dtype], vocab)] = set(log)
    finally:
        for k, fn in saved.items():
            setattr(triton_path, k, fn)
        dist.destroy_process_group()
    return found


def _rows_by_launch(rows):
    return {(r["kernel"], r["arch"], r["dtype"], r["vocab"], r["block"], r["num_warps"]): r for r in rows}


def test_every_launch_of_every_public_op_is_a_report_row_that_names_the_op(report, launches):
    rows = _rows_by_launch(report[0])
    for (op, dname, vocab), seen in launches.items():
        for variant, dtype, block, warps, _ in seen:
            reduce = variant == "sequence_reduce"
            # The kernels see the inputs' dtype; the reduction sums fp32 values (fp64 for fp64 logits).
            assert dtype == (("fp64" if dname == "fp64" else "fp32") if reduce else dname), (op, variant, dtype)
            for arch in aot.ARCHS:
                key = (variant, arch, dtype, None if reduce else vocab, block, warps)
                assert key in rows, (op, key)
                assert op in rows[key]["used_by"], (op, rows[key])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("seq", [1, 16, 17, 40, 100, 200, 300, 600, 3000])
def test_sequence_reduce_launch_at_any_length_is_a_report_row(report, monkeypatch, seq, dtype):
    rows = _rows_by_launch(report[0])
    log: list = []
    for k in KERNELS:
        monkeypatch.setattr(triton_path, k, _Recorder(k, log))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    values = torch.zeros(2, seq, dtype=dtype, device=device)
    triton_path.sequence_reduce(torch.zeros(2, seq, dtype=torch.long, device=device), values, values, -100)
    ((variant, dname, block, warps, _),) = log
    assert all((variant, arch, dname, None, block, warps) in rows for arch in aot.ARCHS), log


def test_used_by_lists_exactly_the_ops_that_launch_each_variant(launches):
    seen = {(op, launch[0]) for (op, _, _), found in launches.items() for launch in found}
    claimed = {(op, variant) for variant, ops in aot.USED_BY.items() for op in ops}
    assert seen == claimed


def test_memory_mode_backward_writes_in_place_into_its_chunk(launches):
    for (op, _, _), found in launches.items():
        bwd = [launch for launch in found if launch[0].startswith("bwd")]
        if op in aot.MEMORY_MODE_OPS + aot.VP_MEMORY_MODE_OPS:
            assert bwd and all(launch[4] for launch in bwd), (op, found)
        else:  # the logits-level ops alias only on request (inplace_backward=True)
            assert {launch[4] for launch in bwd} == {False, True}, (op, found)


# ------------------------------------------------------------------------------- float64 multipliers

_PARAMS_LOADED = r"""
import re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mallowspo_fast.ops import aot
for dname in ("fp32", "bf16", "fp64"):
    for name, fn, sig, consts, warps, _ in aot._variants(aot.DTYPES[dname], 1000):
        if name in ("fwd", "fwd_softcap_stats", "bwd_softcap"):
            src = ASTSource(fn, sig, constexprs=consts, attrs=aot._pointer_alignment(fn, sig))
            ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["ptx"]
            loaded = {int(i) for i in re.findall(r"ld\.param\.\w+\s+%\w+, \[\w+_param_(\d+)\]", ptx)}
            print(name, dname, *sorted(fn.arg_names[i] for i in loaded if fn.arg_names[i] in
                                       ("pre", "post", "pre_fp64", "post_fp64")))
"""


def test_fp64_variants_take_the_fp64_multipliers_and_the_others_the_fp32_ones():
    """The interpreter cannot tell them apart (it sees Python floats): read the compiled code's parameter
    loads. fp64 logits must scale by the fp64 copies (no fp32 rounding of 1/T or the cap), the other
    variants never load them (a 64-bit scalar costs them registers)."""
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", _PARAMS_LOADED], capture_output=True, text=True,
                          env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = {tuple(line.split()[:2]): set(line.split()[2:]) for line in proc.stdout.splitlines()}
    for dname in ("fp32", "bf16", "fp64"):
        suffix = "_fp64" if dname == "fp64" else ""
        assert loaded[("fwd", dname)] == {"post" + suffix}  # no soft cap: z = post·y
        assert loaded[("fwd_softcap_stats", dname)] == loaded[("bwd_softcap", dname)] == {"pre" + suffix,
                                                                                          "post" + suffix}
