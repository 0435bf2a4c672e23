"""Memory mode against the logits-level path: extra peak memory and time of forward + backward.

    python -m benchmarks.linear_memory                      # N=4096, H=512, V=128256, fp32, CPU
    python -m benchmarks.linear_memory --repeats 5 --mask-frac 0.5

Two paths from the same inputs (hidden [N, H] and weight [V, H], both requiring grad):
* ``logits``:  ``F.linear(hidden, weight)`` then ``mpf.sequence_logprobs(..., backend="torch")``, backward;
* ``chunked``: ``mpf.linear_sequence_logprobs(hidden, weight, labels, backend="torch")``, backward.

Every run is a fresh subprocess (the two paths alternate), so one run's allocator state never shows
up in another's figures. In the child, after a tiny warm-up, the kernel's resident-memory high-water
mark is reset (``/proc/self/clear_refs``) and the resident set with only the inputs present is the
base. *Extra peak* = high-water mark after forward + backward − base − the bytes of the two
unavoidable outputs, the gradients of hidden and weight. It is compared with the logits size N·V·4.
Time: wall clock and process CPU time of forward + backward; medians over the runs. On a machine
shared with other work the CPU time is the steadier figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

import torch


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not found in /proc/self/status")


def _reset_peak() -> None:
    # Writing 5 resets VmHWM to the current resident set (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _step(mode: str, hidden, weight, labels, chunk_size):
    import torch.nn.functional as F

    import mallowspo_fast as mpf

    if mode == "chunked":
        seq = mpf.linear_sequence_logprobs(hidden, weight, labels, chunk_size=chunk_size, backend="torch")
    else:
        seq = mpf.sequence_logprobs(F.linear(hidden, weight), labels, backend="torch")
    (seq.logps.sum() + 0.1 * seq.entropy.sum()).backward()


def worker(mode: str, n: int, dim: int, vocab: int, mask_frac: float, chunk_size: int | None) -> dict:
    """One measured forward + backward in this process."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(8, n // 8, dim, generator=gen).requires_grad_(True)
    weight = (torch.randn(vocab, dim, generator=gen) * dim**-0.5).requires_grad_(True)
    labels = torch.randint(0, vocab, (8, n // 8), generator=gen)
    labels[torch.rand(labels.shape, generator=gen) < mask_frac] = -100
    # Library initialisation (thread pools, kernels) on a tiny problem, outside the measurement.
    small_h = torch.randn(2, 4, dim, requires_grad=True)
    small_w = torch.randn(1000, dim, requires_grad=True)
    _step(mode, small_h, small_w, labels[:2, :4].clamp(max=999), chunk_size)
    del small_h, small_w
    _reset_peak()
    base = _status_kb("VmRSS") * 1024
    wall, cpu = time.perf_counter(), time.process_time()
    _step(mode, hidden, weight, labels, chunk_size)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = _status_kb("VmHWM") * 1024
    grads = sum(t.grad.numel() * t.grad.element_size() for t in (hidden, weight))
    return {"mode": mode, "wall_s": wall, "cpu_s": cpu, "extra_peak_bytes": peak - base - grads,
            "grad_bytes": grads, "logits_bytes": n * vocab * 4}


def _run_child(args, mode: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.linear_memory", "--worker", mode, "--n", str(args.n),
           "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--mask-frac", str(args.mask_frac)]
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4096, help="tokens (a multiple of 8: 8 sequences)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--mask-frac", type=float, default=0.0, help="fraction of masked tokens")
    p.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default: the op's)")
    p.add_argument("--repeats", type=int, default=3, help="runs per path, each in a fresh process")
    p.add_argument("--worker", choices=["logits", "chunked"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.n, args.hidden, args.vocab, args.mask_frac, args.chunk_size)))
        return 0

    from mallowspo_fast.ops.linear import default_chunk_size

    chunk = args.chunk_size or default_chunk_size(args.vocab, "cpu")
    print(f"# memory mode, CPU fp32: N={args.n} H={args.hidden} V={args.vocab} mask={args.mask_frac} "
          f"chunk={chunk} rows; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}", flush=True)
    runs: dict[str, list[dict]] = {"logits": [], "chunked": []}
    for i in range(args.repeats):
        for mode in ("logits", "chunked"):
            r = _run_child(args, mode)
            runs[mode].append(r)
            print(f"  run {i + 1} {mode:8s} wall {r['wall_s']:6.1f} s  cpu {r['cpu_s']:6.1f} s  "
                  f"extra peak {r['extra_peak_bytes'] / 2**20:7.0f} MiB", flush=True)
    logits_bytes = runs["chunked"][0]["logits_bytes"]
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "cpu_s", "extra_peak_bytes")}
           for m, rs in runs.items()}
    print(f"\nlogits size N*V*4 = {logits_bytes / 2**20:.0f} MiB; gradients of hidden+weight (excluded) = "
          f"{runs['chunked'][0]['grad_bytes'] / 2**20:.0f} MiB; medians of {args.repeats} runs\n")
    print("| path | extra peak (MiB) | extra peak / logits | wall (s) | CPU (s) |")
    print("|---|---|---|---|---|")
    for m in ("logits", "chunked"):
        d = med[m]
        print(f"| {m} | {d['extra_peak_bytes'] / 2**20:.0f} | {d['extra_peak_bytes'] / logits_bytes:.3f} | "
              f"{d['wall_s']:.1f} | {d['cpu_s']:.1f} |")
    print(f"\nchunked / logits time: wall {med['chunked']['wall_s'] / med['logits']['wall_s']:.2f}x, "
          f"CPU {med['chunked']['cpu_s'] / med['logits']['cpu_s']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
