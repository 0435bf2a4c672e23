"""Vocab-parallel op on CPU gloo ranks against the single-device op on the full vocabulary.

``python -m benchmarks.vocab_parallel [--tp 2] [--n 2048] [--vocab 32000] [--dtype bf16] [--mode logits linear]``

Each rank is its own process (a free port, gloo); the full op runs in a fresh process of its own with the
same total number of threads. Per rank and for the full op: the median and best time of a forward +
backward (upstream grads on log-probs and entropies), the bytes of its inputs, the resident memory it
holds after the warm-up above what it held before the inputs were made (inputs, compiled code, buffers
kept across steps), the peak of the timed steps above that (what a step allocates and frees: gradients,
temporaries; Linux only, where the peak mark can be reset), and, for the ranks, the all-reduces of one
forward + backward (count and payload bytes per unmasked row). ``--mode linear`` measures the memory mode
(hidden states replicated, output weight split by vocabulary rows) against ``linear_token_logprobs``.
Nothing is written unless ``--json PATH`` is given: the figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
MODES = ("logits", "linear")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux: 5 > /proc/self/clear_refs), so that the peak measured covers
    the timed steps only, not the warm-up's one-off compilation."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_bytes() -> int:
    """VmHWM of /proc/self/status (the peak RSS since the last reset), else ru_maxrss."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def shard_bounds(vocab: int, tp: int) -> list[int]:
    """Uneven split when tp does not divide V: the first V mod tp ranks get one column more."""
    base, extra = divmod(vocab, tp)
    bounds = [0]
    for r in range(tp):
        bounds.append(bounds[-1] + base + (r < extra))
    return bounds


def _inputs(cfg: dict, cols: slice):
    gen = torch.Generator().manual_seed(0)
    dtype = DTYPES[cfg["dtype"]]
    labels = torch.randint(0, cfg["vocab"], (1, cfg["n"]), generator=gen)
    g, h = torch.randn(1, cfg["n"], generator=gen), torch.randn(1, cfg["n"], generator=gen)
    if cfg["mode"] == "linear":
        hidden = torch.randn(1, cfg["n"], cfg["hidden"], generator=gen).to(dtype).requires_grad_(True)
        weight = (torch.randn(cfg["vocab"], cfg["hidden"], generator=gen) / cfg["hidden"] ** 0.5).to(dtype)
        return dict(hidden=hidden, weight=weight[cols].clone().requires_grad_(True), labels=labels, g=g, h=h)
    logits = (torch.randn(1, cfg["n"], cfg["vocab"], generator=gen) * 2).to(dtype)
    return dict(logits=logits[..., cols].clone().requires_grad_(True), labels=labels, g=g, h=h)


def _step(cfg: dict, inp: dict, **vp) -> None:
    import mallowspo_fast as mpf

    if cfg["mode"] == "linear":
        fn = mpf.vocab_parallel_linear_token_logprobs if vp else mpf.linear_token_logprobs
        out = fn(inp["hidden"], inp["weight"], inp["labels"], backend="torch", **vp)
        params = (inp["hidden"], inp["weight"])
    else:
        fn = mpf.vocab_parallel_token_logprobs if vp else mpf.token_logprobs
        out = fn(inp["logits"], inp["labels"], backend="torch", **vp)
        params = (inp["logits"],)
    ((out.logps * inp["g"]).sum() + (out.entropy * inp["h"]).sum()).backward()
    for p in params:
        p.grad = None


def _measure(cfg: dict, cols: slice, **vp) -> dict:
    torch.set_num_threads(cfg["threads"])
    before = _rss_bytes()
    inp = _inputs(cfg, cols)
    input_bytes = sum(t.numel() * t.element_size() for t in inp.values())
    for _ in range(cfg["warmup"]):
        _step(cfg, inp, **vp)
    peak_reset = _reset_peak()
    warm = _rss_bytes()
    times = []
    for _ in range(cfg["repeats"]):
        if vp:
            dist.barrier(group=vp.get("group"))  # ranks start each step together
        t0 = time.perf_counter()
        _step(cfg, inp, **vp)
        times.append(time.perf_counter() - t0)
    out = dict(median_ms=1e3 * statistics.median(times), best_ms=1e3 * min(times), input_mib=input_bytes / 2**20,
               held_after_warmup_mib=(warm - before) / 2**20,
               step_peak_mib=(_peak_bytes() - warm) / 2**20 if peak_reset else None,
               threads=cfg["threads"])
    if vp:
        out.update(_count_collectives(cfg, inp, vp))
    return out


def _count_collectives(cfg: dict, inp: dict, vp: dict) -> dict:
    """All-reduces of one forward + backward: count and payload bytes, per unmasked row."""
    seen: list[tuple[str, int]] = []
    real = dist.all_reduce

    def counting(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        seen.append((str(op), tensor.numel() * tensor.element_size()))
        return real(tensor, op=op, group=group, async_op=async_op)

    dist.all_reduce = counting
    try:
        _step(cfg, inp, **vp)
    finally:
        dist.all_reduce = real
    rows = cfg["n"]
    return dict(all_reduces=len(seen), collective_bytes_per_row=sum(b for _, b in seen) / rows,
                collectives=[f"{op.split('.')[-1]}: {b / rows:.1f} B/row" for op, b in seen])


def _rank_main(rank: int, world: int, port: int, cfg: dict, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    try:
        bounds = shard_bounds(cfg["vocab"], world)
        res = _measure(cfg, slice(bounds[rank], bounds[rank + 1]), vocab_start=bounds[rank])
        res["shard"] = bounds[rank + 1] - bounds[rank]
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def _full_main(_index: int, cfg: dict, out_dir: str) -> None:
    res = _measure(dict(cfg, threads=cfg["threads_full"]), slice(None))
    Path(out_dir, "full.json").write_text(json.dumps(res))


def run(cfg: dict) -> dict:
    """{"full": {...}, "ranks": [{...}, ...]} for one configuration (each measured in fresh processes)."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_full_main, args=(cfg, d), nprocs=1, join=True)
        mp.spawn(_rank_main, args=(cfg["tp"], _free_port(), cfg, d), nprocs=cfg["tp"], join=True)
        full = json.loads(Path(d, "full.json").read_text())
        ranks = [json.loads(Path(d, f"rank{r}.json").read_text()) for r in range(cfg["tp"])]
    return dict(config=cfg, full=full, ranks=ranks)


def format_result(res: dict) -> str:
    cfg = res["config"]
    head = (f"{cfg['mode']}: N={cfg['n']} V={cfg['vocab']}" + (f" H={cfg['hidden']}" if cfg["mode"] == "linear" else "")
            + f" {cfg['dtype']}, tp={cfg['tp']} (gloo, CPU)")
    lines = [head, "| who | columns | threads | fwd+bwd median (ms) | best (ms) | inputs (MiB) "
                   "| held after warm-up (MiB) | step peak (MiB) | all-reduces | collective B/row |", "|" + "---|" * 10]

    def mib(x):
        return "n/a" if x is None else f"{x:.1f}"

    full = res["full"]
    lines.append(f"| full op | {cfg['vocab']} | {full['threads']} | {full['median_ms']:.1f} | {full['best_ms']:.1f} | "
                 f"{full['input_mib']:.1f} | {mib(full['held_after_warmup_mib'])} | {mib(full['step_peak_mib'])} "
                 "| - | - |")
    for r, rk in enumerate(res["ranks"]):
        lines.append(f"| rank {r} | {rk['shard']} | {rk['threads']} | {rk['median_ms']:.1f} | {rk['best_ms']:.1f} | "
                     f"{rk['input_mib']:.1f} | {mib(rk['held_after_warmup_mib'])} | {mib(rk['step_peak_mib'])} | "
                     f"{rk['all_reduces']} | {rk['collective_bytes_per_row']:.1f} |")
    lines.append("collectives of rank 0: " + "; ".join(res["ranks"][0]["collectives"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.vocab_parallel", description=__doc__.split("\n\n")[0])
    p.add_argument("--tp", type=int, default=2, help="ranks the vocabulary is split over")
    p.add_argument("--n", type=int, default=2048, help="tokens N")
    p.add_argument("--vocab", type=int, nargs="+", default=[32000], help="full vocabulary sizes V")
    p.add_argument("--hidden", type=int, default=256, help="hidden size H of --mode linear")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--mode", nargs="+", choices=MODES, default=["logits"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    cores = os.cpu_count() or 1
    p.add_argument("--threads", type=int, default=None, help="threads per rank (default: cores // tp, at least 1)")
    p.add_argument("--threads-full", type=int, default=cores, help="threads of the full op (default: all cores)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    results = []
    for mode in args.mode:
        for vocab in args.vocab:
            cfg = dict(tp=args.tp, n=args.n, vocab=vocab, hidden=args.hidden, dtype=args.dtype, mode=mode,
                       warmup=args.warmup, repeats=args.repeats, threads=args.threads or max(1, cores // args.tp),
                       threads_full=args.threads_full)
            res = run(cfg)
            print(format_result(res), flush=True)
            results.append(res)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
