"""Command line of the GPU check: plan, budget, run, results folder, exit code.

Exit code: 1 when any correctness check fails (the failing rows are printed to stderr with the
table), 2 on a usage error (e.g. no CUDA device without --dry-run), 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Any

import torch

from ..harness import Result, _child_env, device_name, log, run_isolated
from ..op import PASSES
from ..providers import LINEAR_PROVIDERS, PROVIDERS, availability, linear_availability
from ..worker import run_spec
from . import correctness, plan, results
from .budget import Budget, PlanCase, run_plan
from .checks import MARKER

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_BUDGET_S = 480.0
# Kept out of the cases' time for writing the results folder (tables, CSVs, plots) at the end.
RESULTS_RESERVE_S = 20.0
# Seconds before the deadline at which a correctness group stops starting checks (the check in flight
# finishes before the hard stop).
GROUP_MARGIN_S = 15.0

HELP = f"""One-command GPU check: correctness of every kernel variant against float64, then the op and
memory-mode sweeps at the README's GPU shapes, into one results folder, within a wall-time budget.

Install on a bare CUDA machine (Python 3.11), then run, in one command:
    make setup && .venv/bin/pip install -q liger-kernel && make gpu-check
(`make gpu-check` alone also installs; Liger-Kernel is the optional peer. Dry run on CPU:
`make gpu-check GPU_CHECK_ARGS=--dry-run` or `python -m benchmarks.gpu_check --dry-run`.)

Order: correctness (every dtype and V in one process, then the beyond-2^31 offsets check), then the
sweep cases by estimated cost, heaviest last. A case starts only when the time left covers its
estimate; the others are listed as skipped with the reason. Default budget: {DEFAULT_BUDGET_S:.0f} s
for everything, start-up and the results folder included.
Results: <out>/<gpu-slug>_<YYYY-MM-DD>/ (results.md, CSVs, PNGs); the default out of a real run is
docs/results/benchmarks, ready for `git add`. Exit code 1 when a correctness check fails."""


def _text(out: Any) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else (out or "")


def run_correctness(case: PlanCase, budget: Budget, dry_run: bool) -> list[dict[str, Any]]:
    """One correctness group in a child process; every check it did not report becomes a row that
    says why (stopped at the budget, or the process died: a failure)."""
    group = dict(case.payload["group"])
    left = budget.remaining()
    group["deadline"] = time.time() + max(0.0, left - min(GROUP_MARGIN_S, left / 4))
    cmd = [sys.executable, "-m", "benchmarks.gpu_check.correctness", json.dumps(group)]
    # The benchmark cases' environment; the interpreter flag is read when the kernels are decorated, so
    # the child must find it set (dry run) or unset before it imports anything.
    env = _child_env({"device": group["device"], "env": {"TRITON_INTERPRET": "1" if dry_run else None}})
    timed_out = False
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=max(1.0, left), cwd=ROOT)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out, err, rc, timed_out = _text(e.stdout), _text(e.stderr), None, True
    rows = [json.loads(line[len(MARKER):]) for line in out.splitlines() if line.startswith(MARKER)]
    reported = {r["check"] for r in rows}
    expected = correctness.group_checks(group) + correctness.coverage_placeholders(group)
    tail = " | ".join(err.strip().splitlines()[-2:])[-300:]
    for spec in expected:
        if spec["check"] in reported:
            continue
        if timed_out:
            rows.append({**spec, "status": "skipped", "notes": "stopped at the time budget"})
        else:
            rows.append({**spec, "status": "error", "worst": float("inf"),
                         "notes": f"the check process exited ({rc}) before this check: {tail}"})
    return rows


def run_here(spec: dict[str, Any]) -> Result:
    """A sweep case in this process, as the benchmark worker runs it (dry run: a process per case would
    cost more than the case; on CUDA every case gets its own process so that peak memory and compiled
    state belong to it alone)."""
    try:
        return run_spec(spec)
    except Exception as e:  # noqa: BLE001  (one failing case is a row, not a lost run)
        return Result(spec, "error", notes=f"{type(e).__name__}: {str(e)[:300]}")


def run_sweep_case(case: PlanCase, budget: Budget, dry_run: bool) -> Result:
    spec = case.payload["spec"]
    check = availability if spec["subject"] == "op" else linear_availability
    missing = check(spec["provider"], spec["device"])
    if missing:
        r = Result(spec, missing[0], notes=missing[1])
    elif dry_run:
        r = run_here(spec)
    else:
        r = run_isolated(spec, timeout_s=max(1.0, budget.remaining()))
        if r.status == "error" and r.notes.startswith("timed out"):
            r.notes += " (the time budget)"
    log(f"  {case.name:60s} {r.status:13s} " + (f"{r.median_ms:10.3f} ms" if r.median_ms is not None else r.notes))
    return r


def table_order(r: Result) -> tuple:
    """Tables list the cases by pass, shape, then provider (the plan runs them cheapest first)."""
    s = r.spec
    providers = PROVIDERS if s["subject"] == "op" else LINEAR_PROVIDERS
    return (PASSES.index(s["pass"]), s["n"], s.get("hidden", 0), s["vocab"], providers.index(s["provider"]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="the same plan on CPU: tiny shapes, Triton kernels under TRITON_INTERPRET=1")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="wall-time budget in seconds")
    p.add_argument("--out", default=None,
                   help="parent of the results folder (default: docs/results/benchmarks; dry run: bench_results)")
    p.add_argument("--full", action="store_true",
                   help="compare every provider at every shape (about twice the default plan: raise --budget-s)")
    p.add_argument("--parts", nargs="+", choices=("correctness", "op", "linear"),
                   default=["correctness", "op", "linear"], help="what to run (default: everything)")
    p.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16", "fp16", "fp64"), default=None,
                   help="correctness: only these logits dtypes (default: all four; the large-offset check is "
                        "bf16)")
    p.add_argument("--inject-error", metavar="CHECK", default=None,
                   help="self-test: shift the results of the checks whose name contains CHECK by 10x their "
                        "tolerance; the run must then fail loudly (exit 1)")
    args = p.parse_args(argv)
    if args.budget_s < 0:
        p.error(f"--budget-s must be >= 0, got {args.budget_s}")
    return args


def main(argv: list[str] | None = None, started: float | None = None) -> int:
    """``started``: ``time.monotonic()`` when the process began (the budget counts from there)."""
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device found (torch.cuda.is_available() is False); run it on a CUDA machine "
              "or pass --dry-run for the CPU rehearsal", file=sys.stderr)
        return 2
    settings = plan.dry_settings() if args.dry_run else plan.real_settings(full=args.full)
    if args.dtypes:
        settings.correctness = {**settings.correctness, "dtypes": list(args.dtypes)}
        if settings.large and settings.large[0] not in args.dtypes:
            settings.large = None
    cases = plan.build_plan(settings, tuple(args.parts), inject=args.inject_error)
    budget = Budget(args.budget_s, start=started, reserve_s=min(RESULTS_RESERVE_S, args.budget_s / 10))
    command = "python -m benchmarks.gpu_check " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None
                                                                                     else argv))
    log(f"gpu_check: {len(cases)} cases, budget {args.budget_s:.0f} s" + (" (dry run on CPU)" if args.dry_run else ""))
    spent: dict[str, float] = {}

    def execute(case: PlanCase, b: Budget):
        t0 = time.perf_counter()
        log(f"{case.part}: {case.name} (estimate {b.estimate(case):.0f} s, {b.remaining():.0f} s left)")
        if case.part == "correctness":
            out = run_correctness(case, b, args.dry_run)
        else:
            out = run_sweep_case(case, b, args.dry_run)
        spent[case.part] = spent.get(case.part, 0.0) + time.perf_counter() - t0
        return out

    done, skipped = run_plan(cases, budget, execute, log)
    checks = [row for case, rows in done if case.part == "correctness" for row in rows]
    sweeps = {part: sorted((r for case, r in done if case.part == part), key=table_order) for part in ("op", "linear")}
    facts = results.device_facts(settings.device)
    name = facts["device"] if not args.dry_run else device_name("cpu")
    out_root = args.out or os.path.join(ROOT, "bench_results" if args.dry_run else "docs/results/benchmarks")
    folder = os.path.join(out_root, results.folder_name(name.split(" (")[0], args.dry_run))
    text = results.write_results(folder, facts, command, checks, sweeps, skipped, spent, args.budget_s,
                                 args.dry_run, elapsed=budget.elapsed())
    print(text)
    log(f"gpu_check: {budget.elapsed():.0f} s; results in {folder}/")
    if "correctness" in args.parts and not any(r["status"] in ("pass", "FAIL", "error") for r in checks):
        log("gpu_check: WARNING: no correctness check ran (see the skipped cases)")
    failures = results.correctness_failures(checks)
    if failures:
        print("\n" + "!" * 100 + f"\nGPU CHECK FAILED: {len(failures)} correctness check(s) exceeded their "
              "tolerance or errored:\n\n" + results.correctness_table(failures) + "\n" + "!" * 100,
              file=sys.stderr)
        return 1
    return 0
