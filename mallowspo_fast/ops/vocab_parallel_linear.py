"""Vocab-parallel memory mode: token log-probs and entropies from replicated hidden states and an output
layer whose weight rows (and bias) are split by vocabulary across tensor-parallel ranks, as a
column-parallel head holds them (docs/vocab-parallel.md).

Each rank runs the memory mode (``linear``) on its own rows of the weight: chunks of logits are computed,
reduced to the shard's raw accumulators and dropped. One combination over all the unmasked rows (two
all-reduces of O(N) floats) gives every rank the statistics of the full vocabulary. The backward
recomputes each chunk's logits, turns them into their gradient with the global lse and H (local: the
backend contract's ``backward``), and contracts it into this rank's weight and bias gradients and a
partial hidden-state gradient; the partial gradients are summed over the group by one all-reduce, as the
backward of a column-parallel layer does (in fp32 for half-precision hidden states).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .functions import backend_module
from .linear import (
    _addmm_fp32,
    _chunk_logits,
    _gather_rows,
    _validate,
    compute_dtype,
    default_chunk_size,
    default_fp32_logits,
)
from .logprobs import IGNORE_INDEX, SequenceLogprobs, TokenLogprobs, TokenStats
from .vocab_parallel import (
    check_labels_below,
    check_negative_labels,
    check_vocab_start,
    resolve_group,
    resolve_vp_backend,
)
from .vocab_parallel_combine import combine, local_labels

__all__ = ["vocab_parallel_linear_token_logprobs", "vocab_parallel_linear_sequence_logprobs"]


class VocabParallelLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, transform, chunk_size, backend, return_stats, cdt,
                fp32_logits, group, vocab_start, where):
        impl = backend_module(backend)
        batch, seq, _ = hidden.shape
        # The labels are the same on every rank, so are the unmasked rows and the collectives' sizes.
        rows = (labels != ignore_index).reshape(-1).nonzero().squeeze(1)
        flat_labels = labels.reshape(-1)
        live_labels = flat_labels[rows]
        local = local_labels(live_labels, vocab_start, weight.shape[0], ignore_index)
        w = weight.to(cdt)  # no copy when the dtypes agree
        b = None if bias is None else bias.to(cdt)
        raw = None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, rows.numel(), chunk_size):
                idx = rows[start:start + chunk_size]
                logits = _chunk_logits(_gather_rows(hidden, idx).to(cdt), w, b, fp32_logits)
                part = impl.forward_raw(logits.unsqueeze(0), local[start:start + idx.numel()].unsqueeze(0),
                                        ignore_index, transform, return_stats)[0]
                if raw is None:
                    raw = torch.empty(rows.numel(), part.shape[1], dtype=part.dtype, device=hidden.device)
                raw[start:start + idx.numel()] = part
                del logits
        if raw is None:  # no unmasked row anywhere (the same on every rank): nothing to combine
            sdt = torch.float64 if cdt == torch.float64 else torch.float32
            raw = torch.zeros(0, 7 if return_stats else 4, dtype=sdt, device=hidden.device)
        stats, vocab = combine(raw, live_labels, ignore_index, vocab_start, weight.shape[0], return_stats, group)
        check_labels_below(live_labels, vocab, ignore_index, where, positions=rows)
        outs = []
        for name, val in zip(stats._fields, stats):
            if name in ("lse", "lse_lo") or val is None:  # kept for the backward, not returned
                continue
            full = torch.zeros(batch, seq, dtype=val.dtype, device=hidden.device)
            full.view(-1).index_copy_(0, rows, val)
            outs.append(full)
        ctx.save_for_backward(hidden, weight, bias, local, rows, stats.entropy, stats.lse, stats.lse_lo)
        ctx.ignore_index, ctx.transform, ctx.chunk_size, ctx.backend = ignore_index, transform, chunk_size, backend
        ctx.cdt, ctx.fp32_logits, ctx.group = cdt, fp32_logits, group
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*outs[2:])
        return tuple(outs)

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy, *_stats_grads):
        hidden, weight, bias, local, rows, entropy, lse, lse_lo = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        n_inputs = 14
        if grad_logps is None and grad_entropy is None:
            return (None,) * n_inputs
        impl = backend_module(ctx.backend)
        batch, seq, dim = hidden.shape
        dev, cdt = hidden.device, ctx.cdt
        acc = torch.float64 if cdt == torch.float64 else torch.float32
        # The partial hidden-state gradients are summed over the ranks in fp32 (float64 for float64 products)
        # and rounded to the hidden states' dtype once, after the sum.
        grad_hidden = torch.zeros(batch * seq, dim, dtype=acc, device=dev) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=dev) if need_weight else None
        need_bias = need_bias and bias is not None
        grad_bias = torch.zeros(weight.shape[0], dtype=acc, device=dev) if need_bias else None
        g_all = grad_logps.reshape(-1)[rows] if grad_logps is not None else None
        h_all = grad_entropy.reshape(-1)[rows] if grad_entropy is not None else None
        w = weight.to(cdt)
        b = None if bias is None else bias.to(cdt)
        with torch.autocast(dev.type, enabled=False):
            for start in range(0, rows.numel(), ctx.chunk_size):
                sl = slice(start, start + ctx.chunk_size)
                idx = rows[sl]
                h_rows = _gather_rows(hidden, idx).to(cdt)
                logits = _chunk_logits(h_rows, w, b, ctx.fp32_logits).unsqueeze(0)

                def row(t, sl=sl):
                    return None if t is None else t[sl].unsqueeze(0)

                # In place: the recomputed chunk is ours and not needed afterwards.
                dlogits = impl.backward(logits, row(local), row(lse), row(entropy), row(g_all), row(h_all), None,
                                        ctx.ignore_index, ctx.transform, True, lse_lo=row(lse_lo))[0]
                if need_hidden:  # the products as the single-device memory mode computes them
                    if hidden.dtype == cdt:
                        rows_grad = torch.mm(dlogits.to(cdt), w)
                    else:  # e.g. fp32 hidden states under bf16 autocast: accumulated in fp32 (as TRL)
                        rows_grad = torch.zeros(idx.numel(), dim, dtype=torch.float32, device=dev)
                        _addmm_fp32(rows_grad, dlogits.to(cdt), w)
                    grad_hidden.index_copy_(0, idx, rows_grad.to(acc))
                if need_weight:
                    _addmm_fp32(grad_weight, dlogits.t().to(cdt), h_rows)
                if need_bias:
                    grad_bias += dlogits.sum(0, dtype=acc)
                del logits, dlogits
        if grad_hidden is not None:
            dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=ctx.group)
            grad_hidden = grad_hidden.view(batch, seq, dim).to(hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return (grad_hidden, grad_weight, grad_bias) + (None,) * (n_inputs - 3)


def vocab_parallel_linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_start: int,
    group: dist.ProcessGroup | None = None,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    chunk_size: int | None = None,
    backend: str | None = None,
    return_stats: bool = False,
    fp32_logits: bool | None = None,
) -> TokenLogprobs | TokenStats:
    """:func:`~mallowspo_fast.ops.linear.linear_token_logprobs` with the output layer split by vocabulary
    across ``group``: each rank passes the replicated hidden states and its own weight rows (a
    column-parallel head) and gets the results of the full vocabulary; at most one chunk of logits of its
    shard exists at a time.

    Collectives: forward, an all-reduce (max) of 1 float and one (sum) of 3 floats (7 with ``return_stats``)
    per unmasked row; backward, one all-reduce (sum) of the [N, H] hidden-state gradient (fp32; float64 for
    float64 products), when ``hidden`` requires grad.

    Args:
        hidden: [N, H] (or [..., H]) last hidden states, the same on every rank.
        weight: [V_r, H] this rank's rows of the output layer, vocabulary ids ``[vocab_start, vocab_start + V_r)``
            (widths may differ between ranks; the shards tile the vocabulary).
        labels: [N] (or [...]) global vocabulary ids, the same on every rank.
        vocab_start: the first vocabulary id of this rank's rows.
        group: the tensor-parallel process group (None: the default group).
        bias: optional [V_r] bias of this rank's rows.
        ignore_index: label value of masked positions.
        temperature: positive divisor of the logits.
        softcap: optional soft cap of the logits.
        logit_scale: multiplier of the logits applied first.
        chunk_size: unmasked rows per chunk (None: about 48 MiB of fp32 logits of the shard on CPU, 256 MiB on
            accelerators).
        backend: "triton", "torch" or None; no "reference".
        return_stats: also return log Σp², the mean logit and whether the label is the top-1 token.
        fp32_logits: keep each chunk's logits in fp32 when the products run in bf16/fp16 (None: on CUDA).

    Returns:
        TokenLogprobs(logps, entropy) (TokenStats with ``return_stats``) of the full vocabulary, identical on
        every rank; differentiable in ``hidden`` (summed over the group), ``weight`` and ``bias`` (this rank's).

    Raises:
        RuntimeError: torch.distributed not initialized.
        TypeError, ValueError: as :func:`~mallowspo_fast.ops.linear.linear_token_logprobs`, a bad
            ``vocab_start`` or ``group``; on CPU a label outside [0, V) (V the sum of the shards' widths).
    """
    where = "vocab_parallel_linear_token_logprobs"
    transform = _validate(hidden, weight, labels, bias, temperature, softcap, logit_scale, chunk_size, where)
    start = check_vocab_start(vocab_start, where)
    pg = resolve_group(group, where)
    labels = labels.long()
    be = resolve_vp_backend(backend, hidden.device, where)
    check_negative_labels(labels, ignore_index, where)
    cdt = compute_dtype(hidden)
    lead = labels.shape
    if hidden.dim() == 2:
        hidden3d, labels2d = hidden.unsqueeze(0), labels.reshape(1, -1)
    else:
        rows3d = math.prod(hidden.shape[:-2])  # explicit: reshape(-1, 0, H) is ambiguous
        hidden3d = hidden.reshape(rows3d, *hidden.shape[-2:])
        labels2d = labels.reshape(rows3d, labels.shape[-1])
    rows = chunk_size or default_chunk_size(weight.shape[0], hidden.device)
    fp32 = default_fp32_logits(hidden.device) if fp32_logits is None else bool(fp32_logits)
    outs = VocabParallelLinearFunction.apply(hidden3d, weight, bias, labels2d, int(ignore_index), transform, int(rows),
                                             be, bool(return_stats), cdt, fp32, pg, start, (where, tuple(lead)))
    outs = [t.view(lead) for t in outs]
    return TokenStats(*outs) if return_stats else TokenLogprobs(*outs)


def vocab_parallel_linear_sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_start: int,
    group: dist.ProcessGroup | None = None,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    chunk_size: int | None = None,
    backend: str | None = None,
    fp32_logits: bool | None = None,
) -> SequenceLogprobs:
    """Per-sequence sums of log-probs and mean entropies (as
    :func:`~mallowspo_fast.ops.linear.linear_sequence_logprobs`) with the output layer split by vocabulary
    across ``group``.

    Args:
        hidden: [B, T, H] last hidden states, the same on every rank.
        weight: [V_r, H] this rank's rows of the output layer.
        labels: [B, T] global vocabulary ids, the same on every rank.
        vocab_start: the first vocabulary id of this rank's rows.
        group: the tensor-parallel process group (None: the default group).
        bias: optional [V_r] bias of this rank's rows.
        ignore_index: label value of masked positions.
        temperature: positive divisor of the logits.
        softcap: optional soft cap of the logits.
        logit_scale: multiplier of the logits applied first.
        chunk_size: unmasked rows per chunk (None: by V_r, as :func:`vocab_parallel_linear_token_logprobs`).
        backend: "triton", "torch" or None; no "reference".
        fp32_logits: as in :func:`vocab_parallel_linear_token_logprobs`.

    Returns:
        SequenceLogprobs(logps [B], entropy [B], num_tokens [B]) of the full vocabulary, identical on every rank.

    Raises:
        ValueError: ``hidden`` not 3-D, and everything :func:`vocab_parallel_linear_token_logprobs` raises.
    """
    if isinstance(hidden, torch.Tensor) and hidden.dim() != 3:
        raise ValueError(f"vocab_parallel_linear_sequence_logprobs: expected hidden [B, T, H], got shape "
                         f"{tuple(hidden.shape)}")
    tok = vocab_parallel_linear_token_logprobs(
        hidden, weight, labels, vocab_start=vocab_start, group=group, bias=bias, ignore_index=ignore_index,
        temperature=temperature, softcap=softcap, logit_scale=logit_scale, chunk_size=chunk_size, backend=backend,
        fp32_logits=fp32_logits,
    )
    num_tokens = (labels != ignore_index).sum(-1)
    denom = num_tokens.clamp(min=1).to(tok.entropy.dtype)
    return SequenceLogprobs(tok.logps.sum(-1), tok.entropy.sum(-1) / denom, num_tokens)
