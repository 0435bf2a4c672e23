"""The one-command GPU check: its dry run on CPU end to end, a failing check failing loudly, the time
budget skipping cases with a note, and the pieces (plan, tolerances, coverage, comparison) on their own."""

from __future__ import annotations

import csv
import datetime
import math
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import linear, op
from benchmarks.gpu_check import checks, correctness, plan, results, run
from benchmarks.gpu_check.budget import Budget, PlanCase, run_plan
from benchmarks.harness import Result, run_isolated
from mallowspo_fast import testing

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
def _utc_today() -> str:
    return datetime.datetime.now(datetime.timezone.utc).date().isoformat()


TODAY = _utc_today()  # the session's start: a run that crosses midnight (UTC) names the folder by the later day


def _gpu_check(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _folder(out) -> str:
    (name,) = os.listdir(out)
    assert name.startswith("dry-run-") and name.endswith(("_" + TODAY, "_" + _utc_today())), name
    return os.path.join(out, name)


# ------------------------------------------------------------------------------------- end to end


def test_dry_run_runs_the_whole_plan_and_writes_the_results_folder(tmp_path):
    proc = _gpu_check("--dry-run", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    folder = _folder(tmp_path)
    assert sorted(os.listdir(folder)) == ["correctness.csv", "linear.csv", "linear.png", "op.csv", "op.png",
                                          "results.md"]
    text = open(os.path.join(folder, "results.md")).read()
    assert text + "\n" == proc.stdout and "**Dry run on CPU**" in text and "## Skipped" not in text
    for key in ("- device:", "- torch:", "- triton:", "- command:", "- time:"):
        assert key in text
    # Every check of the plan ran and passed, the launch coverage of every dtype and of the reduction too.
    settings = plan.dry_settings()
    group = {**settings.correctness, "coverage": True}
    expected = {c["check"] for c in correctness.group_checks(group) + correctness.coverage_placeholders(group)}
    with open(os.path.join(folder, "correctness.csv")) as f:
        rows = list(csv.DictReader(f))
    assert {r["check"] for r in rows} >= expected and len(rows) == len(expected) + 1  # + the large offsets
    assert {r["status"] for r in rows} == {"pass"}
    assert {r["kind"] for r in rows} == {"values", "memory mode", "no labels", "-inf logits", "out-of-range labels",
                                         "reduce blocks", "offsets > 2^31", "coverage", "vocab shard"}
    assert {r["check"] for r in rows if r["kind"] == "coverage"} == {
        "coverage/fp32", "coverage/bf16", "coverage/fp16", "coverage/fp64", "coverage/sequence_reduce"}
    # The new flags and dtypes are among the checks: soft cap, statistics, float64.
    options = {r["options"] for r in rows}
    assert {"temperature=0.7 softcap=30.0 logit_scale=2.0 upstream=logp", "stats=True"} <= options
    assert {r["dtype"] for r in rows if r["kind"] == "reduce blocks"} == {"fp32", "fp64"}
    assert f"## Correctness against float64: passed: {len(rows)} checks" in text
    # The sweeps: every provider is a row (run, or the reason it cannot run here), our passes at each shape.
    with open(os.path.join(folder, "op.csv")) as f:
        op_rows = list(csv.DictReader(f))
    assert {r["provider"] for r in op_rows} == set(op.PROVIDERS)
    assert {(r["pass"], r["vocab"]) for r in op_rows if r["provider"] == "ours"} == {
        (p, v) for p in ("fwd", "bwd") for v in ("256", "512")} | {("fwdbwd", "256")}
    assert all(r["status"] == "ok" for r in op_rows if r["provider"] in ("ours", "reference", "compiled"))
    with open(os.path.join(folder, "linear.csv")) as f:
        assert {r["provider"] for r in csv.DictReader(f)} == set(linear.PROVIDERS)
    assert "### Targets of docs/kernels.md (measured)" in text and "| fwd | 64 | 256 | fp32 |" in text


def test_an_exceeded_tolerance_fails_loudly(tmp_path):
    bad = "values/token_logprobs/fp32/V=300/upstream=logp"
    proc = _gpu_check("--dry-run", "--parts", "correctness", "--dtypes", "fp32", "--inject-error", bad,
                      "--out", str(tmp_path))
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "GPU CHECK FAILED: 1 correctness check(s)" in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("| values | token_logprobs | fp32 |")]
    assert "upstream=logp" in line and "**FAIL**" in line
    worst = float(line.split(" | ")[6])
    assert 5 < worst < 50  # ten times the tolerance on the log-probs
    text = open(os.path.join(_folder(tmp_path), "results.md")).read()
    assert "## Correctness against float64: **FAILED: 1 of" in text


def test_a_spent_budget_skips_every_remaining_case_with_a_note(tmp_path):
    proc = _gpu_check("--dry-run", "--budget-s", "0", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = open(os.path.join(_folder(tmp_path), "results.md")).read()
    assert "## Correctness against float64: not run" in text and "## Skipped" in text
    skipped = [x for x in text.splitlines() if x.endswith("| time budget of 0 s exhausted |")]
    assert len(skipped) == len(plan.build_plan(plan.dry_settings()))


def test_without_cuda_a_real_run_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run.main(["--out", "unused"]) == 2
    assert "--dry-run" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ budget


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_budget_runs_in_order_calibrates_estimates_and_skips_what_cannot_finish():
    clock = FakeClock()
    budget = Budget(10, clock)
    cases = [PlanCase("op", "a", 3, kind="x"), PlanCase("op", "b", 3, kind="x"), PlanCase("op", "c", 1, kind="y"),
             PlanCase("op", "d", 5, kind="y"), PlanCase("op", "e", 0.5, kind="z")]
    took = {"a": 4.0, "b": 4.0, "c": 1.0, "e": 0.5}

    def execute(case, b):
        clock.now += took[case.name]
        return case.name

    done, skipped = run_plan(cases, budget, execute, log=lambda _: None)
    # b is estimated at 3 x 4/3 = 4 s after a took 4 s for an estimate of 3; d needs 5 s with 1 s left.
    assert [name for _, name in done] == ["a", "b", "c", "e"]
    assert [(s.case.name, s.reason) for s in skipped] == [("d", "time budget: 1 s left, the case needs ~5 s")]
    assert budget.remaining() == pytest.approx(0.5)
    clock.now += 1
    assert budget.admit(PlanCase("op", "f", 0)) == "time budget of 10 s exhausted"
    # Counted from the process start, with a reserve for writing the results.
    assert Budget(10, clock, start=clock.now - 5, reserve_s=2).remaining() == pytest.approx(3)


def test_plans_put_correctness_first_and_the_heaviest_sweeps_last():
    for settings in (plan.real_settings(), plan.real_settings(full=True), plan.dry_settings()):
        cases = plan.build_plan(settings)
        parts = [c.part for c in cases]
        assert parts[:2] == ["correctness", "correctness"] and "correctness" not in parts[2:]
        sweep = [c.estimate_s for c in cases[2:]]
        assert sweep == sorted(sweep)


def test_real_plan_covers_the_readme_gpu_shapes():
    cases = plan.build_plan(plan.real_settings())
    specs = [c.payload["spec"] for c in cases if c.part != "correctness"]
    op_specs = [s for s in specs if s["subject"] == "op"]
    shapes = {(8192, 128256), (16384, 151936), (16384, 256000)}
    assert {(s["n"], s["vocab"]) for s in op_specs} == shapes and {s["dtype"] for s in op_specs} == {"bf16"}
    ours = {(s["pass"], s["n"], s["vocab"]) for s in op_specs if s["provider"] == "ours"}
    assert ours >= {(p, n, v) for p in ("fwd", "bwd") for n, v in shapes}
    assert {s["provider"] for s in op_specs if s["pass"] == "fwdbwd"} == set(op.PROVIDERS)
    lin = [s for s in specs if s["subject"] == "linear"]
    assert {(s["n"], s["hidden"], s["vocab"]) for s in lin} == {(8192, 4096, v) for v in (32000, 128256, 151936)}
    assert {s["provider"] for s in lin if s["pass"] == "fwdbwd"} == set(linear.PROVIDERS)
    assert {(s["provider"], s["vocab"]) for s in lin if s["provider"].startswith("ours")} == {
        (p, v) for p in ("ours-chunked", "ours-logits") for v in (32000, 128256, 151936)}
    full = [c.payload["spec"] for c in plan.build_plan(plan.real_settings(full=True)) if c.part != "correctness"]
    assert {(s["subject"], s["pass"], s["provider"]) for s in full} >= {
        ("linear", p, "ours-chunked") for p in linear.PASSES} | {("op", "fwdbwd", p) for p in op.PROVIDERS}
    assert {(s["n"], s["vocab"]) for s in full if s["provider"] == "compiled" and s["subject"] == "op"} == shapes
    large = cases[1].payload["group"]["large"]
    assert large[1] * large[2] > 2**31


def test_sweep_specs_are_the_ones_the_suite_builds(monkeypatch):
    seen = []
    for module in (op, linear):
        monkeypatch.setattr(module, "run_case", lambda spec, missing, label, log: seen.append(spec))
    s = plan.real_settings()
    op.sweep("cuda", [8192], [128256], ["bf16"], ["bwd"], ["compiled"], s.op_warmup, s.op_repeats)
    linear.sweep("cuda", [s.linear_n], [s.linear_hidden], [32000], ["bf16"], ["fwd"], ["ours-chunked"],
                 s.linear_warmup, s.linear_repeats)
    assert seen == [plan.op_spec(s, "compiled", "bwd", 8192, 128256, "bf16"),
                    plan.linear_spec(s, "ours-chunked", "fwd", 32000)]


# ---------------------------------------------------------------------------------- the comparison


def test_checks_read_the_tolerances_of_the_test_suite(monkeypatch):
    """One copy: a tolerance changed in mallowspo_fast.testing is the one a check applies."""
    spec = {"check": "values/token_logprobs/fp64/V=40", "kind": "values", "op": "token_logprobs", "dtype": "fp64",
            "vocab": 40, "shape": [3, 3], "options": "", "seed": 0, "inject": None, "temperature": 1.0,
            "inplace": False, "upstream": "both"}
    row = checks.check_logits_op(spec, "cpu")
    assert row["status"] == "pass"
    assert row["tolerances"]["logp"] == "1e-10 + 1e-10·abs(ref)"
    assert row["tolerances"]["grad"] == "1e-12 + 1e-08·abs(ref)"
    monkeypatch.setitem(testing.VALUE_ATOL, torch.float64, 3e-7)
    assert checks.check_logits_op(spec, "cpu")["tolerances"]["logp"] == "3e-07 + 1e-10·abs(ref)"


def test_excess_is_the_worst_error_over_its_allowance():
    ref = torch.tensor([1.0, -2.0, 0.0, float("-inf")], dtype=torch.float64)
    err, ratio = checks.excess(torch.tensor([1.0, -2.0, 3e-5, float("-inf")]), ref, 1e-5, 0.0)
    assert err == pytest.approx(3e-5) and ratio == pytest.approx(3.0)
    assert checks.excess(torch.tensor([1.0, float("nan"), 0.0, float("-inf")]), ref, 1e-5, 0.0) == (math.inf,
                                                                                                  math.inf)
    assert checks.excess(ref.float(), ref, 0.0, 0.0) == (0.0, 0.0)


def test_a_wrong_reference_makes_a_check_fail(monkeypatch):
    """In process (the interpreter is on in the test session): the comparison is not vacuous."""
    spec = {"check": "values/token_logprobs/fp32/V=40", "kind": "values", "op": "token_logprobs", "dtype": "fp32",
            "vocab": 40, "shape": [3, 3], "options": "", "seed": 0, "inject": None, "temperature": 1.0,
            "inplace": False, "upstream": "both"}
    assert checks.check_logits_op(spec, "cpu")["status"] == "pass"
    real = checks.reference

    def shifted(logits, labels, sequence, transform=None):
        x, (logps, entropy) = real(logits, labels, sequence, transform)
        return x, (logps, entropy + 1e-3)

    monkeypatch.setattr(checks, "reference", shifted)
    row = checks.check_logits_op(spec, "cpu")
    assert row["status"] == "FAIL" and row["ratios"]["entropy"] > 50 and row["ratios"]["logp"] <= 1


def test_coverage_names_the_variants_never_launched_and_the_unknown_ones():
    expected = correctness.expected_variants("fp32", [300])
    assert {v[0] for v in expected} >= {"fwd", "bwd", "bwd_logp_only", "bwd_entropy_only", "fwd_nolabels"}
    assert correctness.coverage_row("fp32", [300], set(expected))["status"] == "pass"
    missing = next(v for v in expected if v[0] == "bwd_logp_only")
    row = correctness.coverage_row("fp32", [300], (expected - {missing}) | {("fwd", "fp32", 64, 1)})
    assert row["status"] == "FAIL" and "never launched: bwd_logp_only/BLOCK=512" in row["notes"]
    assert "not in the AOT enumeration: fwd/BLOCK=64/warps=1" in row["notes"]


def test_a_group_past_its_deadline_reports_every_check_as_skipped(monkeypatch, capsys):
    from mallowspo_fast.ops import triton_path

    for name in [n for n in vars(triton_path) if n.endswith("_kernel")]:
        monkeypatch.setattr(triton_path, name, getattr(triton_path, name))  # restored after the test
    group = {**plan.dry_settings().correctness, "device": "cpu", "deadline": 0.0, "coverage": True}
    correctness.run_group(group)
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith(checks.MARKER)]
    expected = correctness.group_checks(group) + correctness.coverage_placeholders(group)
    assert len(lines) == len(expected) and all('"status": "skipped"' in x for x in lines)


def test_results_folder_is_named_after_the_device_and_the_day():
    day = datetime.date(2026, 12, 4)
    assert results.folder_name("NVIDIA H100 80GB HBM3", False, day) == "nvidia-h100-80gb-hbm3_2026-12-04"
    assert results.folder_name("AMD EPYC", True, day) == "dry-run-amd-epyc_2026-12-04"


def test_targets_table_measures_our_passes_against_the_datasheet_peak():
    """The CUDA-only arithmetic of the targets table, on made-up timings of a known device."""
    def ours(pass_, ms):
        spec = {"subject": "op", "device": "cuda", "provider": "ours", "pass": pass_, "n": 8192, "vocab": 128256,
                "dtype": "bf16"}
        return Result(spec, "ok", ms, ms, ms, 1, None, None, op.op_bytes(8192, 128256, "bf16", pass_), 8192)

    table = results.targets_table([ours("fwd", 0.70), ours("bwd", 1.80), ours("fwdbwd", 2.0)],
                                  "NVIDIA H100 80GB HBM3")
    # Floors at the datasheet 3,350 GB/s: 2.10 GB read in 0.627 ms, read + write in 1.255 ms.
    assert "| fwd | 8192 | 128256 | bf16 | 0.700 | 0.627 | 90% | 80% | yes |" in table
    assert "| bwd | 8192 | 128256 | bf16 | 1.800 | 1.255 | 70% | 75% | **no** |" in table
    assert "| fwdbwd |" not in table


def test_a_sweep_case_of_a_real_run_gets_its_own_process_and_the_time_left_as_its_limit():
    """The real run's path (the dry run runs its cases in process): a worker process per case, stopped
    when the budget runs out."""
    s = plan.dry_settings()
    case = PlanCase("op", "op fwd tiny", 1.0, {"spec": plan.op_spec(s, "ours", "fwd", 16, 64, "fp32")})
    r = run.run_sweep_case(case, Budget(120), dry_run=False)
    assert r.status == "ok" and r.samples == s.op_repeats and r.bytes_moved == op.op_bytes(16, 64, "fp32", "fwd")
    long = PlanCase("op", "op fwd long", 1.0, {"spec": {**case.payload["spec"], "repeats": 10**6}})
    late = run.run_sweep_case(long, Budget(0.5, FakeClock()), dry_run=False)  # stopped after 1 s
    assert late.status == "error" and late.notes == "timed out after 1 s (the time budget)"


def test_a_dry_run_sweep_case_runs_in_process_as_the_worker_runs_it_in_its_own():
    s = plan.dry_settings()
    for provider in ("ours", "liger"):  # a case that runs; one that cannot (not installed, or its reason)
        spec = plan.op_spec(s, provider, "fwd", 16, 64, "fp32")
        here, there = run.run_here(spec), run_isolated(spec)
        assert (here.status, here.notes, here.samples, here.bytes_moved, here.input_bytes, here.tokens) == (
            there.status, there.notes, there.samples, there.bytes_moved, there.input_bytes, there.tokens)
    broken = run.run_here({**spec, "provider": "ours", "pass": "sideways"})
    assert broken.status == "error" and broken.notes.startswith("ValueError")


def test_the_docs_count_the_checks_of_a_real_run():
    group = {**plan.real_settings().correctness, "coverage": True}
    specs = correctness.group_checks(group)
    reduce = [c for c in specs if c["kind"] == "reduce blocks"]
    per = (len(specs) - len(reduce)) / (len(group["dtypes"]) * len(group["vocabs"]))
    assert {c["dtype"] for c in reduce} == {"fp32", "fp64"} and len(correctness.coverage_placeholders(group)) == 5
    text = " ".join(open(os.path.join(ROOT, "docs", "gpu-check.md")).read().split())
    assert (f"That is {per:.0f} checks for each dtype and V, and the reduction for fp32 and fp64 values: "
            f"{len(specs)} checks, then the five coverage rows") in text
