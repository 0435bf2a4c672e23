"""Ahead-of-time compilation of every kernel for sm_80 and sm_90, without a GPU (KERNELS.md §4.2), and
coverage of every launch the public ops make, the memory mode included."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import mallowspo_fast as mpf
from mallowspo_fast.ops import aot, triton_path

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}
KERNELS = ("_token_logprobs_fwd_kernel", "_token_logprobs_bwd_kernel", "_sequence_reduce_kernel")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Run the report script as a user would, in a process without the interpreter flag."""
    out = tmp_path_factory.mktemp("aot") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "mallowspo_fast.ops.aot", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_every_kernel_compiles_for_both_archs_all_dtypes_and_vocabs(report):
    rows, _ = report
    combos = {(r["kernel"], r["arch"], r["dtype"], r["vocab"], r["block"]) for r in rows}
    kernels = {"fwd", "bwd", "bwd_logp_only", "bwd_entropy_only",
               "fwd_nolabels", "bwd_nolabels", "bwd_nolabels_lse_only", "bwd_nolabels_entropy_only"}
    expected = {(k, a, d, v, triton_path.launch_config(v, aot.DTYPES[d])[0]) for k in kernels for a in (80, 90)
                for d in ("bf16", "fp16", "fp32", "fp64") for v in (32000, 128256, 151936, 256000)}
    # The per-sequence reduction depends on T only: one row per BLOCK_T, 16 ... 1024.
    expected |= {("sequence_reduce", a, None, None, 2**i) for a in (80, 90) for i in range(4, 11)}
    assert combos == expected and len(rows) == len(expected)


def test_zero_register_spills(report):
    rows, _ = report
    spilled = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, spilled


def test_resources_are_plausible_and_printed(report):
    rows, stdout = report
    for r in rows:
        assert 16 <= r["registers"] <= 255, r
        assert r["shared_bytes"] <= 48 * 1024, r
        assert 0 < r["occupancy"] <= 1, r
    assert "| fwd | 90 | bf16 | 128256 |" in stdout
    assert "linear_token_logprobs, linear_sequence_logprobs |" in stdout  # the used-by column
    assert "The memory mode (linear_token_logprobs, linear_sequence_logprobs) launches the same" in stdout


# ----------------------------------------------------------------------- launches of the public ops


class _Recorder:
    """Stands in for a jit kernel in ``triton_path``: records each launch's compile-time parameters
    (variant, logits dtype, block, warps) and whether logits and gradient alias; runs nothing."""

    def __init__(self, name: str, launches: list):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        def launch(*args, num_warps, **constexprs):
            variant = aot.variant_name(self.name, constexprs)
            block = constexprs.get("BLOCK_V", constexprs.get("BLOCK_T"))
            dtype = None if variant == "sequence_reduce" else DTYPE_NAMES[args[0].dtype]
            inplace = variant.startswith("bwd") and args[0].data_ptr() == args[1].data_ptr()
            self.launches.append((variant, dtype, block, num_warps, inplace))

        return launch


def _call(op: str, dtype: torch.dtype, vocab: int, device: str, upstream: str, inplace: bool):
    """One forward + backward of a public op on its Triton path; ``upstream``: which outputs get grads."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, vocab, (2, 5), generator=gen)
    labels[0, :2] = -100
    labels = labels.to(device)
    if op in aot.ENTROPY_OPS:  # no labels: upstream grads on entropy and/or lse
        logits = torch.randn(2, 6, vocab, generator=gen).to(device, dtype).requires_grad_(True)
        out = getattr(mpf, op)(logits[:, :-1], backend="triton", inplace_backward=inplace)
        outputs = {"both": [out.entropy, out.lse], "logp": [out.lse], "entropy": [out.entropy]}[upstream]
        torch.autograd.backward([t.sum() for t in outputs])
        return
    if op.startswith("linear"):
        hidden = torch.randn(2, 5, 8, generator=gen).to(device, dtype).requires_grad_(True)
        weight = torch.randn(vocab, 8, generator=gen).to(device, dtype).requires_grad_(True)
        out = getattr(mpf, op)(hidden, weight, labels, backend="triton")
    else:
        logits = torch.randn(2, 6, vocab, generator=gen).to(device, dtype).requires_grad_(True)
        out = getattr(mpf, op)(logits[:, :-1], labels, backend="triton", inplace_backward=inplace)
    outputs = {"both": [out.logps, out.entropy], "logp": [out.logps], "entropy": [out.entropy]}[upstream]
    torch.autograd.backward([t.sum() for t in outputs])


@pytest.fixture(scope="module")
def launches():
    """(op, dtype, V) -> launches recorded over every upstream-grad combination (and in-place flag)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: conftest sets TRITON_INTERPRET=1
    found: dict[tuple, set] = {}
    saved = {k: getattr(triton_path, k) for k in KERNELS}
    try:
        for dtype in DTYPE_NAMES:
            for vocab in aot.VOCABS:
                for op in aot.LOGITS_OPS + aot.MEMORY_MODE_OPS + aot.ENTROPY_OPS:
                    log: list = []
                    for k in KERNELS:
                        setattr(triton_path, k, _Recorder(k, log))
                    for upstream in ("both", "logp", "entropy"):
                        for inplace in (False, True) if op not in aot.MEMORY_MODE_OPS else (False,):
                            _call(op, dtype, vocab, device, upstream, inplace)
                    found[(op, DTYPE_NAMES[dtype], vocab)] = set(log)
    finally:
        for k, fn in saved.items():
            setattr(triton_path, k, fn)
    return found


def _rows_by_launch(rows):
    return {(r["kernel"], r["arch"], r["dtype"], r["vocab"], r["block"], r["num_warps"]): r for r in rows}


def test_every_launch_of_every_public_op_is_a_report_row_that_names_the_op(report, launches):
    rows = _rows_by_launch(report[0])
    for (op, dname, vocab), seen in launches.items():
        for variant, dtype, block, warps, _ in seen:
            assert dtype in (None, dname), (op, variant, dtype, dname)  # the kernels see the inputs' dtype
            for arch in aot.ARCHS:
                key = (variant, arch, dtype, None if dtype is None else vocab, block, warps)
                assert key in rows, (op, key)
                assert op in rows[key]["used_by"], (op, rows[key])


@pytest.mark.parametrize("seq", [1, 16, 17, 40, 100, 200, 300, 600, 3000])
def test_sequence_reduce_launch_at_any_length_is_a_report_row(report, monkeypatch, seq):
    rows = _rows_by_launch(report[0])
    log: list = []
    for k in KERNELS:
        monkeypatch.setattr(triton_path, k, _Recorder(k, log))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    logits = torch.zeros(2, seq, 16, device=device)
    mpf.sequence_logprobs(logits, torch.zeros(2, seq, dtype=torch.long, device=device), backend="triton")
    (reduce,) = [launch for launch in log if launch[0] == "sequence_reduce"]
    variant, _, block, warps, _ = reduce
    assert all((variant, arch, None, None, block, warps) in rows for arch in aot.ARCHS), reduce


def test_used_by_lists_exactly_the_ops_that_launch_each_variant(launches):
    seen = {(op, launch[0]) for (op, _, _), found in launches.items() for launch in found}
    claimed = {(op, variant) for variant, ops in aot.USED_BY.items() for op in ops}
    assert seen == claimed


def test_memory_mode_backward_writes_in_place_into_its_chunk(launches):
    for (op, _, _), found in launches.items():
        bwd = [launch for launch in found if launch[0].startswith("bwd")]
        if op in aot.MEMORY_MODE_OPS:
            assert bwd and all(launch[4] for launch in bwd), (op, found)
        else:  # the logits-level ops alias only on request (inplace_backward=True)
            assert {launch[4] for launch in bwd} == {False, True}, (op, found)
