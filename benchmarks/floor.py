"""This machine's floor for the op, measured in the same run as the op cases.

Any implementation of the op must move some bytes and compute some exponentials; the floor of a case
is the larger of the two times this machine needs for them at its best measured rates:

    floor = max(bytes / bandwidth, exps / exp_rate)

Work model (N unmasked tokens, V vocabulary, L = N·V·element_size of the logits):

=========  =================================  ==========================================================
pass       bytes                              exps
=========  =================================  ==========================================================
fwd        L (each logit read once)           N·V (every exp(z − max) of the softmax sum)
bwd        2·L (read the logits, write dz)    N·V (p = exp(z − lse), needed by every gradient element)
fwdbwd     3·L                                2·N·V (keeping p from the forward would cost L written
                                              and L read again, more than the exps on a CPU)
=========  =================================  ==========================================================

Rates, measured with torch on all the threads a case uses (``torch.get_num_threads()``):

* bandwidth: the larger of a large copy (``dst.copy_(src)``, 2 bytes moved per byte copied) and a
  large read-reduce (``src.sum()``), on warm buffers of ``size_mib`` (far beyond the last-level cache);
* exp rate: the best of ``torch.exp(x, out=y)`` on cache-resident fp32 buffers (64 Ki to 1 Mi elements),
  repeated, the same buffers' ``torch.exp(x).sum()`` compiled by ``torch.compile`` (one fused loop, no
  store) and, where the native CPU kernels build (``mallowspo_fast/ops/cpu_native.py``), their
  exponential summed over the same buffers; the best size and method count. The op's own
  loops compute their exps with that exponential, so the floor never credits a case with an exp rate the
  machine was not measured to reach.

On a shared machine the wall-clock rates of all threads drop with the load (a descheduled thread stalls
every parallel region), so each rate is also measured on one thread by that thread's CPU time (time
spent descheduled does not count) and the higher figure is kept: the exp rate of one core times the
threads of a case, the read bandwidth of one core as it is. The floor stays a lower bound on the time
of the work on this machine; compare it with the CPU time of a case ("× floor (CPU)": CPU ms over
floor ms × threads) when the machine is busy.

Each rate is the median of ``repeats`` timed runs after one warm-up; the suite measures before and after
its op cases and keeps the higher of each rate. The floor is a property of the
machine and of the work model, not of any implementation: "× floor" in the op table is the time of a
case divided by the floor of its shape (1.0 would mean running at the measured limits).

Usage::

    python -m benchmarks.floor [--threads N] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

WORK_PASSES = {"fwd": (1, 1), "bwd": (2, 1), "fwdbwd": (3, 2)}  # pass -> (bytes in L, exps in N·V)
EXP_SIZES = (64 * 1024, 256 * 1024, 1024 * 1024)


@dataclass
class Floor:
    copy_gbs: float  # bytes moved (read + write) per second by a large copy
    read_gbs: float  # bytes read per second by a large sum
    exp_per_s: float  # fp32 exponentials per second, cache-resident
    threads: int

    @property
    def bandwidth_gbs(self) -> float:
        return max(self.copy_gbs, self.read_gbs)

    def time_ms(self, nbytes: float, exps: float) -> float:
        """The floor of a piece of work: the larger of its memory time and its exp time."""
        return max(nbytes / (self.bandwidth_gbs * 1e9), exps / self.exp_per_s) * 1e3

    def best(self, other: Floor | None) -> Floor:
        """The higher of each rate of two measurements (taken before and after the cases of a run)."""
        if other is None:
            return self
        return Floor(max(self.copy_gbs, other.copy_gbs), max(self.read_gbs, other.read_gbs),
                     max(self.exp_per_s, other.exp_per_s), self.threads)

    def bound(self, nbytes: float, exps: float) -> str:
        return "memory" if nbytes / (self.bandwidth_gbs * 1e9) >= exps / self.exp_per_s else "exp"


def op_work(n: int, vocab: int, element_size: int, pass_: str) -> tuple[int, int]:
    """(bytes, exps) any implementation of ``pass_`` needs for N unmasked tokens (module docstring)."""
    if pass_ not in WORK_PASSES:
        raise ValueError(f"op_work: pass must be one of {tuple(WORK_PASSES)}, got {pass_!r}")
    if n < 0 or vocab < 0 or element_size <= 0:
        raise ValueError(f"op_work: expected n, vocab >= 0 and element_size > 0, got {n}, {vocab}, {element_size}")
    nbytes, nexps = WORK_PASSES[pass_]
    return nbytes * n * vocab * element_size, nexps * n * vocab


def _median_s(fn: Callable[[], object], repeats: int, clock: Callable[[], float] = time.perf_counter) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        samples.append(clock() - t0)
    return statistics.median(samples)


def measure_floor(size_mib: int = 512, repeats: int = 5, threads: int | None = None) -> Floor:
    """Measure the bandwidth and exp rate of this machine (see the module docstring)."""
    if size_mib <= 0 or repeats <= 0:
        raise ValueError(f"measure_floor: expected size_mib > 0 and repeats > 0, got {size_mib}, {repeats}")
    if threads:
        torch.set_num_threads(threads)
    n = size_mib * 2**20 // 4
    src = torch.rand(n)
    dst = torch.empty_like(src)
    dst.fill_(0.0)  # fault the pages in before timing
    threads = torch.get_num_threads()
    copy_s = _median_s(lambda: dst.copy_(src), repeats)
    read_s = _median_s(src.sum, repeats)
    nbytes = n * 4
    with _one_thread():  # the CPU-time rate of one thread, immune to time spent descheduled
        read_s = min(read_s, _median_s(src.sum, repeats, clock=time.thread_time))
    src = dst = None  # free the large buffers before the exp measurement
    best_exp = 0.0
    for size in EXP_SIZES:
        x = torch.rand(size) * 8 - 4
        y = torch.empty_like(x)
        reps = max(1, 2**25 // size)

        def exps(x=x, y=y, reps=reps):
            for _ in range(reps):
                torch.exp(x, out=y)

        best_exp = max(best_exp, reps * size / _median_s(exps, repeats))
        with _one_thread():  # one core's CPU-time rate, times the cores a case uses
            best_exp = max(best_exp, threads * reps * size / _median_s(exps, repeats, clock=time.thread_time))
        best_exp = max(best_exp, _native_exp_rate(x, reps, threads, repeats),
                       _compiled_exp_rate(x, reps, repeats))
    return Floor(copy_gbs=2 * nbytes / copy_s / 1e9, read_gbs=nbytes / read_s / 1e9, exp_per_s=best_exp,
                 threads=threads)


def _compiled_exp_rate(x: torch.Tensor, reps: int, repeats: int) -> float:
    """Exps per second of ``torch.exp(x).sum()`` compiled by Inductor; 0 where compilation fails."""
    try:
        fn = torch.compile(lambda t: torch.exp(t).sum(), dynamic=False)
        fn(x)
    except Exception:  # noqa: BLE001  (no compiler: this method is not available here)
        return 0.0

    def run():
        for _ in range(reps):
            fn(x)

    return reps * x.numel() / _median_s(run, repeats)


def _native_exp_rate(x: torch.Tensor, reps: int, threads: int, repeats: int) -> float:
    """Exps per second of the native kernels' exponential on ``x`` (every thread sums it ``reps`` times);
    0 where they do not build."""
    import warnings

    from mallowspo_fast.ops import cpu_native

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lib = cpu_native.library()
    if lib is None:
        return 0.0
    reps = max(1, reps // threads)
    return threads * reps * x.numel() / _median_s(
        lambda: lib.cpu_rows_exp_sum(x.data_ptr(), x.numel(), reps, threads), repeats)


@contextlib.contextmanager
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def floor_markdown(floor: Floor) -> str:
    return (f"Measured in this run ({floor.threads} threads): copy {floor.copy_gbs:.1f} GB/s (read + write), "
            f"read-reduce {floor.read_gbs:.1f} GB/s, exp {floor.exp_per_s / 1e9:.2f} G/s (fp32, "
            f"cache-resident). Floor of a case = max(bytes / {floor.bandwidth_gbs:.1f} GB/s, "
            f"exps / {floor.exp_per_s / 1e9:.2f} G/s); op work: forward L bytes and N·V exps, backward 2·L "
            "and N·V, forward + backward 3·L and 2·N·V (L = N·V·element size).")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Measure this machine's bandwidth and exp rate (the op's floor)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--size-mib", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print one JSON line (used by the benchmark suite)")
    args = p.parse_args(argv)
    floor = measure_floor(args.size_mib, args.repeats, args.threads)
    print(json.dumps(asdict(floor)) if args.json else floor_markdown(floor))
    return 0


if __name__ == "__main__":
    sys.exit(main())
