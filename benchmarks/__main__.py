"""Run the whole suite on the device found: ``python -m benchmarks [--quick] [--out DIR]``.

Subjects: the op (forward, backward, forward+backward), the memory mode (hidden states and output
weight to log-probs, against the logits path and TRL's fused head), a preference-loss step, a small-model
train step, one step of TRL's ``DPOTrainer`` with TRL's own head and with the fused op (when TRL is
installed), the accuracy against float64 (ours, TRL, naive fp32 torch; ours on every backend) and the
projection for sm_80 / sm_90. Shapes default to the GPU sweep of the issue on CUDA (op: V = 32000,
128256, 151936, 256000, bf16 and fp32; memory mode: N = 8192, H = 4096, V = 32000, 128256, 151936, bf16)
and to CPU-sized shapes on CPU. ``--quick`` uses tiny shapes and few repeats: a smoke run that checks
everything works, not a measurement.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from . import accuracy, linear, loss_step, op, projection, train_step, trl_step, vocab_parallel
from .floor import floor_markdown
from .harness import default_device, log, measure_floor_isolated
from .providers import PROVIDERS
from .report import write_report

SUBJECTS = ("op", "linear", "loss_step", "train_step", "trl_step", "accuracy", "projection", "vocab_parallel")
# Accuracy: N = 64 rows everywhere (the Triton kernels run interpreted on CPU: minutes at V = 151936).
ACCURACY = dict(n=64, hidden=256, vocabs=[32000, 151936], dtypes=["fp32", "bf16"],
                precision_vocabs=[1000, 32000, 50257, 128256, 151936])


def plan(device: str, quick: bool) -> dict:
    """Shapes and repeats per subject for this device and mode."""
    cuda = device.startswith("cuda")
    if quick:
        return {
            "op": dict(ns=[256], vocabs=[2048], dtypes=["fp32"], warmup=1, repeats=3, floor_mib=64),
            "linear": dict(ns=[256], hiddens=[64], vocabs=[2048], dtypes=["fp32"], passes=["fwdbwd"], warmup=1,
                           repeats=3),
            "loss_step": dict(batch=2, seq=64, vocabs=[2048], dtypes=["fp32"], warmup=1, repeats=3),
            "train_step": dict(model="llama-tiny", batch=1, seq=32, vocab=2048, dtype="fp32", warmup=1,
                               repeats=2),
            "trl_step": dict(vocab=2048, batch=1, prompt=16, completion=16, warmup=1, repeats=2),
            "accuracy": dict(n=4, hidden=16, vocabs=[300], dtypes=["fp32", "bf16"], precision_vocabs=[300]),
            "vocab_parallel": dict(tp=2, n=64, vocabs=[1024], hidden=32, dtype="fp32", modes=["logits"], warmup=1,
                                   repeats=2),
            "projection": dict(ns=[8192], vocabs=[32000], dtypes=["bf16"], archs=[90]),
        }
    if cuda:
        return {
            "op": dict(ns=[8192, 16384], vocabs=[32000, 128256, 151936, 256000], dtypes=["bf16", "fp32"],
                       warmup=10, repeats=50),
            "linear": dict(ns=[8192], hiddens=[4096], vocabs=[32000, 128256, 151936], dtypes=["bf16"],
                           passes=list(linear.PASSES), warmup=5, repeats=20),
            "loss_step": dict(batch=4, seq=1024, vocabs=[32000, 128256], dtypes=["bf16"], warmup=10,
                              repeats=30),
            "train_step": dict(model="llama-small", batch=8, seq=1024, vocab=128256, dtype="bf16", warmup=3,
                               repeats=20),
            "trl_step": dict(vocab=128256, batch=8, prompt=512, completion=512, warmup=2, repeats=10),
            "accuracy": ACCURACY,
            "vocab_parallel": None,  # one CPU process per rank on gloo: a CPU subject
            "projection": dict(ns=[8192, 16384], vocabs=list(projection.VOCABS), dtypes=["bf16"],
                               archs=[80, 90]),
        }
    return {
        "op": dict(ns=[2048], vocabs=[8192, 32000], dtypes=["fp32"], warmup=2, repeats=10,
                   # the busy-process conditions next to the quiet figure: forward + backward, largest V
                   busy=dict(vocabs=[32000], passes=["fwdbwd"], conditions=["thread", "thread+mmap", "thp"])),
        "linear": dict(ns=[2048], hiddens=[256], vocabs=[32000], dtypes=["fp32"], passes=list(linear.PASSES),
                       warmup=1, repeats=5),
        "loss_step": dict(batch=2, seq=512, vocabs=[32000], dtypes=["fp32"], warmup=2, repeats=10),
        "train_step": dict(model="llama-tiny", batch=2, seq=256, vocab=32000, dtype="fp32", warmup=1,
                           repeats=5),
        # the CPU setting: a 128k vocabulary (docs/integrations.md)
        "trl_step": dict(vocab=128256, batch=2, prompt=192, completion=64, warmup=1, repeats=3),
        "accuracy": ACCURACY,
        "vocab_parallel": dict(tp=2, n=2048, vocabs=[32000], hidden=256, dtype="bf16", modes=["logits", "linear"],
                               warmup=2, repeats=5),
        "projection": dict(ns=[8192, 16384], vocabs=list(projection.VOCABS), dtypes=["bf16"], archs=[80, 90]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=default_device(), help="cuda or cpu (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats: checks everything runs")
    p.add_argument("--out", default="bench_results", help="output folder (git-ignored by default)")
    p.add_argument("--subjects", nargs="+", choices=SUBJECTS, default=list(SUBJECTS))
    p.add_argument("--providers", nargs="+", choices=list(PROVIDERS), default=list(PROVIDERS))
    p.add_argument("--passes", nargs="+", choices=op.PASSES, default=list(op.PASSES))
    p.add_argument("--no-compile", action="store_true", help="projection: skip the AOT kernel compilation")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per case (default: torch's; 1 is steadier on a shared machine)")
    args = p.parse_args(argv)
    cfg = plan(args.device, args.quick)
    run_options = {"threads": args.threads} if args.threads else {}

    t0 = time.perf_counter()
    sections, extra = {}, {}
    if "op" in args.subjects:
        c = cfg["op"]
        floor = measure_floor_isolated(args.device, args.threads, c.get("floor_mib", 512))
        sections["op"] = op.sweep(args.device, c["ns"], c["vocabs"], c["dtypes"], args.passes, args.providers,
                                  c["warmup"], c["repeats"], log=log, **run_options)
        busy = c.get("busy")
        if busy and any(p in args.passes for p in busy["passes"]):
            for r in sections["op"]:  # the quiet figures, named as such next to the busy ones
                r.spec.setdefault("condition", "quiet")
            sections["op"] += op.sweep(args.device, c["ns"], busy["vocabs"], c["dtypes"],
                                       [p for p in busy["passes"] if p in args.passes], args.providers,
                                       c["warmup"], c["repeats"], log=log, conditions=busy["conditions"],
                                       **run_options)
        if floor is not None:  # measured before and after the op cases: the higher of each rate
            floor = floor.best(measure_floor_isolated(args.device, args.threads, c.get("floor_mib", 512)))
            op.add_floor(sections["op"], floor)
            extra["CPU floor"] = floor_markdown(floor)
    if "linear" in args.subjects:
        c = cfg["linear"]
        # "ours" selects both of our paths (chunked memory mode and logits); "trl", TRL's fused head.
        providers = [x for x in linear.PROVIDERS if x in args.providers or ("ours" in args.providers
                                                                           and x.startswith("ours"))]
        passes = [x for x in args.passes if x in c["passes"]]
        sections["linear"] = linear.sweep(args.device, c["ns"], c["hiddens"], c["vocabs"], c["dtypes"], passes,
                                          providers, c["warmup"], c["repeats"], log=log, **run_options)
    if "loss_step" in args.subjects:
        c = cfg["loss_step"]
        sections["loss_step"] = loss_step.sweep(args.device, c["batch"], c["seq"], c["vocabs"], c["dtypes"],
                                                list(loss_step.LOSSES), args.providers, c["warmup"],
                                                c["repeats"], log=log, **run_options)
    if "train_step" in args.subjects:
        c = cfg["train_step"]
        providers = [x for x in args.providers if x in train_step.PROVIDERS and x != "compiled"]
        sections["train_step"] = train_step.sweep(args.device, c["model"], c["batch"], c["seq"], c["vocab"],
                                                  c["dtype"], list(train_step.LOSSES), providers, c["warmup"],
                                                  c["repeats"], log=log, **run_options)
    if "trl_step" in args.subjects:
        c = cfg["trl_step"]
        if not trl_step.trl_available():
            log("  trl_step: TRL is not installed (pip install -e '.[trl]'), subject skipped")
            extra["trl_step"] = "TRL is not installed: `pip install -e '.[trl]'` to measure this subject."
        else:
            sections["trl_step"] = trl_step.sweep(args.device, c["vocab"], c["batch"], c["prompt"], c["completion"],
                                                  list(trl_step.LOSSES), c["warmup"], c["repeats"],
                                                  threads=args.threads, log=log)
            extra["trl_step: ours vs TRL"] = trl_step.comparison_markdown(sections["trl_step"])
    if "accuracy" in args.subjects:  # its own providers: --providers does not apply
        c = cfg["accuracy"]
        records = accuracy.run(args.device, list(accuracy.PARTS), c["n"], c["hidden"], c["vocabs"], c["dtypes"],
                               c["precision_vocabs"], log=log)
        accuracy.write_csvs(records, args.out)
        extra.update(accuracy.markdown_sections(records))
    if "vocab_parallel" in args.subjects and cfg["vocab_parallel"] is not None:
        c = cfg["vocab_parallel"]
        cores = os.cpu_count() or 1
        tables = []
        for mode in c["modes"]:
            for vocab in c["vocabs"]:
                log(f"  vocab_parallel {mode} V={vocab} tp={c['tp']}")
                tables.append(vocab_parallel.format_result(vocab_parallel.run(dict(
                    tp=c["tp"], n=c["n"], vocab=vocab, hidden=c["hidden"], dtype=c["dtype"], mode=mode,
                    warmup=c["warmup"], repeats=c["repeats"], threads=max(1, cores // c["tp"]),
                    threads_full=cores))))
        extra["vocab_parallel: each rank against the full op"] = "\n\n".join(tables)
    if "projection" in args.subjects:
        c = cfg["projection"]
        log("  projection (ahead-of-time compilation)")
        extra["projection"] = projection.projection_markdown(c["ns"], c["vocabs"], c["dtypes"], c["archs"],
                                                             compile_kernels=not args.no_compile)
    print(write_report(sections, args.device, args.out, extra, plots=not args.no_plots, threads=args.threads))
    log(f"done in {time.perf_counter() - t0:.0f} s; results in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
