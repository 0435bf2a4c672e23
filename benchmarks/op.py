"""The fused op alone: forward, backward and forward+backward of the per-token log-prob + entropy.

Byte formula (docs/kernels.md, "Byte budget"), with L = N·V·element_size of the logits:

* forward reads every logit once:                         bytes = L
* backward reads every logit and writes its gradient:     bytes = 2·L
* forward + backward:                                     bytes = 3·L

These are the bytes any implementation must move (the physical floor); "model bandwidth" is that
count divided by the measured time, so an implementation that moves more bytes shows a lower figure.

What is differentiated: ``Σ g·logp + Σ h·entropy`` with random per-token upstream values g, h. Every
provider computes its per-token outputs and the two weighted sums run eagerly, except ``compiled-loss``
(:func:`benchmarks.providers.whole_token_loss`), where torch.compile sees the whole loss, the sums
included, and its ``fwd`` pass is that loss's forward.

Usage::

    python -m benchmarks.op --device cpu --n 4096 --vocab 32000 --dtype fp32 --pass fwdbwd
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from .floor import Floor, floor_markdown, op_work
from .harness import (
    CONDITIONS,
    DTYPES,
    Case,
    Result,
    default_device,
    log,
    measure_floor_isolated,
    merge_results,
    run_case,
)
from .providers import LOSS_LEVEL, PROVIDERS, availability, token_fn, token_loss_fn
from .report import write_report

PASSES = ("fwd", "bwd", "fwdbwd")
BYTES_FACTOR = {"fwd": 1, "bwd": 2, "fwdbwd": 3}


def logits_bytes(n: int, vocab: int, dtype: str) -> int:
    return n * vocab * torch.tensor([], dtype=DTYPES[dtype]).element_size()


def op_bytes(n: int, vocab: int, dtype: str, pass_: str) -> int:
    """Model bytes of one pass over N unmasked tokens (see the module docstring)."""
    return BYTES_FACTOR[pass_] * logits_bytes(n, vocab, dtype)


def make_inputs(n: int, vocab: int, dtype: str, device: str, seed: int = 0):
    """Logits [N, V] (requires grad), labels [N], upstream grads of logp and entropy [N] fp32."""
    # Drawn on the device itself: a host generator fills [N, V] at ~1e8 samples/s, tens of seconds per case
    # at the largest GPU shapes (on CPU the values are the same as before).
    gen = torch.Generator(device=device).manual_seed(seed)
    # Spread like real LM logits (std ~2) so that exp() work is representative.
    logits = torch.randn(n, vocab, generator=gen, device=device).mul_(2.0).to(DTYPES[dtype])
    labels = torch.randint(0, vocab, (n,), generator=gen, device=device)
    grad_logp = torch.randn(n, generator=gen, device=device)
    grad_entropy = torch.randn(n, generator=gen, device=device)
    return logits.requires_grad_(True), labels, grad_logp, grad_entropy


def build_case(spec: dict[str, Any]) -> Case:
    device, pass_, provider = spec["device"], spec["pass"], spec["provider"]
    if spec.get("acc") is not None:  # the compiled loops' row sums, before anything compiles
        from .accumulation import set_compiled_accumulation

        set_compiled_accumulation(spec["acc"])
    logits, labels, g, h = make_inputs(spec["n"], spec["vocab"], spec["dtype"], device, spec.get("seed", 0))
    if provider in LOSS_LEVEL:  # the whole loss in one graph: its forward is the loss
        loss_fn = token_loss_fn(provider, device)
        forward = loss = lambda: loss_fn(logits, labels, g, h)  # noqa: E731
    else:
        fn = token_fn(provider, device)

        def forward():
            return fn(logits, labels)

        def loss():
            logp, entropy = fn(logits, labels)
            out = (logp * g).sum()
            return out + (entropy * h).sum() if entropy is not None else out

    def clear_grad():
        logits.grad = None

    if pass_ == "fwd":
        setup = clear_grad
        run = lambda _: forward()  # noqa: E731  (keeps the graph alive: a training forward)
    elif pass_ == "bwd":
        def setup():
            clear_grad()
            return loss()

        run = lambda out: out.backward()  # noqa: E731
    elif pass_ == "fwdbwd":
        setup = clear_grad
        run = lambda _: loss().backward()  # noqa: E731
    else:
        raise ValueError(f"pass must be one of {PASSES}, got {pass_!r}")
    n, v, dt = spec["n"], spec["vocab"], spec["dtype"]
    # Every token is unmasked here: the byte formula counts all N rows.
    return Case(run, setup, clear_grad, bytes_moved=op_bytes(n, v, dt, pass_), tokens=n,
                input_bytes=logits_bytes(n, v, dt))


def sweep(
    device: str,
    ns: list[int],
    vocabs: list[int],
    dtypes: list[str],
    passes: list[str],
    providers: list[str],
    warmup: int,
    repeats: int,
    memory: bool = True,
    log=log,
    threads: int | None = None,
    conditions: tuple[str, ...] | list[str] = ("quiet",),
    rounds: int = 1,
    floor: Floor | None = None,
) -> list[Result]:
    """Every case (pass x dtype x N x V x condition x provider) in its own process. With ``rounds`` > 1
    the whole list runs that many times, providers of a shape next to each other in every round, and
    each case's samples are pooled over the rounds: a side-by-side comparison that a burst of load on a
    shared machine cannot bias towards one provider. ``floor`` adds each case's floor (CPU)."""
    if rounds < 1:
        raise ValueError(f"sweep: rounds must be >= 1, got {rounds}")
    specs = []
    for pass_ in passes:
        for dtype in dtypes:
            for n in ns:
                for vocab in vocabs:
                    for condition in conditions:
                        for provider in providers:
                            spec = {"subject": "op", "device": device, "provider": provider, "pass": pass_,
                                    "n": n, "vocab": vocab, "dtype": dtype, "warmup": warmup,
                                    "repeats": repeats, "memory": memory, "threads": threads}
                            if condition != "quiet" or len(conditions) > 1:
                                spec["condition"] = condition
                            specs.append(spec)
    runs: list[list[Result]] = [[] for _ in specs]
    for r in range(rounds):
        for spec, done in zip(specs, runs):
            label = (f"op {spec['pass']:6s} N={spec['n']:<6d} V={spec['vocab']:<7d} {spec['dtype']} "
                     f"{spec.get('condition', 'quiet'):11s} {spec['provider']:9s}"
                     + (f" (round {r + 1}/{rounds})" if rounds > 1 else ""))
            done.append(run_case(spec, availability(spec["provider"], device), label, log))
    results = [merge_results(done) if len(done) > 1 else done[0] for done in runs]
    if floor is not None:
        add_floor(results, floor)
    return results


def add_floor(results: list[Result], floor: Floor) -> None:
    """Attach each case's floor time (``benchmarks.floor``) to its result."""
    for r in results:
        s = r.spec
        work = op_work(s["n"], s["vocab"], torch.tensor([], dtype=DTYPES[s["dtype"]]).element_size(), s["pass"])
        r.extra["floor_ms"] = floor.time_ms(*work)
        r.extra["floor_bound"] = floor.bound(*work)
        r.extra["floor_threads"] = floor.threads


def add_sweep_args(p: argparse.ArgumentParser, device: str) -> None:
    cuda = device.startswith("cuda")
    p.add_argument("--n", type=int, nargs="+", default=[8192] if cuda else [4096], help="tokens N")
    p.add_argument("--vocab", type=int, nargs="+",
                   default=[32000, 128256, 151936, 256000] if cuda else [32000, 128256])
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["bf16"] if cuda else ["fp32"])
    p.add_argument("--providers", nargs="+", choices=list(PROVIDERS), default=list(PROVIDERS))
    p.add_argument("--warmup", type=int, default=10 if cuda else 2)
    p.add_argument("--repeats", type=int, default=50 if cuda else 10)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory run")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per case (default: torch's)")
    p.add_argument("--conditions", nargs="+", choices=CONDITIONS, default=["quiet"],
                   help="CPU: quiet, thread (a sampling thread beside the case), thread+mmap (and glibc "
                        "MALLOC_MMAP_THRESHOLD_=65536), thp (THP_MEM_ALLOC_ENABLE=1: huge pages for every "
                        "large allocation, baselines included)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every case this many times, interleaved, and pool the samples")
    p.add_argument("--no-floor", action="store_true", help="CPU: skip measuring the machine's floor")


def main(argv: list[str] | None = None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--device", default=default_device())
    device = pre.parse_known_args(argv)[0].device
    p = argparse.ArgumentParser(description="Benchmark the fused log-prob / entropy op", parents=[pre])
    add_sweep_args(p, device)
    p.add_argument("--pass", dest="passes", nargs="+", choices=PASSES, default=list(PASSES))
    p.add_argument("--out", default="bench_results", help="output folder (table, CSV, plot)")
    args = p.parse_args(argv)
    floor = None if args.no_floor else measure_floor_isolated(device, args.threads)
    results = sweep(device, args.n, args.vocab, args.dtype, args.passes, args.providers, args.warmup,
                    args.repeats, memory=not args.no_memory, threads=args.threads, conditions=args.conditions,
                    rounds=args.rounds)
    if floor is not None:  # measured before and after the cases: the higher of each rate
        floor = floor.best(measure_floor_isolated(device, args.threads))
        add_floor(results, floor)
    extra = {"floor": floor_markdown(floor)} if floor is not None else None
    print(write_report({"op": results}, device, args.out, extra, threads=args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
