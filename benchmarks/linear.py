"""The memory mode: per-sequence log-probs and entropies from hidden states and the output weight.

Every provider starts from the same inputs, hidden [B, T, H] and weight [V, H] (both requiring grad) and
labels [B, T] (B = gcd(N, 8) sequences of N / B tokens), and differentiates ``Σ_b g_b·logps_b +
Σ_b h_b·entropy_b`` with random upstream grads (see :data:`benchmarks.providers.LINEAR_DESCRIPTIONS`):
``ours-chunked`` (``linear_sequence_logprobs``), ``ours-logits`` (``F.linear`` + ``sequence_logprobs``),
the eager reference, ``torch.compile`` of it, and Liger-Kernel's fused linear cross entropy.

FLOP formula: this op is bound by its [N, H] x [H, V] products, not by bytes, so the tables report model
TFLOP/s (no GB/s). Over the U unmasked tokens:

* forward, the logits product:                                      flops = 2·U·H·V
* backward, the gradients of hidden and of the weight:              flops = 4·U·H·V
* forward + backward:                                               flops = 6·U·H·V

These are the products any implementation must compute. The memory mode executes one more in its
backward (each chunk's logits are recomputed: 6·U·H·V for bwd, 8·U·H·V for fwd + bwd), so its model
TFLOP/s is 2/3 (bwd) and 3/4 (fwd + bwd) of the rate at which it actually computes.

Memory: *extra peak* = peak − inputs − the gradients of hidden and weight in their dtype (outputs every
provider returns; the fwd pass has none), reported × the logits size N·V·element_size. For the logits
paths it holds the logits and their gradient; for the memory mode, chunk buffers and the fp32 weight-
gradient accumulator.

Usage::

    python -m benchmarks.linear --device cpu --n 2048 --hidden 256 --vocab 32000 --dtype fp32 --pass fwdbwd
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import torch

from .harness import DTYPES, Case, Result, default_device, log, run_case
from .providers import IGNORE_INDEX, LINEAR_PROVIDERS, linear_availability, linear_fn
from .report import write_report

PASSES = ("fwd", "bwd", "fwdbwd")
PROVIDERS = LINEAR_PROVIDERS
FLOPS_FACTOR = {"fwd": 2, "bwd": 4, "fwdbwd": 6}
SEQUENCES = 8


def linear_flops(tokens: int, hidden: int, vocab: int, pass_: str) -> int:
    """Model FLOPs of one pass over ``tokens`` unmasked tokens (see the module docstring)."""
    return FLOPS_FACTOR[pass_] * tokens * hidden * vocab


def make_inputs(n: int, hidden: int, vocab: int, dtype: str, device: str, mask_frac: float = 0.0,
                seed: int = 0):
    """hidden [B, N/B, H] and weight [V, H] (requiring grad), labels [B, N/B] with a fraction
    ``mask_frac`` masked at random, upstream grads of logps and entropy [B] fp32."""
    gen = torch.Generator(device=device).manual_seed(seed)
    batch = math.gcd(n, SEQUENCES)
    seq = n // batch
    dt = DTYPES[dtype]
    h = torch.randn(batch, seq, hidden, generator=gen, device=device).to(dt)
    # Logits of std ~2 like benchmarks.op, so that exp() work is representative.
    w = (torch.randn(vocab, hidden, generator=gen, device=device) * (2.0 / hidden**0.5)).to(dt)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen, device=device)
    if mask_frac > 0:
        labels[torch.rand(labels.shape, generator=gen, device=device) < mask_frac] = IGNORE_INDEX
    g = torch.randn(batch, generator=gen, device=device)
    e = torch.randn(batch, generator=gen, device=device)
    return h.requires_grad_(True), w.requires_grad_(True), labels, g, e


def build_case(spec: dict[str, Any]) -> Case:
    device, pass_ = spec["device"], spec["pass"]
    fn = linear_fn(spec["provider"], device, spec.get("chunk_size"))
    n, dim, vocab, dtype = spec["n"], spec["hidden"], spec["vocab"], spec["dtype"]
    hidden, weight, labels, g, e = make_inputs(n, dim, vocab, dtype, device, spec.get("mask_frac", 0.0),
                                               spec.get("seed", 0))

    def loss_of(logps, entropy):
        loss = (logps * g).sum()
        return loss + (entropy * e).sum() if entropy is not None else loss

    def clear_grads():
        hidden.grad = None
        weight.grad = None

    if pass_ == "fwd":
        setup = clear_grads
        run = lambda _: fn(hidden, weight, labels)  # noqa: E731  (keeps the graph alive: a training forward)
    elif pass_ == "bwd":
        def setup():
            clear_grads()
            return loss_of(*fn(hidden, weight, labels))

        run = lambda loss: loss.backward()  # noqa: E731
    elif pass_ == "fwdbwd":
        setup = clear_grads
        run = lambda _: loss_of(*fn(hidden, weight, labels)).backward()  # noqa: E731
    else:
        raise ValueError(f"pass must be one of {PASSES}, got {pass_!r}")
    unmasked = int((labels != IGNORE_INDEX).sum())
    elem = hidden.element_size()
    grads = 0 if pass_ == "fwd" else (hidden.numel() + weight.numel()) * elem
    return Case(run, setup, clear_grads, tokens=unmasked, input_bytes=n * vocab * elem,
                flops=linear_flops(unmasked, dim, vocab, pass_), output_bytes=grads)


def sweep(
    device: str,
    ns: list[int],
    hiddens: list[int],
    vocabs: list[int],
    dtypes: list[str],
    passes: list[str],
    providers: list[str],
    warmup: int,
    repeats: int,
    memory: bool = True,
    log=log,
    threads: int | None = None,
    mask_frac: float = 0.0,
    chunk_size: int | None = None,
) -> list[Result]:
    results = []
    for pass_ in passes:
        for dtype in dtypes:
            for n in ns:
                for dim in hiddens:
                    for vocab in vocabs:
                        for provider in providers:
                            spec = {"subject": "linear", "device": device, "provider": provider, "pass": pass_,
                                    "n": n, "hidden": dim, "vocab": vocab, "dtype": dtype, "mask_frac": mask_frac,
                                    "chunk_size": chunk_size, "warmup": warmup, "repeats": repeats,
                                    "memory": memory, "threads": threads}
                            label = f"linear {pass_:6s} N={n:<6d} H={dim:<5d} V={vocab:<7d} {dtype} {provider:12s}"
                            results.append(run_case(spec, linear_availability(provider, device), label, log))
    return results


def main(argv: list[str] | None = None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--device", default=default_device())
    device = pre.parse_known_args(argv)[0].device
    cuda = device.startswith("cuda")
    p = argparse.ArgumentParser(description="Benchmark the memory mode (hidden states + output weight -> "
                                "log-probs) against the logits path and peers", parents=[pre])
    p.add_argument("--n", type=int, nargs="+", default=[8192] if cuda else [2048], help="tokens N")
    p.add_argument("--hidden", type=int, nargs="+", default=[4096] if cuda else [256], help="hidden size H")
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256, 151936] if cuda else [32000])
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["bf16"] if cuda else ["fp32"])
    p.add_argument("--pass", dest="passes", nargs="+", choices=PASSES, default=list(PASSES))
    p.add_argument("--providers", nargs="+", choices=LINEAR_PROVIDERS, default=list(LINEAR_PROVIDERS))
    p.add_argument("--mask-frac", type=float, default=0.0, help="fraction of masked tokens (random)")
    p.add_argument("--chunk-size", type=int, default=None, help="ours-chunked: rows per chunk (default: the op's)")
    p.add_argument("--warmup", type=int, default=5 if cuda else 1)
    p.add_argument("--repeats", type=int, default=20 if cuda else 5)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory run")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per case (default: torch's)")
    p.add_argument("--out", default="bench_results", help="output folder (table, CSV, plot)")
    args = p.parse_args(argv)
    if not 0.0 <= args.mask_frac < 1.0:
        p.error(f"--mask-frac must lie in [0, 1), got {args.mask_frac}")
    results = sweep(device, args.n, args.hidden, args.vocab, args.dtype, args.passes, args.providers,
                    args.warmup, args.repeats, memory=not args.no_memory, threads=args.threads,
                    mask_frac=args.mask_frac, chunk_size=args.chunk_size)
    print(write_report({"linear": results}, device, args.out, threads=args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
