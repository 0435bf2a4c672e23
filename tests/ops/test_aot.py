"""Ahead-of-time compilation of every kernel for sm_80 and sm_90, without a GPU (KERNELS.md §4.2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


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
    combos = {(r["kernel"], r["arch"], r["dtype"], r["vocab"]) for r in rows}
    kernels = {"fwd", "bwd", "bwd_logp_only", "bwd_entropy_only", "sequence_reduce"}
    expected = {(k, a, d, v) for k in kernels for a in (80, 90) for d in ("bf16", "fp16", "fp32")
                for v in (32000, 128256, 151936, 256000)}
    assert combos == expected


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
