"""Where the time of the torch path goes on CPU: its routes under the suite's conditions, with counts.

For each route of ``backend="torch"`` (``eager``: the chunked eager ops; ``compiled``: the two fused
loops of torch.compile; ``native``: our C loops, see ``mallowspo_fast/ops/torch_path.py``;
``native-4k``: the native loops with the gradient on ordinary pages, ``MALLOWSPO_FAST_HUGE_PAGES=0``)
and each condition of the benchmark
suite (``quiet``, ``thread``, ``thread+mmap``; see ``benchmarks/harness.py``), one process runs forward +
backward like a training step (random logits [N, V] with requires_grad, every ``--mask-every``-th label
ignored, loss = logps.sum() + 0.5·entropy.sum(), ``x.grad = None`` between repeats) and reports per call:

* wall ms and process CPU ms (median of the repeats after a warm-up that includes compilation);
* aten ops per call (``torch.profiler``, one extra profiled call): the number of dispatches, each of
  which releases and re-takes the GIL and starts a parallel region of its own;
* minor page faults per call (``getrusage``): fresh pages of new buffers, the gradient included;
* voluntary / involuntary context switches per call of the main thread's process.

Counts do not depend on the load of the machine; times do (compare within one run).

Usage::

    python -m benchmarks.profile_op --n 4096 --vocab 32000 --dtype fp32
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from .harness import CONDITIONS, DTYPES, StatmSampler, _child_env

ROUTES = ("eager", "compiled", "native", "native-4k")
# route -> (MALLOWSPO_FAST_TORCH_COMPILE, MALLOWSPO_FAST_NATIVE, MALLOWSPO_FAST_HUGE_PAGES)
ROUTE_ENV = {"eager": ("0", "0", "1"), "compiled": ("1", "0", "1"), "native": ("1", "1", "1"),
             "native-4k": ("1", "1", "0")}


def _child(cfg: dict) -> dict:
    import torch

    import mallowspo_fast as mpf

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    gen = torch.Generator().manual_seed(0)
    n, vocab = cfg["n"], cfg["vocab"]
    x = (2 * torch.randn(n, vocab, generator=gen)).to(DTYPES[cfg["dtype"]]).requires_grad_(True)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    if cfg["mask_every"]:
        labels[:: cfg["mask_every"]] = -100

    def step():
        out = mpf.token_logprobs(x, labels, backend="torch")
        (out.logps.sum() + 0.5 * out.entropy.sum()).backward()
        x.grad = None

    step()  # warm-up (compilation for the compiled route)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
    top = sorted(((e.key, e.count) for e in prof.key_averages() if e.key.startswith("aten::")),
                 key=lambda kv: -kv[1])[:6]
    walls, cpus, faults, vcs, ivcs = [], [], [], [], []
    sampler = StatmSampler() if "thread" in cfg["condition"] else None
    if sampler:
        sampler.__enter__()
    try:
        for _ in range(cfg["repeats"]):
            r0, c0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
            step()
            t1, c1, r1 = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
            walls.append((t1 - t0) * 1e3)
            cpus.append((c1 - c0) * 1e3)
            faults.append(r1.ru_minflt - r0.ru_minflt)
            vcs.append(r1.ru_nvcsw - r0.ru_nvcsw)
            ivcs.append(r1.ru_nivcsw - r0.ru_nivcsw)
    finally:
        if sampler:
            sampler.__exit__(None, None, None)
    med = statistics.median
    return {"wall_ms": med(walls), "cpu_ms": med(cpus), "aten_ops": ops, "top_ops": top,
            "minor_faults": med(faults), "vol_cs": med(vcs), "invol_cs": med(ivcs),
            "threads": torch.get_num_threads()}


def run(cfg: dict) -> dict:
    env = _child_env({"device": "cpu", "condition": cfg["condition"]})
    names = ("MALLOWSPO_FAST_TORCH_COMPILE", "MALLOWSPO_FAST_NATIVE", "MALLOWSPO_FAST_HUGE_PAGES")
    env.update(zip(names, ROUTE_ENV[cfg["route"]]))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.profile_op", "--child", json.dumps(cfg)],
                          capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(cases: list[tuple[dict, dict]]) -> str:
    head = ["route", "condition", "wall ms", "CPU ms", "aten ops / call", "minor faults / call",
            "context switches / call (vol, invol)", "most frequent ops"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cfg, r in cases:
        if "error" in r:
            lines.append(f"| {cfg['route']} | {cfg['condition']} | error: {r['error']} |" + " |" * 5)
            continue
        top = ", ".join(f"{k.removeprefix('aten::')} {c}" for k, c in r["top_ops"][:4])
        lines.append(f"| {cfg['route']} | {cfg['condition']} | {r['wall_ms']:.0f} | {r['cpu_ms']:.0f} | "
                     f"{r['aten_ops']:,} | {r['minor_faults']:,.0f} | {r['vol_cs']:.0f}, {r['invol_cs']:.0f} | {top} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Profile the torch path's routes under the suite's conditions")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--mask-every", type=int, default=7, help="every k-th label is ignored (0: none)")
    p.add_argument("--routes", nargs="+", choices=ROUTES, default=list(ROUTES))
    p.add_argument("--conditions", nargs="+", choices=CONDITIONS, default=list(CONDITIONS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds; each case keeps its median round")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    cfgs = [{"route": r, "condition": c, "n": args.n, "vocab": args.vocab, "dtype": args.dtype,
             "mask_every": args.mask_every, "repeats": args.repeats, "threads": args.threads}
            for c in args.conditions for r in args.routes]
    runs: list[list[dict]] = [[] for _ in cfgs]
    for _ in range(args.rounds):
        for cfg, done in zip(cfgs, runs):
            done.append(run(cfg))
            print(f"  {cfg['route']:8s} {cfg['condition']:11s} {done[-1].get('wall_ms', done[-1])}", file=sys.stderr,
                  flush=True)
    cases = []
    for cfg, done in zip(cfgs, runs):
        ok = sorted((r for r in done if "error" not in r), key=lambda r: r["wall_ms"])
        cases.append((cfg, ok[len(ok) // 2] if ok else done[0]))
    print(f"N = {args.n}, V = {args.vocab}, {args.dtype}, every {args.mask_every}-th label ignored, "
          f"{os.cpu_count()} CPUs\n")
    print(markdown(cases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
