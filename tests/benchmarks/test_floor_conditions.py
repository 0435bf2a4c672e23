"""The CPU floor, the busy-process conditions and interleaved rounds of the benchmark suite.

No timing thresholds: the figures are noise on a shared machine; what is checked is the arithmetic,
that the conditions really apply, and that the report carries the columns.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from benchmarks import op
from benchmarks.floor import Floor, measure_floor, op_work
from benchmarks.harness import Result, StatmSampler, _child_env, merge_results, run_in_process
from benchmarks.report import markdown_table, rows

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_work_model_counts_bytes_and_exps_of_each_pass():
    n, v = 1000, 777
    assert op_work(n, v, 4, "fwd") == (n * v * 4, n * v)
    assert op_work(n, v, 2, "bwd") == (2 * n * v * 2, n * v)
    assert op_work(n, v, 4, "fwdbwd") == (3 * n * v * 4, 2 * n * v)
    with pytest.raises(ValueError, match="pass must be one of .* got 'both'"):
        op_work(n, v, 4, "both")


def test_floor_is_the_larger_of_memory_time_and_exp_time():
    f = Floor(copy_gbs=20.0, read_gbs=30.0, exp_per_s=2e9, threads=2)
    assert f.bandwidth_gbs == 30.0
    assert f.time_ms(3e9, 1e8) == pytest.approx(100.0) and f.bound(3e9, 1e8) == "memory"
    assert f.time_ms(3e8, 1e9) == pytest.approx(500.0) and f.bound(3e8, 1e9) == "exp"
    best = f.best(Floor(25.0, 10.0, 3e9, 2))
    assert (best.copy_gbs, best.read_gbs, best.exp_per_s) == (25.0, 30.0, 3e9)


def test_floor_measurement_gives_positive_rates():
    f = measure_floor(size_mib=8, repeats=1)
    assert f.copy_gbs > 0 and f.read_gbs > 0 and f.exp_per_s > 0 and f.threads >= 1
    with pytest.raises(ValueError, match="size_mib > 0"):
        measure_floor(size_mib=0)


def test_op_results_get_their_floor_and_the_report_shows_goals():
    spec = {"pass": "fwdbwd", "n": 1000, "vocab": 1000, "dtype": "fp32", "device": "cpu"}
    res = [Result({**spec, "provider": p}, "ok", ms, ms, ms, 1, peak, 4_000_000, 12e6, 1000,
                  extra={"cpu_median_ms": 2 * ms})
           for p, ms, peak in (("ours", 2.0, 4_200_000), ("compiled", 5.0, 12_000_000))]
    floor = Floor(copy_gbs=12.0, read_gbs=12.0, exp_per_s=1e9, threads=2)  # 1 ms of bytes, 2 ms of exps
    op.add_floor(res, floor)
    table = {r["provider"]: r for r in rows(res, "cpu")}
    assert table["ours"]["floor_ms"] == pytest.approx(2.0) and table["ours"]["floor_bound"] == "exp"
    assert table["ours"]["x_floor"] == pytest.approx(1.0) and table["compiled"]["x_floor"] == pytest.approx(2.5)
    assert table["ours"]["goals"] == "≤2× floor yes, ≥2× compiled yes, mem ≤1.1× yes"
    assert table["compiled"]["goals"] is None
    md = markdown_table(list(table.values()))
    assert table["ours"]["x_floor_cpu"] == pytest.approx(1.0)  # 4 CPU ms over 2 ms on 2 threads
    assert "| floor ms | × floor | × floor (CPU) | goals |" in md and "| 2.0 (exp) | 1.00× | 1.00× |" in md


def test_sampler_thread_runs_beside_the_case():
    with StatmSampler() as s:
        sum(i * i for i in range(300_000))
    assert s.samples > 0


def test_thread_condition_runs_the_sampler_during_the_timed_repeats():
    spec = {"subject": "op", "device": "cpu", "provider": "ours", "pass": "fwdbwd", "n": 16, "vocab": 64,
            "dtype": "fp32", "warmup": 1, "repeats": 3, "condition": "thread"}
    r = run_in_process(op.build_case(spec), spec)
    assert r.status == "ok" and r.extra["sampler_reads"] > 0 and len(r.extra["samples_ms"]) == 3


def test_mmap_condition_sets_the_allocator_variable_of_the_case_process_only():
    env = _child_env({"device": "cpu", "condition": "thread+mmap"})
    assert env["MALLOC_MMAP_THRESHOLD_"] == "65536" and "MALLOC_MMAP_THRESHOLD_" not in os.environ
    assert "MALLOC_MMAP_THRESHOLD_" not in _child_env({"device": "cpu", "condition": "quiet"})
    with pytest.raises(ValueError, match="condition must be one of .* got 'loud'"):
        _child_env({"device": "cpu", "condition": "loud"})


def test_rounds_pool_the_samples_of_every_round():
    spec = {"provider": "ours"}
    a = Result(spec, "ok", 2.0, 1.0, 3.0, 3, 500, extra={"samples_ms": [1.0, 2.0, 3.0], "cpu_median_ms": 4.0})
    b = Result(spec, "ok", 5.0, 4.0, 6.0, 3, 400, extra={"samples_ms": [4.0, 5.0, 6.0], "cpu_median_ms": 8.0})
    m = merge_results([a, b])
    assert m.samples == 6 and m.median_ms == 3.5 and m.extra_peak_bytes == 400 and m.extra["rounds"] == 2
    assert m.extra["cpu_median_ms"] == 6.0
    failed = Result(spec, "error", notes="boom")
    assert merge_results([a, failed]).status == "error"


def test_op_command_runs_conditions_side_by_side_in_rounds(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "benchmarks.op", "--device", "cpu", "--n", "32", "--vocab", "128", "--pass",
           "fwdbwd", "--providers", "ours", "reference", "--conditions", "quiet", "thread+mmap", "--rounds", "2",
           "--warmup", "0", "--repeats", "2", "--no-memory", "--no-floor", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| pass | N | V | dtype | condition | provider |" in proc.stdout
    with open(tmp_path / "op.csv") as f:
        table = list(csv.DictReader(f))
    assert {(r["condition"], r["provider"]) for r in table} == {
        (c, p) for c in ("quiet", "thread+mmap") for p in ("ours", "reference")}
    assert all(r["status"] == "ok" and r["samples"] == "4" for r in table)  # 2 rounds x 2 repeats
    assert all(r["speedup_vs_reference"] for r in table)  # ratios within each condition
