"""The correctness checks: each runs one public op on its Triton path and compares it with float64.

What is checked, for each dtype (fp32, bf16, fp16, fp64) and V (the plan is
:func:`benchmarks.gpu_check.correctness.group_checks`):

* ``token_logprobs`` / ``sequence_logprobs`` on the shifted view ``logits[:, :-1]`` with masked tokens
  and an all-masked sequence, upstream gradients on both outputs, on the log-probs only and on the
  entropies only (the three backward variants), temperatures 0.7 and 2.5, ``inplace_backward=True``;
* the logit transforms: a soft cap with a logit scale and a temperature (each backward variant, the
  slope through the tanh), a negative logit scale;
* the statistics (``return_stats=True``: log Σp², mean logit, is_top1) with and without a soft cap,
  with labels, without labels and in the memory mode, followed by a backward through the same call;
* the memory mode (``linear_token_logprobs`` / ``linear_sequence_logprobs``, several chunks);
* without labels (``token_entropy`` and ``token_logprobs(logits, None)``): entropy and logsumexp of
  every row, upstream gradients on both, on the entropies only and on the logsumexp only, with and
  without a soft cap;
* -inf logits (a padded vocabulary and a row with a block of -inf): finite values, zero gradient there;
* out-of-range labels: NaN for those tokens, the others exact, no device fault (on CPU the public op
  raises ``ValueError`` by contract, so its autograd Function is called directly for the kernels'
  behaviour);
* the per-sequence reduction at every block size it can launch (fp32 values; fp64 for fp64 logits);
* rows·V beyond 2³¹ elements (int64 offsets), on sampled rows.

The references, the inputs and the tolerances are those of the test suite (one copy:
:mod:`mallowspo_fast.testing`), the tolerances scaled for the transforms: values carry eps·max|z| and
gradients the slope dz/dy. A row passes when every element satisfies ``abs(x - ref) <= atol + rtol·abs(ref)``
(memory-mode parameter gradients: ``<= rel·max abs(ref) + K·u·(abs(A)·abs(B))``); ``worst`` is the
largest ratio of an error to its allowance (> 1 fails).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import torch

from mallowspo_fast.testing import (
    DTYPES_BY_NAME,
    NO_LABELS_GRAD_FACTOR,
    linear_inputs,
    random_grads,
    ref_entropy,
    ref_linear,
    ref_sequence,
    ref_stats,
    ref_token,
    scaled_tolerances,
    sequence_labels,
    shifted_logits,
    tolerances,
)

MARKER = "@@GPU_CHECK@@"
IGNORE = -100
UPSTREAMS = ("both", "logp", "entropy")


def emit(row: dict[str, Any]) -> None:
    print(MARKER + json.dumps(row), flush=True)


# ----------------------------------------------------------------------------------------- comparison


def excess(actual: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> tuple[float, float]:
    """(max |actual - ref|, max of |actual - ref| / (atol + rtol·|ref|)); a NaN or an infinity where the
    reference has none gives inf for both."""
    a, r = actual.detach().double().cpu(), ref.detach().double().cpu()
    if a.shape != r.shape:
        raise ValueError(f"shape mismatch: result {tuple(a.shape)} vs reference {tuple(r.shape)}")
    if a.numel() == 0:
        return 0.0, 0.0
    same = (a == r) | (torch.isnan(a) & torch.isnan(r))
    diff = torch.where(same, torch.zeros_like(a), (a - r).abs())
    diff = torch.nan_to_num(diff, nan=math.inf)
    allowed = atol + rtol * torch.nan_to_num(r.abs(), posinf=0.0)
    ratio = torch.where(diff == 0, torch.zeros_like(diff), diff / allowed)
    return float(diff.max()), float(ratio.max())


def relative_excess(actual: torch.Tensor, ref: torch.Tensor, rel: float) -> tuple[float, float]:
    """(max |actual - ref|, that / (rel·max|ref|)): matmul outputs scale with their largest entry."""
    a, r = actual.detach().double().cpu(), ref.detach().double().cpu()
    err = float(torch.nan_to_num((a - r).abs(), nan=math.inf).max())
    scale = max(float(r.abs().max()), 1e-3)
    return err, err / (rel * scale)


class Row:
    """One check's result: the largest error of each compared quantity and its tolerance."""

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.errors: dict[str, float] = {}
        self.ratios: dict[str, float] = {}
        self.tolerances: dict[str, str] = {}
        self.notes: list[str] = []

    def compare(self, what: str, actual, ref, atol: float, rtol: float) -> None:
        err, ratio = excess(actual, ref, atol, rtol)
        self._add(what, err, ratio, f"{atol:g} + {rtol:g}·abs(ref)")

    def compare_relative(self, what: str, actual, ref, rel: float) -> None:
        err, ratio = relative_excess(actual, ref, rel)
        self._add(what, err, ratio, f"{rel:g}·max abs(ref)")

    def compare_matmul(self, what: str, actual, ref, rel: float, abs_product: torch.Tensor, k: int,
                       unit_roundoff: float) -> None:
        """Matmul output against float64: ``rel·max|ref| + K·u·(|A|·|B|)`` elementwise."""
        a, r = actual.detach().double().cpu(), ref.detach().double().cpu()
        allowed = rel * max(float(r.abs().max()), 1e-3) + k * unit_roundoff * abs_product.detach().cpu()
        diff = torch.nan_to_num((a - r).abs(), nan=math.inf)
        self._add(what, float(diff.max()), float((diff / allowed).max()), f"{rel:g}·max abs(ref) + K·u·abs(A)·abs(B)")

    def require(self, what: str, ok: bool) -> None:
        """A property that must hold exactly (zero gradient, NaN where promised...)."""
        self._add(what, 0.0 if ok else math.inf, 0.0 if ok else math.inf, "exact")

    def _add(self, what, err, ratio, tol):
        self.errors[what] = max(err, self.errors.get(what, 0.0))
        self.ratios[what] = max(ratio, self.ratios.get(what, 0.0))
        self.tolerances[what] = tol

    def result(self) -> dict[str, Any]:
        worst = max(self.ratios.values(), default=0.0)
        status = "pass" if worst <= 1.0 else "FAIL"
        return {**self.spec, "status": status, "worst": worst, "errors": self.errors, "ratios": self.ratios,
                "tolerances": self.tolerances, "notes": "; ".join(self.notes)}


# ------------------------------------------------------------------------------------------- inputs


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_labels(batch: int, seq: int, vocab: int, gen: torch.Generator, device: str, **kwargs) -> torch.Tensor:
    """Labels of the checks: a fraction masked at random, the first never (no all-masked batch) and, from
    3 sequences on, the last sequence all masked (``kwargs``: those of ``sequence_labels``)."""
    return sequence_labels(batch, seq, vocab, gen, mask_last_sequence=batch >= 3, device=device, **kwargs)


def make_logits(batch: int, seq: int, vocab: int, dtype: str, gen: torch.Generator, device: str) -> torch.Tensor:
    """[B, T + 1, V] leaf logits of std 2 (the op sees the shifted view [:, :-1])."""
    return shifted_logits(batch, seq, vocab, DTYPES_BY_NAME[dtype], gen, device=device)


def transform_of(spec: dict[str, Any]):
    """The LogitTransform of a check's options (temperature, softcap, logit_scale)."""
    from mallowspo_fast.ops.transform import LogitTransform

    return LogitTransform(spec.get("temperature", 1.0), spec.get("softcap"), spec.get("logit_scale", 1.0))


def op_options(spec: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of the public op for a check's transform and statistics options."""
    opts = {"temperature": spec.get("temperature", 1.0), "softcap": spec.get("softcap"),
            "logit_scale": spec.get("logit_scale", 1.0)}
    return {**opts, "return_stats": True} if spec.get("stats") else opts


def reference(logits: torch.Tensor, labels: torch.Tensor, sequence: bool, transform=None):
    """float64 naive op on the same (rounded) values: (leaf float64 logits, outputs)."""
    if sequence:
        return ref_sequence(logits, labels, IGNORE, transform=transform)
    x, logps, entropy = ref_token(logits, labels, IGNORE, transform=transform)
    return x, (logps, entropy)


def compare_stats(row: Row, out, logits: torch.Tensor, labels, transform, tol) -> None:
    """log Σp², mean logit and (with labels) is_top1 of a ``return_stats`` call against float64, within
    the value tolerances of ``tol``."""
    sq, mean, top1 = ref_stats(logits, labels, IGNORE, transform)
    row.compare("log_sum_sq_probs", out.log_sum_sq_probs, sq, tol.value_atol, tol.value_rtol)
    row.compare("mean_logits", out.mean_logits, mean, tol.value_atol, tol.value_rtol)
    if labels is not None:
        row.require("is_top1", torch.equal(out.is_top1.cpu(), top1.cpu()))


def upstream_loss(outs: tuple, grads: tuple, upstream: str):
    """Σ g·logps + Σ h·entropy, or one of the two terms only (the single-output backward variants)."""
    logps, entropy = outs[0], outs[1]
    g, h = grads
    terms = {"both": [(logps, g), (entropy, h)], "logp": [(logps, g)], "entropy": [(entropy, h)]}[upstream]
    return sum((out * w.to(out.dtype)).sum() for out, w in terms)


def _inject(spec: dict[str, Any], logps: torch.Tensor, atol: float) -> torch.Tensor:
    """Self-test of the check (``--inject-error``): shift the log-probs of the selected checks by ten
    times their tolerance, so that the run must fail loudly."""
    pattern = spec.get("inject")
    if pattern and pattern in spec["check"]:
        return logps + 10 * atol * (1 + logps.detach().abs())
    return logps


# ------------------------------------------------------------------------------------------- checks


def check_logits_op(spec: dict[str, Any], device: str) -> dict[str, Any]:
    """token_logprobs / sequence_logprobs on the shifted view, one upstream combination, one transform
    (and the statistics with ``stats``)."""
    import mallowspo_fast as mpf

    dtype, vocab, sequence = spec["dtype"], spec["vocab"], spec["op"] == "sequence_logprobs"
    batch, seq = spec["shape"]
    gen = _generator(spec["seed"])
    leaf = make_logits(batch, seq, vocab, dtype, gen, device).requires_grad_(True)
    labels = make_labels(batch, seq, vocab, gen, device)
    # In place: the op must own its buffer, so it gets a non-leaf copy (the gradient reaches the leaf).
    logits = (leaf * 1.0)[:, :-1] if spec["inplace"] else leaf[:, :-1]
    transform = transform_of(spec)
    out = getattr(mpf, spec["op"])(logits, labels, backend="triton", inplace_backward=spec["inplace"],
                                   **op_options(spec))
    xr, ref = reference(logits, labels, sequence, transform)
    row, tol = Row(spec), scaled_tolerances(dtype, xr, transform)
    atol, rtol = tol.value_atol, tol.value_rtol
    # A per-sequence sum adds up to T token errors.
    logp_atol = atol * seq if sequence else atol
    logps = _inject(spec, out.logps, logp_atol)
    row.compare("logp", logps, ref[0], logp_atol, rtol)
    row.compare("entropy", out.entropy, ref[1], atol, rtol)
    if sequence:
        row.require("num_tokens", torch.equal(out.num_tokens.cpu(), ref[2].cpu()))
    if spec.get("stats"):
        compare_stats(row, out, xr, labels, transform, tol)
    grads = random_grads(out.logps.shape, gen, device)
    upstream_loss((logps, out.entropy), grads, spec["upstream"]).backward()
    upstream_loss(ref, tuple(g.double() for g in grads), spec["upstream"]).backward()
    row.compare("grad", leaf.grad[:, :-1], xr.grad, tol.grad_atol, tol.grad_rtol)
    row.require("grad dtype", leaf.grad.dtype == leaf.dtype)
    row.require("zero grad off the view", bool((leaf.grad[:, -1] == 0).all()))
    return row.result()


def _chunked_rounded_logits(hidden, weight, labels, chunk_size: int) -> torch.Tensor:
    """The logits the memory mode sees, computed exactly as it computes them (same rows, same chunk
    shapes, the op's own chunk product and logits dtype), so that the reference carries the same
    rounding; masked rows stay 0."""
    from mallowspo_fast.ops.linear import _chunk_logits, default_fp32_logits

    fp32 = default_fp32_logits(hidden.device)
    flat_h = hidden.detach().reshape(-1, hidden.shape[-1])
    rows = (labels.reshape(-1) != IGNORE).nonzero().squeeze(1)
    out = torch.zeros(flat_h.shape[0], weight.shape[0], dtype=torch.float64, device=hidden.device)
    for start in range(0, rows.numel(), chunk_size):
        idx = rows[start:start + chunk_size]
        out[idx] = _chunk_logits(flat_h[idx], weight.detach(), None, fp32).double()
    return out.view(*hidden.shape[:-1], weight.shape[0])


def check_memory_mode(spec: dict[str, Any], device: str) -> dict[str, Any]:
    """linear_token_logprobs / linear_sequence_logprobs over several chunks against float64 on the
    logits the op computes (straight-through for the gradients of hidden and weight)."""
    import mallowspo_fast as mpf

    dtype, vocab, sequence = spec["dtype"], spec["vocab"], spec["op"] == "linear_sequence_logprobs"
    batch, seq = spec["shape"]
    dim, chunk = spec["hidden"], spec["chunk_size"]
    gen = _generator(spec["seed"])
    hidden, weight, _ = linear_inputs(batch, seq, dim, vocab, DTYPES_BY_NAME[dtype], gen, device=device)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    labels = make_labels(batch, seq, vocab, gen, device)
    out = getattr(mpf, spec["op"])(hidden, weight, labels, chunk_size=chunk, backend="triton", **op_options(spec))
    transform = transform_of(spec)
    h64, w64, _, logits, ref = ref_linear(hidden, weight, None, labels, sequence=sequence, transform=transform,
                                          rounded_logits=_chunked_rounded_logits(hidden, weight, labels, chunk))
    # The parameter gradients are matmul outputs with tolerances of their own: only the values are scaled.
    row, tol = Row(spec), scaled_tolerances(dtype, logits, transform)
    atol, rtol = tol.value_atol, tol.value_rtol
    logp_atol = atol * (seq if sequence else 1)
    logps = _inject(spec, out.logps, logp_atol)
    row.compare("logp", logps, ref[0], logp_atol, rtol)
    row.compare("entropy", out.entropy, ref[1], atol, rtol)
    if spec.get("stats"):
        compare_stats(row, out, logits, labels, transform, tol)
    grads = random_grads(out.logps.shape, gen, device)
    upstream_loss((logps, out.entropy), grads, spec["upstream"]).backward()
    upstream_loss(ref, tuple(g.double() for g in grads), spec["upstream"]).backward()
    # |dL/dlogits| (float64 reference) times |weight| / |hidden|: the scale of each product's rounding.
    dz = logits.grad.detach().abs().reshape(-1, vocab)
    h_abs, w_abs = h64.detach().abs().reshape(-1, dim), w64.detach().abs()
    rows = int((labels != IGNORE).sum())
    u, rel = tol.unit_roundoff, tol.linear_grad_rel
    row.compare_matmul("grad hidden", hidden.grad, h64.grad, rel, (dz @ w_abs).view(hidden.shape), vocab, u)
    row.compare_matmul("grad weight", weight.grad, w64.grad, rel, dz.t() @ h_abs, rows, u)
    row.require("grad dtype", hidden.grad.dtype == weight.grad.dtype == hidden.dtype)
    return row.result()


def check_neg_inf(spec: dict[str, Any], device: str) -> dict[str, Any]:
    """A padded vocabulary (last V/16 columns at -inf) and a row whose first third is -inf. With a soft
    cap, -inf maps to the finite -cap/T: a real probability there, but a zero slope."""
    import mallowspo_fast as mpf

    dtype, vocab = spec["dtype"], spec["vocab"]
    batch, seq = spec["shape"]
    gen = _generator(spec["seed"])
    pad = max(1, vocab // 16)
    base = make_logits(batch, seq, vocab, dtype, gen, device)
    base[..., vocab - pad:] = float("-inf")
    base[0, 1, : vocab // 3] = float("-inf")
    leaf = base.requires_grad_(True)
    labels = make_labels(batch, seq, vocab, gen, device, high=vocab - pad)
    if labels[0, 1] != IGNORE:  # that row's label must be a finite logit
        labels[0, 1] = vocab - pad - 1
    transform = transform_of(spec)
    out = mpf.token_logprobs(leaf[:, :-1], labels, backend="triton", **op_options(spec))
    xr, ref = reference(leaf[:, :-1], labels, False, transform)
    row, tol = Row(spec), scaled_tolerances(dtype, xr, transform)
    atol, rtol = tol.value_atol, tol.value_rtol
    logps = _inject(spec, out.logps, atol)
    row.compare("logp", logps, ref[0], atol, rtol)
    row.compare("entropy", out.entropy, ref[1], atol, rtol)
    grads = random_grads(labels.shape, gen, device)
    upstream_loss((logps, out.entropy), grads, "both").backward()
    upstream_loss(ref, tuple(g.double() for g in grads), "both").backward()
    row.compare("grad", leaf.grad[:, :-1], xr.grad, tol.grad_atol, tol.grad_rtol)
    row.require("finite", bool(torch.isfinite(leaf.grad).all() and torch.isfinite(out.entropy).all()))
    row.require("zero grad on -inf", bool((leaf.grad[..., vocab - pad:] == 0).all()))
    return row.result()


def check_out_of_range(spec: dict[str, Any], device: str) -> dict[str, Any]:
    """Labels outside [0, V) that are not ignore_index: NaN log-prob for those tokens, the other
    tokens exact, a finite gradient, no device fault."""
    import mallowspo_fast as mpf
    from mallowspo_fast.ops.functions import TokenLogprobsFunction

    dtype, vocab = spec["dtype"], spec["vocab"]
    batch, seq = spec["shape"]
    gen = _generator(spec["seed"])
    leaf = make_logits(batch, seq, vocab, dtype, gen, device).requires_grad_(True)
    labels = make_labels(batch, seq, vocab, gen, device)
    bad = torch.zeros_like(labels, dtype=torch.bool)
    for (b, t), value in zip(((0, 0), (0, seq - 1), (1 % batch, 0)), (vocab, -1, vocab + 7)):
        labels[b, t] = value
        bad[b, t] = True
    row = Row(spec)
    logits = leaf[:, :-1]
    transform = transform_of(spec)
    if device == "cuda":
        out = mpf.token_logprobs(logits, labels, backend="triton", **op_options(spec))
    else:
        # On CPU the public op checks the labels (free there) and raises; the kernels' own behaviour,
        # the one CUDA relies on, is reached through the autograd Function the op dispatches to.
        try:
            mpf.token_logprobs(logits, labels, backend="triton")
            raised = False
        except ValueError:
            raised = True
        row.require("ValueError on CPU", raised)
        row.notes.append("CPU: the public op raises ValueError by contract; kernels called via its Function")
        out = mpf.TokenLogprobs(*TokenLogprobsFunction.apply(logits, labels, IGNORE, transform, False, False,
                                                             "triton"))
    good_labels = labels.masked_fill(bad, IGNORE)
    xr, ref = reference(logits, good_labels, False, transform)
    good = ~bad & (labels != IGNORE)
    row.require("NaN for out-of-range", bool(torch.isnan(out.logps[bad]).all()))
    tol = tolerances(dtype)
    atol, rtol = tol.value_atol, tol.value_rtol
    logps = _inject(spec, out.logps, atol)
    row.compare("logp", logps[good], ref[0][good], atol, rtol)
    row.compare("entropy", out.entropy[good], ref[1][good], atol, rtol)
    row.require("finite entropy", bool(torch.isfinite(out.entropy).all()))
    g = torch.randn(labels.shape, generator=gen).to(device)
    (torch.nan_to_num(logps, nan=0.0) * g * good).sum().backward()
    (ref[0] * (g * good).double()).sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()  # a fault in either kernel surfaces here
    row.require("finite grad", bool(torch.isfinite(leaf.grad).all()))
    row.compare("grad", leaf.grad[:, :-1][good], xr.grad[good], tol.grad_atol, tol.grad_rtol)
    return row.result()


def check_reduce_blocks(spec: dict[str, Any], device: str) -> dict[str, Any]:
    """sequence_logprobs at lengths that select every BLOCK_T of the per-sequence reduction (of fp32
    values; of fp64 values for fp64 logits)."""
    import mallowspo_fast as mpf

    row, tol = Row(spec), tolerances(spec["dtype"])
    gen = _generator(spec["seed"])
    vocab, batch, dtype = spec["vocab"], spec["shape"][0], spec["dtype"]
    for seq in spec["seqs"]:
        logits = make_logits(batch, seq, vocab, dtype, gen, device)[:, :-1]
        # Mostly masked: the reduction reads every label either way, the forward skips masked rows.
        labels = make_labels(batch, seq, vocab, gen, device, mask_frac=spec.get("mask_frac", 0.25))
        out = mpf.sequence_logprobs(logits, labels, backend="triton")
        _, ref = reference(logits, labels, True)
        atol, rtol = tol.value_atol, tol.value_rtol
        row.compare("logp", _inject(spec, out.logps, atol * seq), ref[0], atol * seq, rtol)
        row.compare("entropy", out.entropy, ref[1], atol, rtol)
        row.require("num_tokens", torch.equal(out.num_tokens.cpu(), ref[2].cpu()))
        row.require("dtype", out.logps.dtype == (torch.float64 if dtype == "fp64" else torch.float32))
    return row.result()


def check_large_offsets(spec: dict[str, Any], device: str) -> dict[str, Any]:
    """[rows, V] logits with rows·V beyond 2³¹ elements (on CUDA): sampled rows, including the two
    around the 2³¹-element boundary and the last ones, against float64."""
    import mallowspo_fast as mpf

    rows, vocab, dtype = spec["rows"], spec["vocab"], spec["dtype"]
    tol = tolerances(dtype)
    gen = torch.Generator(device=device).manual_seed(spec["seed"])
    leaf = torch.randn(1, rows, vocab, generator=gen, device=device, dtype=DTYPES_BY_NAME[dtype]).requires_grad_(True)
    labels = torch.randint(0, vocab, (1, rows), generator=gen, device=device)
    labels[:, ::4] = IGNORE
    out = mpf.token_logprobs(leaf, labels, backend="triton")
    g = torch.randn(1, rows, generator=gen, device=device)
    h = torch.randn(1, rows, generator=gen, device=device)
    logps = _inject(spec, out.logps, tol.value_atol)
    ((logps * g).sum() + (out.entropy * h).sum()).backward()
    boundary = (2**31) // vocab
    sample = sorted({0, 1, 2, 3, min(boundary, rows - 2), min(boundary + 1, rows - 1), rows - 2, rows - 1})
    idx = torch.tensor(sample, device=device)
    x, *ref = ref_token(leaf[0, idx], labels[0, idx], IGNORE)
    ((ref[0] * g[0, idx].double()).sum() + (ref[1] * h[0, idx].double()).sum()).backward()
    row = Row(spec)
    atol, rtol = tol.value_atol, tol.value_rtol
    row.compare("logp", logps[0, idx], ref[0], atol, rtol)
    row.compare("entropy", out.entropy[0, idx], ref[1], atol, rtol)
    row.compare("grad", leaf.grad[0, idx], x.grad, tol.grad_atol, tol.grad_rtol)
    if rows * vocab <= 2**31:
        row.notes.append(f"rows·V = {rows * vocab:,} stays below 2³¹ (tiny dry-run shape)")
    return row.result()


def check_no_labels(spec: dict[str, Any], device: str) -> dict[str, Any]:
    """token_entropy (and token_logprobs(logits, None), its other name): entropy and logsumexp of every
    position of the shifted view, upstream grads on both, on lse only or on the entropies only; one
    transform (and the statistics without labels with ``stats``)."""
    import mallowspo_fast as mpf

    dtype, vocab = spec["dtype"], spec["vocab"]
    batch, seq = spec["shape"]
    gen = _generator(spec["seed"])
    leaf = make_logits(batch, seq, vocab, dtype, gen, device).requires_grad_(True)
    logits = (leaf * 1.0)[:, :-1] if spec["inplace"] else leaf[:, :-1]
    kwargs = {"backend": "triton", "inplace_backward": spec["inplace"], **op_options(spec)}
    if spec["op"] == "token_entropy":
        out = mpf.token_entropy(logits, **kwargs)
    else:
        out = mpf.token_logprobs(logits, None, **kwargs)
    transform = transform_of(spec)
    x, *ref = ref_entropy(logits, transform=transform)
    row, tol = Row(spec), scaled_tolerances(dtype, x, transform)
    atol, rtol = tol.value_atol, tol.value_rtol
    entropy = _inject(spec, out.entropy, atol)
    row.compare("entropy", entropy, ref[0], atol, rtol)
    row.compare("lse", out.lse, ref[1], atol, rtol)
    if spec.get("stats"):
        compare_stats(row, out, x, None, transform, tol)
    grads = random_grads(entropy.shape, gen, device)
    # upstream_loss weighs (first, second) output as (logp, entropy): here (entropy, lse).
    upstream = {"both": "both", "entropy": "logp", "lse": "entropy"}[spec["upstream"]]
    upstream_loss((entropy, out.lse), grads, upstream).backward()
    upstream_loss(ref, tuple(g.double() for g in grads), upstream).backward()
    row.compare("grad", leaf.grad[:, :-1], x.grad, tol.grad_atol * NO_LABELS_GRAD_FACTOR, tol.grad_rtol)
    row.require("zero grad off the view", bool((leaf.grad[:, -1] == 0).all()))
    return row.result()


def check_vocab_shard(spec: dict[str, Any], device: str) -> dict[str, Any]:
    """The raw forward of a vocabulary shard (``triton_path.forward_raw``, what the vocab-parallel ops launch on
    each rank) over the whole vocabulary as one shard, combined by the vocab-parallel arithmetic without a
    collective (the sum of one shard is itself): log-probs, entropies, lse and the statistics against float64,
    with and without labels."""
    from mallowspo_fast.ops import triton_path
    from mallowspo_fast.ops.vocab_parallel_combine import finish, pack

    dtype, vocab = spec["dtype"], spec["vocab"]
    batch, seq = spec["shape"]
    gen = _generator(spec["seed"])
    logits = make_logits(batch, seq, vocab, dtype, gen, device)[:, :-1]  # the shifted view, as the ops see it
    seq = logits.shape[1]
    labels = make_labels(batch, seq, vocab, gen, device) if spec.get("labels", True) else None
    transform, stats = transform_of(spec), bool(spec.get("stats"))
    raw = triton_path.forward_raw(logits, labels, IGNORE, transform, stats)
    flat = raw.reshape(batch * seq, -1)
    flat_labels = None if labels is None else labels.reshape(-1)
    global_max = flat[:, 0].contiguous()
    rows, _ = finish(global_max, pack(flat, global_max, flat_labels, IGNORE, 0, vocab, stats), flat_labels,
                     IGNORE, stats)
    row = Row(spec)
    if labels is None:
        x, *ref = ref_entropy(logits, transform=transform)
        tol = scaled_tolerances(dtype, x, transform)
        row.compare("entropy", rows.entropy.view(batch, seq), ref[0], tol.value_atol, tol.value_rtol)
        row.compare("lse", rows.lse.view(batch, seq), ref[1], tol.value_atol, tol.value_rtol)
    else:
        x, logps, entropy = ref_token(logits, labels, IGNORE, transform=transform)
        tol = scaled_tolerances(dtype, x, transform)
        row.compare("logps", _inject(spec, rows.logps.view(batch, seq), tol.value_atol), logps, tol.value_atol,
                    tol.value_rtol)
        row.compare("entropy", rows.entropy.view(batch, seq), entropy, tol.value_atol, tol.value_rtol)
    if stats:
        out = rows._replace(**{k: getattr(rows, k).view(batch, seq) for k in ("log_sum_sq_probs", "mean_logits")},
                            is_top1=None if rows.is_top1 is None else rows.is_top1.view(batch, seq))
        compare_stats(row, out, x, labels, transform, tol)
    return row.result()


CHECKS: dict[str, Callable[[dict[str, Any], str], dict[str, Any]]] = {
    "values": check_logits_op,
    "memory mode": check_memory_mode,
    "-inf logits": check_neg_inf,
    "out-of-range labels": check_out_of_range,
    "reduce blocks": check_reduce_blocks,
    "offsets > 2^31": check_large_offsets,
    "no labels": check_no_labels,
    "vocab shard": check_vocab_shard,
}
