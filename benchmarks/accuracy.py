"""Accuracy: errors of ours and of the peers against float64, for log-probs and entropies.

Every error is ``|value − reference|`` with the reference computed in float64 from the very values the
provider receives (bf16 inputs: their bf16 values, upcast exactly), and the difference taken in float64:
the max and the mean over the N rows. Three parts, one table each:

* ``op``: the logits-level op. ``ours`` (``mpf.token_logprobs``, the default backend), ``trl`` (TRL's public
  ``selective_log_softmax_and_entropy``: its Triton kernel on CUDA, its torch fallback elsewhere),
  ``trl-kernel`` (that one-pass Triton kernel called directly; on CPU under the Triton interpreter, so the
  kernel's own arithmetic is measured there too) and ``naive-fp32`` (``torch.log_softmax`` of the logits in
  fp32, the gather, ``-(p·log p).sum`` for the entropy).
* ``linear``: the memory mode, from hidden states and the output weight. ``ours``
  (``mpf.linear_token_logprobs`` with ``fp32_logits=False``), ``ours-fp32-logits`` (``fp32_logits=True``;
  the flag matters for bf16 / fp16 products only) and ``trl`` (TRL's fused head ``ChunkedLogProbFunction``,
  outputs log_probs and entropy).
* ``precision``: ours on every backend (``torch-native``, ``torch-compiled`` and ``torch-eager`` routes of the
  torch backend: the native C loops, the Inductor loops, the eager chunks;
  ``triton``, interpreted on CPU, and ``reference``) against ``naive-fp32``, fp32 logits, plain: the goal is
  never to be worse than naive fp32 torch.

Inputs: logits ``randn·3`` per row ("plain") or ``randn·3 + 1e4`` ("shifted": a constant offset of every row,
|z| up to 1e4, which cancels in exact arithmetic but not in a formula that sums p·z over unshifted logits);
in the memory mode ``hidden`` ~ N(0, 1), ``weight`` ~ N(0, 9/H) (logits of std ~3) and, shifted, a bias of
1e4 on every column. Providers that need a different process setting (the Triton interpreter, the route of
the torch backend) run in their own process; every process rebuilds the same inputs from the same seed.

Usage::

    python -m benchmarks.accuracy --n 64 --vocab 32000 151936 --dtype fp32 bf16
    python -m benchmarks.accuracy --parts precision --n 64 --precision-vocab 1000 32000 50257 128256 151936
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import math
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .harness import DTYPES, Result, default_device, log, run_isolated
from .providers import Unavailable, trl_chunked_logprobs
from .report import write_report

PARTS = ("op", "linear", "precision")
OP_PROVIDERS = ("ours", "trl", "trl-kernel", "naive-fp32")
LINEAR_PROVIDERS = ("ours", "ours-fp32-logits", "trl")
BACKENDS = ("torch-native", "torch-compiled", "torch-eager", "triton", "reference")
SHIFTS = ("plain", "shifted")
QUANTITIES = ("log-prob", "entropy")
SHIFT = 1e4
LOGIT_STD = 3.0
DESCRIPTIONS = {
    "ours": "mallowspo-fast, default backend (triton on CUDA, the torch backend elsewhere)",
    "trl": "TRL selective_log_softmax_and_entropy as called (its Triton kernel on CUDA, its torch fallback "
           "elsewhere); memory mode: TRL's ChunkedLogProbFunction",
    "trl-kernel": "TRL's one-pass Triton kernel itself (trl.kernels.logprob_entropy; interpreted on CPU)",
    "naive-fp32": "torch.log_softmax in fp32, gather; entropy -(p·log p).sum",
    "ours-fp32-logits": "mpf.linear_token_logprobs with fp32_logits=True (fp32 chunk logits of bf16 products)",
}

Pair = tuple[torch.Tensor, torch.Tensor]  # (log-probs [N], entropies [N])


# ---------------------------------------------------------------------------------------------- inputs


def _generator(seed: int) -> torch.Generator:
    # Drawn on the CPU whatever the device, so that every process and every device sees the same values.
    return torch.Generator(device="cpu").manual_seed(seed)


def make_logits(n: int, vocab: int, dtype: str, shifted: bool, device: str = "cpu", seed: int = 0):
    """Logits [N, V] of ``dtype`` (randn·3, plus 1e4 when ``shifted``) and labels [N] in [0, V)."""
    gen = _generator(seed)
    z = torch.randn(n, vocab, generator=gen) * LOGIT_STD
    if shifted:
        z += SHIFT
    labels = torch.randint(0, vocab, (n,), generator=gen)
    return z.to(DTYPES[dtype]).to(device), labels.to(device)


def make_linear(n: int, hidden: int, vocab: int, dtype: str, shifted: bool, device: str = "cpu", seed: int = 0):
    """hidden [N, H], weight [V, H], bias [V] (1e4 when ``shifted``, else None) of ``dtype``, labels [N]."""
    gen = _generator(seed)
    h = torch.randn(n, hidden, generator=gen)
    w = torch.randn(vocab, hidden, generator=gen) * (LOGIT_STD / math.sqrt(hidden))
    labels = torch.randint(0, vocab, (n,), generator=gen)
    dt = DTYPES[dtype]
    bias = torch.full((vocab,), SHIFT, dtype=dt, device=device) if shifted else None
    return h.to(dt).to(device), w.to(dt).to(device), bias, labels.to(device)


# ---------------------------------------------------------------------------------- reference, errors


def reference(logits: torch.Tensor, labels: torch.Tensor) -> Pair:
    """float64 log-probs of the labels and entropies of ``logits`` [N, V] (any dtype, upcast exactly)."""
    z = logits.detach().to(torch.float64)
    logp_all = torch.log_softmax(z, dim=-1)
    return logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)


def errors(value: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max, mean) of |value − ref| over the rows, the difference taken in float64 against a float64
    ``ref``."""
    if ref.dtype != torch.float64:
        raise TypeError(f"errors: the reference must be float64, got {ref.dtype}")
    if value.shape != ref.shape:
        raise ValueError(f"errors: value {tuple(value.shape)} and reference {tuple(ref.shape)} differ in shape")
    diff = (value.detach().to(torch.float64) - ref).abs()
    return float(diff.max()), float(diff.mean())


# ------------------------------------------------------------------------------------------- providers


def naive_fp32(logits: torch.Tensor, labels: torch.Tensor) -> Pair:
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    return logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)


def _ours(backend: str | None = None) -> Callable[[torch.Tensor, torch.Tensor], Pair]:
    import mallowspo_fast as mpf

    def fn(logits, labels):
        out = mpf.token_logprobs(logits, labels, backend=backend)
        return out.logps, out.entropy

    return fn


def _trl_public():
    if importlib.util.find_spec("trl") is None:
        raise Unavailable("not installed", "pip install trl")
    try:
        from trl.trainer.utils import selective_log_softmax_and_entropy
    except ImportError as e:
        raise Unavailable("unsupported", f"needs TRL >= 1.16 (selective_log_softmax_and_entropy): {e}") from e
    return lambda logits, labels: selective_log_softmax_and_entropy(logits, labels)


def _trl_kernel(device: str):
    if importlib.util.find_spec("trl") is None or importlib.util.find_spec("triton") is None:
        raise Unavailable("not installed", "pip install trl (with triton)")
    if not device.startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        raise Unavailable("unsupported", "a Triton kernel: CUDA, or TRITON_INTERPRET=1 on CPU")
    try:
        from trl.kernels.logprob_entropy import selective_log_softmax_and_entropy
    except ImportError as e:
        raise Unavailable("unsupported", f"needs TRL >= 1.16 (trl.kernels.logprob_entropy): {e}") from e
    return lambda logits, labels: selective_log_softmax_and_entropy(logits, labels)


def op_provider(name: str, device: str) -> Callable[[torch.Tensor, torch.Tensor], Pair]:
    """``fn(logits [N, V], labels [N]) -> (log-probs, entropies)`` of an op-part provider or a backend."""
    if name == "ours":
        return _ours()
    if name == "trl":
        return _trl_public()
    if name == "trl-kernel":
        return _trl_kernel(device)
    if name == "naive-fp32":
        return naive_fp32
    if name in BACKENDS:
        return _ours(name.split("-")[0])
    raise ValueError(f"unknown accuracy provider {name!r}; expected one of {OP_PROVIDERS + BACKENDS}")


def linear_provider(name: str) -> Callable[..., Pair]:
    """``fn(hidden [N, H], weight [V, H], bias [V] or None, labels [N]) -> (log-probs, entropies)``."""
    if name == "trl":
        return trl_chunked_logprobs()
    if name not in ("ours", "ours-fp32-logits"):
        raise ValueError(f"unknown memory-mode provider {name!r}; expected one of {LINEAR_PROVIDERS}")
    import mallowspo_fast as mpf

    fp32 = name == "ours-fp32-logits"

    def fn(hidden, weight, bias, labels):
        out = mpf.linear_token_logprobs(hidden, weight, labels, bias=bias, fp32_logits=fp32)
        return out.logps, out.entropy

    return fn


def _check_route(name: str) -> None:
    """The torch backend's routes are chosen by the process settings: fail when the wanted one did not run."""
    if name == "torch-native":
        from mallowspo_fast.ops import cpu_native

        if cpu_native._State.lib is None:
            raise RuntimeError(f"the native route did not run ({cpu_native._State.failed or 'not selected'})")
    if name != "torch-compiled":
        return
    from mallowspo_fast.ops import torch_path

    if torch_path._CompileState.failed is not None or "fwd" not in torch_path._CompileState.kernels:
        raise RuntimeError(f"the compiled route did not run ({torch_path._CompileState.failed or 'not selected'})")


# ----------------------------------------------------------------------------------------- the records


def _records(base: dict, pair: Pair, ref: Pair) -> list[dict]:
    out = []
    for quantity, value, r in zip(QUANTITIES, pair, ref):
        worst, mean = errors(value, r)
        out.append({**base, "quantity": quantity, "status": "ok", "max_abs": worst, "mean_abs": mean})
    return out


def op_records(part: str, name: str, fn, cases: list[dict], n: int, device: str, seed: int = 0) -> list[dict]:
    """Errors of ``fn`` (logits level) on every case {dtype, vocab, logits}."""
    out = []
    for c in cases:
        logits, labels = make_logits(n, c["vocab"], c["dtype"], c["logits"] == "shifted", device, seed)
        with torch.no_grad():
            pair = fn(logits, labels)
        _check_route(name)
        out += _records({"part": part, "provider": name, "n": n, **c}, pair, reference(logits, labels))
    return out


def linear_records(name: str, fn, cases: list[dict], n: int, hidden: int, device: str, seed: int = 0) -> list[dict]:
    """Errors of a memory-mode ``fn`` on every case {dtype, vocab, logits}, against the float64 logits of the
    same hidden states, weight and bias."""
    out = []
    for c in cases:
        h, w, b, labels = make_linear(n, hidden, c["vocab"], c["dtype"], c["logits"] == "shifted", device, seed)
        with torch.no_grad():
            pair = fn(h, w, b, labels)
            logits64 = F.linear(h.double(), w.double(), None if b is None else b.double())
        out += _records({"part": "linear", "provider": name, "n": n, "hidden": hidden, **c}, pair,
                        reference(logits64, labels))
        del logits64
    return out


def run_job(part: str, name: str, spec: dict[str, Any]) -> list[dict]:
    """The records of one (part, provider) of a spec; a provider that cannot run gives one record saying why."""
    device, n = spec["device"], spec["n"]
    try:
        if part == "linear":
            return linear_records(name, linear_provider(name), spec["cases"], n, spec["hidden"], device)
        cases = spec["precision_cases"] if part == "precision" else spec["cases"]
        return op_records(part, name, op_provider(name, device), cases, n, device)
    except Unavailable as e:
        return [{"part": part, "provider": name, "status": e.status, "notes": e.reason}]
    except Exception as e:  # noqa: BLE001  (reported in the table as this provider's error, the others go on)
        log(traceback.format_exc())
        return [{"part": part, "provider": name, "status": "error", "notes": f"{type(e).__name__}: {e}"[:300]}]


def evaluate(spec: dict[str, Any]) -> Result:
    """Worker entry (``benchmarks.worker``): every job of the spec in this process."""
    records = [r for part, name in spec["jobs"] for r in run_job(part, name, spec)]
    return Result(spec, "ok", extra={"records": records})


# -------------------------------------------------------------------------------------------- the plan


def cases(vocabs: list[int], dtypes: list[str], shifts: tuple[str, ...] = SHIFTS) -> list[dict]:
    return [{"dtype": d, "vocab": v, "logits": s} for d in dtypes for v in vocabs for s in shifts]


def groups(device: str, parts: list[str]) -> list[tuple[dict, list[tuple[str, str]]]]:
    """(environment, jobs) per process: the jobs that share a process setting run together. On CPU the
    Triton kernels (ours, TRL's) run interpreted in a process of their own."""
    cuda = device.startswith("cuda")
    clean = {"MALLOWSPO_FAST_TORCH_COMPILE": None, "MALLOWSPO_FAST_BACKEND": None, "TRITON_INTERPRET": None,
             "MALLOWSPO_FAST_NATIVE": None}
    default, interpreted, native, compiled, eager = [], [], [], [], []
    if "op" in parts:
        default += [("op", p) for p in OP_PROVIDERS if p != "trl-kernel"]
        (default if cuda else interpreted).append(("op", "trl-kernel"))
    if "linear" in parts:
        default += [("linear", p) for p in LINEAR_PROVIDERS]
    if "precision" in parts:
        default += [("precision", "reference"), ("precision", "naive-fp32")]
        (default if cuda else interpreted).append(("precision", "triton"))
        if cuda:  # the torch backend on CUDA has one route (fixed-size chunks)
            default.append(("precision", "torch-eager"))
        else:
            native.append(("precision", "torch-native"))
            compiled.append(("precision", "torch-compiled"))
            eager.append(("precision", "torch-eager"))
    out = [(clean, default), ({**clean, "TRITON_INTERPRET": "1"}, interpreted),
           ({**clean, "MALLOWSPO_FAST_TORCH_COMPILE": "1", "MALLOWSPO_FAST_NATIVE": "1"}, native),
           ({**clean, "MALLOWSPO_FAST_TORCH_COMPILE": "1", "MALLOWSPO_FAST_NATIVE": "0"}, compiled),
           ({**clean, "MALLOWSPO_FAST_TORCH_COMPILE": "0"}, eager)]
    return [(env, jobs) for env, jobs in out if jobs]


def run(device: str, parts: list[str], n: int, hidden: int, vocabs: list[int], dtypes: list[str],
        precision_vocabs: list[int], log=log) -> list[dict]:
    """Every record of the chosen parts, each process group in its own process."""
    records = []
    for env, jobs in groups(device, parts):
        spec = {"subject": "accuracy", "device": device, "env": env, "jobs": jobs, "n": n, "hidden": hidden,
                "cases": cases(vocabs, dtypes), "precision_cases": cases(precision_vocabs, ["fp32"], ("plain",))}
        names = ", ".join(f"{part}/{name}" for part, name in jobs)
        log(f"  accuracy ({names})" + (" under TRITON_INTERPRET=1" if env.get("TRITON_INTERPRET") else ""))
        r = run_isolated(spec)
        if r.status == "ok":
            records += r.extra["records"]
        else:
            records += [{"part": part, "provider": name, "status": r.status, "notes": r.notes} for part, name in jobs]
    for rec in records:
        if rec["status"] != "ok":
            log(f"  accuracy {rec['part']}/{rec['provider']}: {rec['status']}: {rec.get('notes', '')}")
    return records


# ---------------------------------------------------------------------------------------------- report


def _sci(x: float) -> str:
    return f"{x:.2e}"


def _cell(rec: dict | None) -> str:
    return "-" if rec is None else f"{_sci(rec['max_abs'])} / {_sci(rec['mean_abs'])}"


def _failures(records: list[dict], part: str) -> list[str]:
    return [f"{r['provider']}: {r['status']} ({r.get('notes', '')})" for r in records
            if r["part"] == part and r["status"] != "ok"]


def comparison_markdown(records: list[dict], part: str) -> str:
    """One row per (dtype, V, logits, quantity), one column per provider: "max / mean" abs error."""
    ok = [r for r in records if r["part"] == part and r["status"] == "ok"]
    providers = list(dict.fromkeys(r["provider"] for r in records if r["part"] == part))
    keys = list(dict.fromkeys((r["dtype"], r["vocab"], r["logits"], r["quantity"]) for r in ok))
    index = {(r["dtype"], r["vocab"], r["logits"], r["quantity"], r["provider"]): r for r in ok}
    lines = ["| dtype | V | logits | quantity | " + " | ".join(providers) + " |",
             "|" + "---|" * (4 + len(providers))]
    for key in keys:
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | "
                     + " | ".join(_cell(index.get((*key, p))) for p in providers) + " |")
    n = next((r["n"] for r in ok), None)
    hidden = next((r.get("hidden") for r in ok if r.get("hidden")), None)
    lines += ["", f"Max / mean absolute error against float64 over N = {n} rows"
              + (f" (H = {hidden})" if hidden else "") + "."]
    lines += [f"Not measured: {f}." for f in _failures(records, part)]
    return "\n".join(lines)


def precision_markdown(records: list[dict]) -> str:
    """Ours on every backend against naive fp32 torch, per V: "ours (naive)" for each error, and whether ours
    is never worse: its max error at most naive's, for the log-prob and for the entropy (else the ratio)."""
    ok = [r for r in records if r["part"] == "precision" and r["status"] == "ok"]
    index = {(r["provider"], r["vocab"], r["quantity"]): r for r in ok}
    backends = [b for b in BACKENDS if any(r["provider"] == b for r in ok)]
    vocabs = sorted({r["vocab"] for r in ok})
    cols = [(q, s) for q in QUANTITIES for s in ("max_abs", "mean_abs")]
    head = ["V", "backend"] + [f"{q} {s.split('_')[0]} error: ours (naive fp32)" for q, s in cols]
    lines = ["| " + " | ".join(head + ["never worse than naive"]) + " |", "|" + "---|" * (len(head) + 1)]
    for v in vocabs:
        for b in backends:
            cells, worse = [], []
            for q, s in cols:
                ours, naive = index.get((b, v, q)), index.get(("naive-fp32", v, q))
                if ours is None or naive is None:
                    cells.append("-")
                    continue
                cells.append(f"{_sci(ours[s])} ({_sci(naive[s])})")
                if s == "max_abs" and ours[s] > naive[s]:
                    worse.append(f"{q} max {ours[s] / naive[s]:.2f}× naive" if naive[s] > 0 else f"{q} max")
            verdict = "NO: " + ", ".join(worse) if worse else ("yes" if "-" not in cells else "-")
            lines.append(f"| {v} | {b} | " + " | ".join(cells) + f" | {verdict} |")
    n = next((r["n"] for r in ok), None)
    lines += ["", f"fp32 logits randn·3, N = {n} rows; absolute errors against float64. Never worse: the max "
              "error of ours at most that of naive fp32 torch, for the log-prob and for the entropy."]
    lines += [f"Not measured: {f}." for f in _failures(records, "precision")]
    return "\n".join(lines)


def markdown_sections(records: list[dict]) -> dict[str, str]:
    titles = {"op": "accuracy: the op against float64 (ours, TRL, naive fp32)",
              "linear": "accuracy: the memory mode against float64 (ours, TRL's fused head)",
              "precision": "precision: ours on every backend against naive fp32 torch"}
    out = {}
    for part in PARTS:
        if any(r["part"] == part for r in records):
            out[titles[part]] = precision_markdown(records) if part == "precision" else comparison_markdown(records,
                                                                                                             part)
    return out


def write_csvs(records: list[dict], out_dir: str) -> list[str]:
    """accuracy.csv (op and memory mode) and precision.csv, one record a line; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, parts in (("accuracy", ("op", "linear")), ("precision", ("precision",))):
        rows = [r for r in records if r["part"] in parts]
        if not rows:
            continue
        keys = list(dict.fromkeys(k for r in rows for k in r))
        path = os.path.join(out_dir, f"{name}.csv")
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            for r in rows:
                w.writerow({k: r.get(k, "") for k in keys})
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Errors against float64 of ours, TRL and naive fp32 torch (log-probs "
                                "and entropies), and the precision table of ours on every backend")
    p.add_argument("--device", default=default_device())
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--n", type=int, default=64, help="rows N")
    p.add_argument("--hidden", type=int, default=256, help="memory mode: hidden size H")
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936], help="op and memory mode: V")
    p.add_argument("--dtype", nargs="+", choices=["fp32", "bf16", "fp16"], default=["fp32", "bf16"])
    p.add_argument("--precision-vocab", type=int, nargs="+", default=[1000, 32000, 50257, 128256, 151936])
    p.add_argument("--out", default="bench_results", help="output folder (results.md, CSVs)")
    args = p.parse_args(argv)
    records = run(args.device, args.parts, args.n, args.hidden, args.vocab, args.dtype, args.precision_vocab)
    write_csvs(records, args.out)
    print(write_report({}, args.device, args.out, markdown_sections(records), plots=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
