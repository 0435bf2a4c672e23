"""Output of a run: a markdown table (printed and saved), a CSV and PNG plots, under one header.

Files written into the output folder (overwritten by the next run; the folder is git-ignored):
``results.md`` (header + one table per subject), ``<subject>.csv`` and ``<subject>.png``.
"""

from __future__ import annotations

import csv
import math
import os
from collections import defaultdict

from .harness import Result, environment_header, peak_bandwidth_gbs
from .providers import LOGP_ONLY

# Spec fields that identify a case apart from its provider, in the order the tables show them.
SHAPE_KEYS = ("pass", "model", "loss", "batch", "seq", "n", "hidden", "vocab", "dtype", "mask_frac", "condition",
              "acc")
HEADERS = {"pass": "pass", "model": "model", "loss": "loss", "batch": "B", "seq": "T", "n": "N", "hidden": "H",
           "vocab": "V", "dtype": "dtype", "mask_frac": "masked", "condition": "condition", "acc": "row sums"}
BASELINES = ("reference", "compiled", "compiled-loss")
# What torch.compile gives a user: the per-token function compiled, or the whole loss in one graph. The
# faster of the two in the same run is the strongest baseline; the tables name it.
COMPILED_BASELINES = ("compiled", "compiled-loss")
# Goals of our provider on CPU, shown as pass/fail markers next to each case that has a floor.
GOAL_X_FLOOR = 2.0  # at most this multiple of the machine's floor
GOAL_VS_COMPILED = 2.0  # at least this many times faster than the strongest torch.compile baseline
GOAL_MEMORY_X_LOGITS = 1.1  # extra peak memory at most this multiple of the logits


def goals(row: dict) -> str | None:
    """Pass/fail markers of the CPU goals for a row of ours that has a floor, else None."""
    if row["provider"] != "ours" or row.get("x_floor") is None:
        return None
    vs_compiled = row.get("speedup_vs_strongest_compiled")
    checks = [(f"≤{GOAL_X_FLOOR:g}× floor", row["x_floor"] <= GOAL_X_FLOOR),
              (f"≥{GOAL_VS_COMPILED:g}× {row.get('strongest_compiled') or 'compiled'}",
               None if vs_compiled is None else vs_compiled >= GOAL_VS_COMPILED),
              (f"mem ≤{GOAL_MEMORY_X_LOGITS:g}×", None if row.get("extra_peak_x_logits") is None
               else row["extra_peak_x_logits"] <= GOAL_MEMORY_X_LOGITS)]
    return ", ".join(f"{name} {'-' if ok is None else ('yes' if ok else 'NO')}" for name, ok in checks)


def _shape(r: Result) -> tuple:
    return tuple(r.spec.get(k) for k in SHAPE_KEYS)


def _mb(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**20:,.0f}"


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}×"


def strongest_compiled(same_shape: dict[str, Result]) -> Result | None:
    """The faster measured torch.compile baseline of one shape (see COMPILED_BASELINES), or None."""
    ok = [same_shape[p] for p in COMPILED_BASELINES
          if p in same_shape and same_shape[p].status == "ok" and same_shape[p].median_ms]
    return min(ok, key=lambda b: b.median_ms) if ok else None


def rows(results: list[Result], device_name: str) -> list[dict]:
    """One dict per result with derived metrics: bandwidth, % of peak, ratios vs the baselines."""
    peak = peak_bandwidth_gbs(device_name) if "cuda" in str(results[0].spec.get("device", "")) else None
    by_shape: dict[tuple, dict[str, Result]] = defaultdict(dict)
    for r in results:
        by_shape[_shape(r)][r.spec["provider"]] = r
    out = []
    for r in results:
        ok = r.status == "ok"
        row = {k: r.spec[k] for k in SHAPE_KEYS if k in r.spec}
        row.update(provider=r.spec["provider"], status=r.status, median_ms=r.median_ms, p20_ms=r.p20_ms,
                   p80_ms=r.p80_ms, samples=r.samples, cpu_median_ms=r.extra.get("cpu_median_ms"),
                   gbs=r.gbs, tokens_per_s=r.tokens_per_s,
                   pct_peak=(100 * r.gbs / peak) if (peak and r.gbs) else None,
                   extra_peak_mb=r.extra_peak_bytes / 2**20 if r.extra_peak_bytes is not None else None,
                   extra_peak_x_logits=_ratio(r.extra_peak_bytes, r.input_bytes),
                   notes=r.notes)
        if r.flops is not None:
            row["tflops"] = r.tflops
        for base in BASELINES:
            b = by_shape[_shape(r)].get(base)
            b_ok = b is not None and b.status == "ok" and ok
            row[f"speedup_vs_{base}"] = _ratio(b.median_ms, r.median_ms) if b_ok else None
            row[f"memory_vs_{base}"] = _ratio(r.extra_peak_bytes, b.extra_peak_bytes) if b_ok else None
        best = strongest_compiled(by_shape[_shape(r)])
        row["strongest_compiled"] = best.spec["provider"] if best is not None else None
        row["speedup_vs_strongest_compiled"] = _ratio(best.median_ms, r.median_ms) if best is not None and ok else None
        if r.extra.get("floor_ms") is not None:
            cpu_ms, threads = r.extra.get("cpu_median_ms"), r.extra.get("floor_threads")
            row.update(floor_ms=r.extra["floor_ms"], floor_bound=r.extra.get("floor_bound"),
                       x_floor=_ratio(r.median_ms, r.extra["floor_ms"]) if ok else None,
                       x_floor_cpu=_ratio(cpu_ms, r.extra["floor_ms"] * threads) if ok and threads else None)
            row["goals"] = goals(row) if ok else None
        out.append(row)
    return out


def markdown_table(table: list[dict]) -> str:
    """One line per result. A subject with a FLOP formula (matmul-bound) shows model TFLOP/s in place of
    the bandwidth columns. When the whole-loss baseline ran, a column compares with the faster torch.compile
    baseline of each shape and names it."""
    shape_cols = [k for k in SHAPE_KEYS if any(k in row for row in table)]
    flop_table = any("tflops" in row for row in table)
    work = ["TFLOP/s"] if flop_table else ["GB/s", "% peak"]
    floor_table = any("floor_ms" in row for row in table)
    strongest = any(row["provider"] == "compiled-loss" for row in table)
    head = [HEADERS[k] for k in shape_cols] + [
        "provider", "median ms [p20, p80]", "CPU ms", *work, "tokens/s",
        "extra peak MiB (× logits)",
        "speed vs ref", "speed vs compiled", *(["speed vs strongest compiled"] if strongest else []),
        "memory vs ref"]
    head += ["floor ms", "× floor", "× floor (CPU)", "goals"] if floor_table else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        cells = [str(row.get(k, "")) for k in shape_cols]
        name = row["provider"] + (" (log-prob only)" if row["provider"] in LOGP_ONLY else "")
        if row["status"] != "ok":
            cells += [name, f"{row['status']}: {row['notes']}"] + ["-"] * (len(head) - len(cells) - 2)
        else:
            x = row["extra_peak_x_logits"]
            if flop_table:
                work_cells = ["-" if row.get("tflops") is None else f"{row['tflops']:.3g}"]
            else:
                work_cells = ["-" if row["gbs"] is None else f"{row['gbs']:.3g}",
                              "-" if row["pct_peak"] is None else f"{row['pct_peak']:.0f}%"]
            cells += [
                name,
                f"{row['median_ms']:.2f} [{row['p20_ms']:.2f}, {row['p80_ms']:.2f}]",
                "-" if row.get("cpu_median_ms") is None else f"{row['cpu_median_ms']:.1f}",
                *work_cells,
                "-" if row["tokens_per_s"] is None else f"{row['tokens_per_s']:,.0f}",
                _mb(None if row["extra_peak_mb"] is None else row["extra_peak_mb"] * 2**20)
                + ("" if x is None else f" ({x:.2f}×)"),
                _fmt_ratio(row["speedup_vs_reference"]),
                _fmt_ratio(row["speedup_vs_compiled"]),
                *([_fmt_ratio(row["speedup_vs_strongest_compiled"])
                   + (f" ({row['strongest_compiled']})" if row["speedup_vs_strongest_compiled"] else "")]
                  if strongest else []),
                _fmt_ratio(row["memory_vs_reference"]),
            ]
            if floor_table:
                cells += ["-" if row.get("floor_ms") is None else f"{row['floor_ms']:.1f} ({row['floor_bound']})",
                          _fmt_ratio(row.get("x_floor")), _fmt_ratio(row.get("x_floor_cpu")),
                          row.get("goals") or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(table: list[dict], path: str) -> None:
    keys: list[str] = []
    for row in table:
        keys += [k for k in row if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for row in table:
            w.writerow({k: ("" if v is None else v) for k, v in row.items()})


def plot(table: list[dict], path: str, title: str) -> bool:
    """Time and extra peak memory per provider: vs V when the run swept V, else bars per provider.

    One row of panels per (pass, dtype, N or model) group. Returns False when nothing can be plotted.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in table if r["status"] == "ok"]
    if not ok:
        return False
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in ok:
        groups[tuple(r.get(k) for k in SHAPE_KEYS if k != "vocab")].append(r)
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 3.2 * len(groups)), squeeze=False)
    for (key, group), (ax_t, ax_m) in zip(groups.items(), axes):
        label = ", ".join(f"{HEADERS[k]}={v}" for k, v in zip([k for k in SHAPE_KEYS if k != "vocab"], key)
                          if v is not None)
        vocabs = sorted({r.get("vocab") for r in group if r.get("vocab") is not None})
        providers = list(dict.fromkeys(r["provider"] for r in group))
        panels = ((ax_t, "median_ms", "time (ms)"), (ax_m, "extra_peak_mb", "extra peak (MiB)"))
        for ax, metric, ylabel in panels:
            if len(vocabs) > 1:
                for p in providers:
                    pts = sorted((r["vocab"], r[metric]) for r in group
                                 if r["provider"] == p and r[metric] is not None)
                    if pts:
                        line = ax.plot([v for v, _ in pts], [y for _, y in pts], marker="o", label=p)[0]
                        if metric == "median_ms":  # the p20-p80 spread of the repeats
                            band = sorted((r["vocab"], r["p20_ms"], r["p80_ms"]) for r in group
                                          if r["provider"] == p and r["p20_ms"] is not None)
                            ax.fill_between([b[0] for b in band], [b[1] for b in band], [b[2] for b in band],
                                            color=line.get_color(), alpha=0.15)
                ax.set_xscale("log")
                ax.set_xlabel("vocabulary V")
                ax.legend(fontsize=8)
            else:
                vals = [next((r[metric] for r in group if r["provider"] == p), None) for p in providers]
                ax.bar(providers, [0 if v is None or math.isnan(v) else v for v in vals],
                       color=[f"C{i}" for i in range(len(providers))])
            ax.set_ylabel(ylabel)
            ax.set_title(label, fontsize=9)
            ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def header_markdown(device: str, threads: int | None = None) -> str:
    h = environment_header(device, threads)
    peak = peak_bandwidth_gbs(h["device"]) if device.startswith("cuda") else None
    lines = [f"- {k}: {v}" for k, v in h.items()]
    lines.append(f"- peak memory bandwidth: {f'{peak:,.0f} GB/s' if peak else 'unknown (no % of peak)'}")
    return "\n".join(lines)


def write_report(sections: dict[str, list[Result]], device: str, out_dir: str,
                 extra_markdown: dict[str, str] | None = None, plots: bool = True,
                 threads: int | None = None) -> str:
    """Write results.md, <subject>.csv and <subject>.png into ``out_dir``; return the markdown."""
    os.makedirs(out_dir, exist_ok=True)
    name = environment_header(device, threads)["device"]
    parts = ["# mallowspo-fast benchmarks", "", header_markdown(device, threads), ""]
    for subject, results in sections.items():
        if not results:
            continue
        table = rows(results, name)
        parts += [f"## {subject}", "", markdown_table(table), ""]
        write_csv(table, os.path.join(out_dir, f"{subject}.csv"))
        if plots:
            plot(table, os.path.join(out_dir, f"{subject}.png"), f"{subject} on {name}")
    for title, md in (extra_markdown or {}).items():
        parts += [f"## {title}", "", md, ""]
    text = "\n".join(parts)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(text)
    return text
