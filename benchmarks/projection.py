"""Projection for GPUs we cannot run on: kernel resources from AOT compilation + the roofline floor.

Two tables, both PROJECTIONS (nothing here is measured on a GPU):

1. Resources of every shipped kernel x sm_80 / sm_90 x dtype x V, from
   :func:`mallowspo_fast.ops.aot.compile_report` (registers, spills, shared memory, occupancy estimate,
   and the public ops that launch each variant: the memory mode runs the same compiled variants).
2. The roofline floor of the op from its byte budget (docs/kernels.md, "Byte budget"): forward moves
   L = N·V·elem bytes, backward 2·L, forward + backward 3·L; floor time = bytes / peak HBM bandwidth of the
   device. The
   targets column applies the docs/kernels.md "Targets" goals (forward at 80 %, backward at 75 % of peak).

Usage::

    python -m benchmarks.projection [--n 8192 16384] [--vocab ...] [--dtype bf16] [--no-compile] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from .harness import PEAK_BANDWIDTH_GBS

VOCABS = (32000, 128256, 151936, 256000)
ELEMENT_SIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
# The devices the projection table shows by default (names as in harness.PEAK_BANDWIDTH_GBS).
DEVICES = ("A100-SXM4-40GB", "A100-SXM4-80GB", "H100 SXM", "H100 PCIe", "H200", "L4", "RTX 4090")
TARGET_FRACTION = {"fwd": 0.80, "bwd": 0.75}
PROJECTION_NOTE = ("**Projection, not a measurement**: floor = bytes of the byte budget / datasheet peak "
                   "bandwidth; targets = floor / (0.80 forward, 0.75 backward).")


def peak_by_name(name: str) -> float:
    for key, gbs in PEAK_BANDWIDTH_GBS:
        if key == name:
            return gbs
    raise ValueError(f"no peak bandwidth for device {name!r}; known: {[k for k, _ in PEAK_BANDWIDTH_GBS]}")


def floor_ms(n: int, vocab: int, dtype: str, peak_gbs: float) -> dict[str, float]:
    """Roofline floor in ms of fwd (L), bwd (2L) and fwd+bwd (3L), L = N·V·element_size bytes."""
    if dtype not in ELEMENT_SIZE:
        raise ValueError(f"dtype must be one of {tuple(ELEMENT_SIZE)}, got {dtype!r}")
    lbytes = n * vocab * ELEMENT_SIZE[dtype]
    per_byte_ms = 1e3 / (peak_gbs * 1e9)
    return {"fwd": lbytes * per_byte_ms, "bwd": 2 * lbytes * per_byte_ms, "fwdbwd": 3 * lbytes * per_byte_ms}


def roofline_table(ns, vocabs, dtypes, devices=DEVICES) -> str:
    head = ("| device | peak GB/s | N | V | dtype | logits GB | floor fwd ms | floor bwd ms "
            "| floor fwd+bwd ms | target fwd ms | target bwd ms |")
    lines = [PROJECTION_NOTE, "", head, "|" + "---|" * 11]
    for dev in devices:
        peak = peak_by_name(dev)
        for dtype in dtypes:
            for n in ns:
                for v in vocabs:
                    f = floor_ms(n, v, dtype, peak)
                    gb = n * v * ELEMENT_SIZE[dtype] / 1e9
                    target_fwd = f["fwd"] / TARGET_FRACTION["fwd"]
                    target_bwd = f["bwd"] / TARGET_FRACTION["bwd"]
                    lines.append(
                        f"| {dev} | {peak:,.0f} | {n} | {v} | {dtype} | {gb:.2f} | {f['fwd']:.2f} | "
                        f"{f['bwd']:.2f} | {f['fwdbwd']:.2f} | {target_fwd:.2f} | {target_bwd:.2f} |")
    return "\n".join(lines)


def compile_rows(archs, dtypes, vocabs, timeout_s: float = 900.0) -> tuple[list[dict], str]:
    """Run the AOT report in a clean process (it needs TRITON_INTERPRET unset). Returns (rows, error)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "aot.json")
        cmd = [sys.executable, "-W", "ignore", "-m", "mallowspo_fast.ops.aot", "--json", path,
               "--arch", *map(str, archs), "--dtype", *dtypes, "--vocab", *map(str, vocabs)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return [], f"AOT compilation timed out after {timeout_s:.0f} s"
        if not os.path.exists(path):
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-2:])
            return [], f"AOT compilation failed (exit {proc.returncode}): {tail[-300:]}"
        with open(path) as f:
            return json.load(f), ""


def resources_table(rows: list[dict]) -> str:
    head = ("| kernel | sm | dtype | V | BLOCK | warps | regs | spills st/ld (B) | smem (B) | est. occupancy "
            "| used by |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['arch']} | {r['dtype'] or 'any'} | {r['vocab'] or 'any'} | {r['block']} | "
                     f"{r['num_warps']} | {r['registers']} | {r['spill_stores']}/{r['spill_loads']} | "
                     f"{r['shared_bytes']} | {r['occupancy']:.2f} | {', '.join(r.get('used_by', []))} |")
    return "\n".join(lines)


def projection_markdown(ns=(8192, 16384), vocabs=VOCABS, dtypes=("bf16",), archs=(80, 90),
                        compile_kernels: bool = True) -> str:
    parts = ["### Kernel resources (ahead-of-time compilation for sm_80 / sm_90; projection)", ""]
    if compile_kernels:
        rows, error = compile_rows(archs, dtypes, vocabs)
        parts.append(resources_table(rows) if rows else f"Not available: {error}")
    else:
        parts.append("Skipped (--no-compile).")
    parts += ["", "### Roofline floor from the byte budget (projection)", "",
              roofline_table(ns, vocabs, dtypes)]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Projected resources and roofline floor of the fused op")
    p.add_argument("--n", type=int, nargs="+", default=[8192, 16384])
    p.add_argument("--vocab", type=int, nargs="+", default=list(VOCABS))
    p.add_argument("--dtype", nargs="+", choices=list(ELEMENT_SIZE), default=["bf16"])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    p.add_argument("--no-compile", action="store_true", help="only the roofline table")
    p.add_argument("--out", default="bench_results")
    args = p.parse_args(argv)
    md = projection_markdown(args.n, args.vocab, args.dtype, args.arch, not args.no_compile)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "projection.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
