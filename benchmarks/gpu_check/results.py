"""The results folder of a GPU check: ``results.md``, one CSV per part and one PNG per sweep.

``<out>/<device-slug>_<YYYY-MM-DD>/`` holds ``results.md`` (device, driver / CUDA / torch / Triton
versions, the correctness table, the sweep tables with % of the datasheet HBM peak, the targets of
docs/kernels.md §Targets, time spent and every skipped case with its reason), ``correctness.csv``, ``op.csv`` /
``linear.csv`` and ``op.png`` / ``linear.png`` (the suite's own tables, CSVs and plots).
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import re
import subprocess
from typing import Any

import torch

from .. import report
from ..harness import Result, environment_header, peak_bandwidth_gbs
from ..projection import TARGET_FRACTION
from .budget import Skipped

SWEEP_TITLES = {"op": "Op sweep (logits level)", "linear": "Memory-mode sweep (hidden states + output weight)"}


def slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def folder_name(device_name: str, dry_run: bool, today: datetime.date | None = None) -> str:
    today = today or datetime.datetime.now(datetime.timezone.utc).date()
    return f"{'dry-run-' if dry_run else ''}{slug(device_name)}_{today.isoformat()}"


def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_facts(device: str) -> dict[str, str]:
    """What ran and where: the suite's header plus, on CUDA, the driver, capability, SMs and memory."""
    facts = environment_header(device)
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        facts["compute capability"] = f"sm_{props.major}{props.minor}"
        facts["SMs"] = str(props.multi_processor_count)
        facts["memory"] = f"{props.total_memory / 2**30:.0f} GiB"
        facts["driver"] = _driver_version()
        peak = peak_bandwidth_gbs(facts["device"])
        facts["peak memory bandwidth"] = f"{peak:,.0f} GB/s (datasheet)" if peak else "unknown (no % of peak)"
    return facts


# ------------------------------------------------------------------------------------------ correctness


def _fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.2g}"


def correctness_table(rows: list[dict[str, Any]]) -> str:
    head = ("| check | op | dtype | V | options | max error (tolerance) | worst / tol | status | s | notes |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        errors = "; ".join(f"{k} {_fmt(v)} ({r.get('tolerances', {}).get(k, '')})"
                           for k, v in r.get("errors", {}).items() if r.get("tolerances", {}).get(k) != "exact")
        exact = [k for k, t in r.get("tolerances", {}).items() if t == "exact"]
        if exact:
            failed = [k for k in exact if r["ratios"].get(k, 0) > 1]
            errors += ("; " if errors else "") + (f"failed: {', '.join(failed)}" if failed
                                                  else f"holds: {', '.join(exact)}")
        worst = r.get("worst")
        status = r["status"] if r["status"] == "pass" else f"**{r['status']}**"
        lines.append(f"| {r['kind']} | {r['op']} | {r['dtype']} | {r['vocab']} | {r.get('options', '')} | "
                     f"{errors or '-'} | {'-' if worst is None else _fmt(worst)} | {status} | "
                     f"{r.get('seconds', '-')} | {r.get('notes', '')} |")
    return "\n".join(lines)


def correctness_failures(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["status"] in ("FAIL", "error")]


def write_correctness_csv(rows: list[dict[str, Any]], path: str) -> None:
    keys = ("check", "kind", "op", "dtype", "vocab", "options", "status", "worst", "seconds", "errors", "ratios",
            "tolerances", "notes")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(r[k]) if isinstance(r.get(k), dict) else r.get(k, "") for k in keys})


# ------------------------------------------------------------------------------------------- targets


def targets_table(op_results: list[Result], device_name: str) -> str:
    """Our kernel's forward and backward against the targets of docs/kernels.md §Targets (80 % / 75 % of the
    datasheet peak), measured: the figures the README's projection promises."""
    peak = peak_bandwidth_gbs(device_name)
    lines = ["| pass | N | V | dtype | median ms | floor ms (bytes / peak) | % of peak | target | met |",
             "|" + "---|" * 9]
    for r in op_results:
        s = r.spec
        if s["provider"] != "ours" or s["pass"] not in TARGET_FRACTION or r.status != "ok":
            continue
        if not (peak and r.gbs):
            lines.append(f"| {s['pass']} | {s['n']} | {s['vocab']} | {s['dtype']} | {r.median_ms:.3f} | - | - | "
                         f"{TARGET_FRACTION[s['pass']]:.0%} | unknown peak |")
            continue
        floor_ms = r.bytes_moved / (peak * 1e9) * 1e3
        pct = 100 * r.gbs / peak
        met = "yes" if pct >= 100 * TARGET_FRACTION[s["pass"]] else "**no**"
        lines.append(f"| {s['pass']} | {s['n']} | {s['vocab']} | {s['dtype']} | {r.median_ms:.3f} | {floor_ms:.3f} | "
                     f"{pct:.0f}% | {TARGET_FRACTION[s['pass']]:.0%} | {met} |")
    return "\n".join(lines) if len(lines) > 2 else "No forward or backward case of ours ran."


# -------------------------------------------------------------------------------------------- writer


def write_results(out_dir: str, facts: dict[str, str], command: str, correctness: list[dict[str, Any]],
                  sweeps: dict[str, list[Result]], skipped: list[Skipped], spent: dict[str, float],
                  budget_s: float, dry_run: bool, elapsed: float | None = None) -> str:
    """Write the folder's files; return the markdown of results.md."""
    os.makedirs(out_dir, exist_ok=True)
    failures = correctness_failures(correctness)
    parts = [f"# GPU check: {facts['device']}", ""]
    if dry_run:
        parts += ["**Dry run on CPU** (tiny shapes, Triton kernels under the interpreter): it checks that the "
                  "plan runs end to end; no figure below is a GPU measurement.", ""]
    parts += [f"- {k}: {v}" for k, v in facts.items()]
    total = sum(spent.values()) if elapsed is None else elapsed
    by_part = ", ".join(f"{k} {v:.0f} s" for k, v in spent.items())
    parts += [f"- command: `{command}`",
              f"- time: {total:.0f} s of a {budget_s:.0f} s budget before writing this folder"
              + (f" ({by_part})" if by_part else "") + f"; {len(skipped)} case(s) skipped", ""]
    ran = [r for r in correctness if r["status"] != "skipped"]
    verdict = f"**FAILED: {len(failures)} of {len(ran)} checks**" if failures else (
        f"passed: {len(ran)} checks" if ran else "not run")
    if len(ran) < len(correctness):
        verdict += f" ({len(correctness) - len(ran)} skipped at the time budget)"
    parts += [f"## Correctness against float64: {verdict}", "",
              "Every public op on its Triton path; `worst / tol` is the largest ratio of an error to its "
              "allowance (> 1 fails). Tolerances as in `tests/ops`.", ""]
    if correctness:
        parts += [correctness_table(correctness), ""]
        write_correctness_csv(correctness, os.path.join(out_dir, "correctness.csv"))
    name = facts["device"]
    for subject, results in sweeps.items():
        if not results:
            continue
        table = report.rows(results, name)
        parts += [f"## {SWEEP_TITLES[subject]}", "", report.markdown_table(table), ""]
        report.write_csv(table, os.path.join(out_dir, f"{subject}.csv"))
        if report.plot(table, os.path.join(out_dir, f"{subject}.png"), f"{subject} on {name}"):
            parts += [f"![{subject}]({subject}.png)", ""]
        if subject == "op":
            parts += ["### Targets of docs/kernels.md (measured)", "", targets_table(results, name), ""]
    if skipped:
        parts += ["## Skipped", "", "| part | case | reason |", "|---|---|---|"]
        parts += [f"| {s.case.part} | {s.case.name} | {s.reason} |" for s in skipped]
        parts.append("")
    text = "\n".join(parts)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(text)
    return text
