"""Side by side: the memory mode on bf16 inputs with each chunk's logits in bf16 or in fp32 (``fp32_logits``).

``python -m benchmarks.fp32_logits [--device cpu] [--shapes 2048x256x32000 1024x1024x128256]``: forward +
backward of ``mpf.linear_sequence_logprobs`` (bf16 hidden states and weight, every 7th label ignored, loss =
Σ log-prob + 0.5·mean H), the two settings interleaved in every round, median of the pooled samples. The
accuracy of each setting is in the suite's accuracy subject (``ours`` and ``ours-fp32-logits``). Prints one
line per shape.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import mallowspo_fast as mpf


def measure(n: int, hidden_size: int, vocab: int, device: str, rounds: int, per_round: int) -> dict[bool, float]:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, n, hidden_size, generator=gen).to(device, torch.bfloat16).requires_grad_(True)
    weight = (torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.5).to(device, torch.bfloat16)
    weight.requires_grad_(True)
    labels = torch.randint(0, vocab, (1, n), generator=gen).to(device)
    labels[:, ::7] = -100

    def step(fp32: bool) -> None:
        out = mpf.linear_sequence_logprobs(hidden, weight, labels, fp32_logits=fp32)
        (out.logps.sum() + 0.5 * out.entropy.sum()).backward()
        hidden.grad = weight.grad = None
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for fp32 in (False, True):
        step(fp32)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(rounds):
        for fp32 in times:
            for _ in range(per_round):
                t = time.perf_counter()
                step(fp32)
                times[fp32].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fp32_logits", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", nargs="+", default=["2048x256x32000", "1024x1024x128256"], help="NxHxV")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--per-round", type=int, default=2)
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {args.device}; bf16 inputs, forward + backward, median ms")
    for shape in args.shapes:
        n, h, v = (int(x) for x in shape.split("x"))
        m = measure(n, h, v, args.device, args.rounds, args.per_round)
        print(f"N={n} H={h} V={v}: bf16 chunk logits {m[False]:.0f} ms, fp32 chunk logits {m[True]:.0f} ms "
              f"(fp32/bf16 {m[True] / m[False]:.2f}x)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
