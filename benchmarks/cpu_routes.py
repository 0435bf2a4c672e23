"""Side by side: what each CPU remedy of the op buys (the native loops, huge pages for the gradient).

``python -m benchmarks.cpu_routes [--shapes 2048x32000 4096x32000] [--dtypes fp32 bf16] [--rounds 5]``: the
op's forward and forward + backward (every 7th label ignored; loss = Σ g·log-prob + Σ h·H with random
per-token g, h; the gradient returned by ``torch.autograd.grad``, as the op benchmark does) in four
settings of the torch backend, switched by environment between calls of one process and interleaved in
every round (median of the pooled samples):

* ``inductor, 4 KiB``: the compiled Inductor loops, the gradient on ordinary pages (the library before
  the native loops and huge pages);
* ``inductor, huge``: the same with huge pages for the gradient (``ops/pages.py``);
* ``native, 4 KiB``: the native C loops (``ops/cpu_native.py``) on ordinary pages;
* ``native, huge``: both (the default).

Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

import mallowspo_fast as mpf
from mallowspo_fast.ops import cpu_native, pages

SETTINGS = {
    "inductor, 4 KiB": {cpu_native.NATIVE_ENV: "0", pages.HUGE_PAGES_ENV: "0"},
    "inductor, huge": {cpu_native.NATIVE_ENV: "0", pages.HUGE_PAGES_ENV: "1"},
    "native, 4 KiB": {cpu_native.NATIVE_ENV: "1", pages.HUGE_PAGES_ENV: "0"},
    "native, huge": {cpu_native.NATIVE_ENV: "1", pages.HUGE_PAGES_ENV: "1"},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _inputs(n: int, vocab: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(1, n, vocab, generator=gen) * 2).to(dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, (1, n), generator=gen)
    labels[:, ::7] = -100
    return x, labels, torch.randn(1, n, generator=gen), torch.randn(1, n, generator=gen)


def measure(n: int, vocab: int, dtype: torch.dtype, rounds: int, per_round: int) -> dict[str, dict[str, float]]:
    x, labels, g, h = _inputs(n, vocab, dtype)

    def fwd():
        with torch.no_grad():
            mpf.token_logprobs(x, labels)

    def fwdbwd():
        out = mpf.token_logprobs(x, labels)
        torch.autograd.grad((out.logps * g + out.entropy * h).sum(), x)

    passes = {"fwd": fwd, "fwdbwd": fwdbwd}
    times = {(s, p): [] for s in SETTINGS for p in passes}
    saved = {k: os.environ.get(k) for k in (cpu_native.NATIVE_ENV, pages.HUGE_PAGES_ENV)}
    try:
        for rnd in range(rounds + 1):  # round 0 is the warm-up (compilation, first pages)
            for setting, env in SETTINGS.items():
                os.environ.update(env)
                for name, fn in passes.items():
                    for _ in range(per_round):
                        t = time.perf_counter()
                        fn()
                        if rnd:
                            times[(setting, name)].append((time.perf_counter() - t) * 1e3)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {s: {p: statistics.median(times[(s, p)]) for p in passes} for s in SETTINGS}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_routes", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["2048x32000", "4096x32000"], help="NxV")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--per-round", type=int, default=2)
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, THP {pages.thp_mode()}; median ms, "
          f"{args.rounds} rounds x {args.per_round} calls per setting, interleaved\n")
    base = next(iter(SETTINGS))
    print("| N | V | dtype | setting | fwd ms | fwd+bwd ms | fwd+bwd speed-up vs " + base + " |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        n, vocab = (int(v) for v in shape.split("x"))
        for name in args.dtypes:
            m = measure(n, vocab, DTYPES[name], args.rounds, args.per_round)
            for setting, t in m.items():
                print(f"| {n} | {vocab} | {name} | {setting} | {t['fwd']:.1f} | {t['fwdbwd']:.1f} | "
                      f"{m[base]['fwdbwd'] / t['fwdbwd']:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
