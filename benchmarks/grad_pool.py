"""Side by side: the CPU gradient pool (``MALLOWSPO_FAST_GRAD_POOL``) on and off.

``python -m benchmarks.grad_pool [--shapes 2048x32000 4096x32000] [--rounds 5]``: the op's forward +
backward (fp32, every 7th label ignored, loss = Σ log-prob + 0.5·Σ H) on non-leaf logits (``x * 1.0``, as
logits coming out of a model are: the pool serves only non-leaf logits), the two settings interleaved in
every round, median of the pooled samples. The pool keeps the gradient buffer between steps; off, each
backward gets fresh pages from the OS. Prints one line per shape.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

import mallowspo_fast as mpf
from mallowspo_fast.ops import torch_path


def _step(x: torch.Tensor, labels: torch.Tensor) -> None:
    out = mpf.token_logprobs(x * 1.0, labels)
    (out.logps.sum() + 0.5 * out.entropy.sum()).backward()
    x.grad = None


def measure(n: int, vocab: int, rounds: int, per_round: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(1, n, vocab, generator=gen) * 3).requires_grad_(True)
    labels = torch.randint(0, vocab, (1, n), generator=gen)
    labels[:, ::7] = -100
    times: dict[str, list[float]] = {"0": [], "1": []}
    saved = os.environ.get(torch_path.POOL_ENV)
    try:
        for setting in times:  # warm-up: compile, first pages
            os.environ[torch_path.POOL_ENV] = setting
            _step(x, labels)
            _step(x, labels)
        for _ in range(rounds):
            for setting in times:
                os.environ[torch_path.POOL_ENV] = setting
                if setting == "0":
                    torch_path._GradPool.buffers.clear()
                for _ in range(per_round):
                    t = time.perf_counter()
                    _step(x, labels)
                    times[setting].append((time.perf_counter() - t) * 1e3)
    finally:
        torch_path._GradPool.buffers.clear()
        if saved is None:
            os.environ.pop(torch_path.POOL_ENV, None)
        else:
            os.environ[torch_path.POOL_ENV] = saved
    return {"off": statistics.median(times["0"]), "on": statistics.median(times["1"])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.grad_pool", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["2048x32000", "4096x32000", "2048x128256"], help="NxV")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--per-round", type=int, default=3)
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fp32, forward + backward, median ms")
    for shape in args.shapes:
        n, vocab = (int(v) for v in shape.split("x"))
        m = measure(n, vocab, args.rounds, args.per_round)
        print(f"N={n} V={vocab}: pool off {m['off']:.1f} ms, pool on {m['on']:.1f} ms, "
              f"off/on {m['off'] / m['on']:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
