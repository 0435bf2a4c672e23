"""Vocab-parallel log-probs and entropies: the op over logits split by vocabulary across tensor-parallel
ranks (docs/vocab-parallel.md).

With tensor parallelism the output layer is column-parallel: rank r holds the weight rows, and so the
logits, of a contiguous slice ``[vocab_start, vocab_start + V_r)`` of the vocabulary, ``[..., V_r]`` per
rank (V_r may differ between ranks). Each rank makes one pass over its shard with its backend's
``forward_raw`` (the per-row max, Σe and Σe·z relative to that max, and the label's logit when the shard
holds it), then two all-reduces combine those exactly (``vocab_parallel_combine``): every rank ends with
the same per-token log-probs, entropies and logsumexps, equal to the op on the full vocabulary. The
backward is local: with the global lse and H each rank's gradient of its own shard is the single-device
backward on that shard (the backend contract's ``backward``, with the labels in shard coordinates).

As in Megatron, the loss is computed redundantly on every rank of the group from the replicated outputs,
so that each rank's upstream gradient is the same.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .functions import backend_module, save_token_outputs, sequence_upstream, token_upstream
from .logprobs import (
    IGNORE_INDEX,
    SequenceLogprobs,
    TokenEntropy,
    TokenLogprobs,
    TokenStats,
    _as_3d,
    _validate,
    check_inplace,
    resolve_backend,
)
from .transform import LogitTransform
from .vocab_parallel_combine import combine, local_labels

__all__ = ["vocab_parallel_token_logprobs", "vocab_parallel_token_entropy", "vocab_parallel_sequence_logprobs"]


def resolve_group(group, where: str):
    """The process group (None: the default one), or a clear error when torch.distributed is not set up."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{where}: torch.distributed is not initialized; call torch.distributed."
                           "init_process_group (or name a process group) before a vocab-parallel op")
    if group is None:
        return dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{where}: group must be a torch.distributed ProcessGroup or None, got "
                        f"{type(group).__name__}")
    return group


def check_vocab_start(vocab_start: object, where: str) -> int:
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"{where}: vocab_start must be a non-negative int (the first vocabulary id of this "
                         f"rank's shard), got {vocab_start!r}")
    return vocab_start


def check_negative_labels(labels: torch.Tensor, ignore_index: int, where: str) -> None:
    """Negative labels other than ignore_index, on CPU (free there; identical on every rank, so every rank
    raises before any collective). Labels at or beyond V are found after the combination (V is the sum of
    the shards' widths)."""
    if labels.device.type != "cpu" or labels.numel() == 0:
        return
    bad = (labels != ignore_index) & (labels < 0)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0].tolist())
        raise ValueError(f"{where}: labels must lie in [0, V) or equal ignore_index={ignore_index}; found "
                         f"{int(labels[idx])} at position {idx}")


def check_labels_below(labels: torch.Tensor, vocab: int | None, ignore_index: int, where: tuple[str, tuple],
                       positions: torch.Tensor | None = None) -> None:
    """After the combination, on CPU: labels at or beyond V (the sum of the shards' widths) raise on every
    rank alike (V and the labels are the same everywhere). ``labels`` is flat; ``where`` = (the op's name, the
    shape of the caller's labels); ``positions``: the flat index of each label there (None: its own index)."""
    if vocab is None or labels.numel() == 0:
        return
    bad = (labels != ignore_index) & (labels >= vocab)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        flat = first if positions is None else int(positions[first])
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), where[1]))
        raise ValueError(f"{where[0]}: labels must lie in [0, {vocab}) (V, the sum of the shards' widths) or equal "
                         f"ignore_index={ignore_index}; found {int(labels[first])} at position {idx}")


def combined_rows(impl, logits, labels, local, ignore_index, transform, return_stats, group, vocab_start,
                  where: tuple[str, tuple]):
    """Forward of one rank: its shard's raw accumulators, combined over the group -> RowStats [B, T]."""
    batch, seq, vocab_local = logits.shape
    raw = impl.forward_raw(logits, local, ignore_index, transform, return_stats)
    flat_labels = None if labels is None else labels.reshape(-1)
    rows, vocab = combine(raw.view(batch * seq, -1), flat_labels, ignore_index, vocab_start, vocab_local,
                          return_stats, group)
    if labels is not None:
        check_labels_below(flat_labels, vocab, ignore_index, where)
    return type(rows)(*(None if t is None else t.view(batch, seq) for t in rows))


class VocabParallelTokenFunction(torch.autograd.Function):
    """One rank's shard [B, T, V_r] -> the outputs of ``TokenLogprobsFunction`` over the full vocabulary
    (with labels: logps, entropy[, stats]; without: entropy, lse[, stats]); backward local to the shard."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index: int, transform: LogitTransform, inplace: bool,
                return_stats: bool, backend: str, group, vocab_start: int, where: tuple[str, tuple]):
        impl = backend_module(backend)
        local = None if labels is None else local_labels(labels, vocab_start, logits.shape[-1], ignore_index)
        rows = combined_rows(impl, logits, labels, local, ignore_index, transform, return_stats, group,
                             vocab_start, where)
        ctx.ignore_index, ctx.transform, ctx.inplace, ctx.impl = ignore_index, transform, inplace, impl
        return save_token_outputs(ctx, logits, local, rows, labels is not None, return_stats)

    @staticmethod
    def backward(ctx, *grads):
        logits, local, lse, entropy, lse_lo = ctx.saved_tensors
        g, h, g_lse = token_upstream(ctx, grads)
        if g is None and h is None and g_lse is None:
            return (None,) * 10
        grad = ctx.impl.backward(logits, local, lse, entropy, g, h, g_lse, ctx.ignore_index, ctx.transform,
                                 ctx.inplace, lse_lo=lse_lo)
        return (grad,) + (None,) * 9


class VocabParallelSequenceFunction(torch.autograd.Function):
    """One rank's shard [B, T, V_r] -> (Σ logps [B], mean entropy [B], num_tokens [B]) over the full vocabulary."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index: int, transform: LogitTransform, inplace: bool, backend: str,
                group, vocab_start: int, where: tuple[str, tuple]):
        impl = backend_module(backend)
        local = local_labels(labels, vocab_start, logits.shape[-1], ignore_index)
        rows = combined_rows(impl, logits, labels, local, ignore_index, transform, False, group, vocab_start, where)
        seq_logps, seq_entropy, num_tokens = impl.sequence_reduce(labels, rows.logps, rows.entropy, ignore_index)
        ctx.save_for_backward(logits, local, rows.lse, rows.entropy, num_tokens, rows.lse_lo)
        ctx.ignore_index, ctx.transform, ctx.inplace, ctx.impl = ignore_index, transform, inplace, impl
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(num_tokens)
        return seq_logps, seq_entropy, num_tokens

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy, _grad_count):
        if grad_logps is None and grad_entropy is None:
            return (None,) * 9
        logits, local, lse, entropy, num_tokens, lse_lo = ctx.saved_tensors
        g, h = sequence_upstream(grad_logps, grad_entropy, num_tokens, local.shape[1])
        grad = ctx.impl.backward(logits, local, lse, entropy, g, h, None, ctx.ignore_index, ctx.transform,
                                 ctx.inplace, lse_lo=lse_lo)
        return (grad,) + (None,) * 8


def resolve_vp_backend(backend: str | None, device: torch.device, where: str) -> str:
    """As ``resolve_backend``; the naive "reference" backend has no vocab-parallel form (it would need the
    whole vocabulary on each rank)."""
    be = resolve_backend(backend, device)
    if be == "reference":
        raise ValueError(f"{where}: backend='reference' has no vocab-parallel form; use 'torch' or 'triton' (the "
                         "single-device ops on the gathered logits are the reference)")
    return be


def vocab_parallel_token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    vocab_start: int,
    group: dist.ProcessGroup | None = None,
    ignore_index: int = IGNORE_INDEX,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    backend: str | None = None,
    inplace_backward: bool = False,
    return_stats: bool = False,
) -> TokenLogprobs | TokenEntropy | TokenStats:
    """:func:`~mallowspo_fast.ops.logprobs.token_logprobs` over logits split by vocabulary across the ranks of
    ``group``: each rank passes its own shard and gets the results of the full vocabulary.

    One pass over the local shard, then two all-reduces over ``group`` of O(N) floats (docs/vocab-parallel.md):
    a max of 1 float per row and a sum of 3 floats per row (7 with ``return_stats``) plus one per call. The
    backward is local to the shard: no collective.

    Args:
        logits: [..., V_r] this rank's logits of the vocabulary ids ``[vocab_start, vocab_start + V_r)``;
            float32/bfloat16/float16/float64, any row stride. V_r may differ between ranks (uneven shards);
            the shards must tile ``[0, V)`` without gaps or overlaps.
        labels: [...] global vocabulary ids (int64 or int32), the same on every rank; a label may fall in any
            shard. ``ignore_index`` positions give 0 and get no gradient. None: the entropy and the logsumexp
            of every position (:func:`vocab_parallel_token_entropy`).
        vocab_start: the first vocabulary id of this rank's shard.
        group: the tensor-parallel process group (None: the default group).
        ignore_index: label value of masked positions.
        temperature: positive divisor of the logits (elementwise, like the two below: applied per shard).
        softcap: optional soft cap of the logits.
        logit_scale: multiplier of the logits applied first.
        backend: "triton", "torch" or None (triton on CUDA, torch elsewhere); no "reference".
        inplace_backward: the backward writes the shard's gradient into its logits buffer.
        return_stats: also return log Σp², the mean logit and whether the label is the top-1 token.

    Returns:
        As :func:`~mallowspo_fast.ops.logprobs.token_logprobs` on the full vocabulary, identical on every rank:
        TokenLogprobs(logps, entropy), TokenEntropy(entropy, lse) without labels, TokenStats with
        ``return_stats`` (``is_top1``: the first global index of the max wins on ties).

    Raises:
        RuntimeError: torch.distributed not initialized.
        TypeError, ValueError: as :func:`~mallowspo_fast.ops.logprobs.token_logprobs`, and a bad
            ``vocab_start`` or ``group``. On CPU a label outside [0, V) raises on every rank (V = the sum of the
            shards' widths); on CUDA its log-prob is NaN.

    Examples:
        >>> tp, rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
        >>> out = vocab_parallel_token_logprobs(shard_logits, labels, vocab_start=rank * shard_logits.shape[-1],
        ...                                     group=tp_group)
    """
    where = "vocab_parallel_token_logprobs"
    if labels is None:
        return vocab_parallel_token_entropy(logits, vocab_start=vocab_start, group=group, temperature=temperature,
                                            softcap=softcap, logit_scale=logit_scale, backend=backend,
                                            inplace_backward=inplace_backward, return_stats=return_stats)
    transform = _validate(logits, labels, temperature, where, softcap, logit_scale)
    check_inplace(logits, inplace_backward, where)
    start = check_vocab_start(vocab_start, where)
    pg = resolve_group(group, where)
    labels = labels.long()
    be = resolve_vp_backend(backend, logits.device, where)
    check_negative_labels(labels, ignore_index, where)
    lead = labels.shape
    logits3d, labels2d = _as_3d(logits, labels)
    outs = VocabParallelTokenFunction.apply(logits3d, labels2d, int(ignore_index), transform, bool(inplace_backward),
                                            bool(return_stats), be, pg, start, (where, tuple(lead)))
    outs = [t.view(lead) for t in outs]
    return TokenStats(*outs) if return_stats else TokenLogprobs(*outs)


def vocab_parallel_token_entropy(
    logits: torch.Tensor,
    *,
    vocab_start: int = 0,
    group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    backend: str | None = None,
    inplace_backward: bool = False,
    return_stats: bool = False,
) -> TokenEntropy | TokenStats:
    """:func:`~mallowspo_fast.ops.logprobs.token_entropy` over logits split by vocabulary across ``group``:
    the entropy and the logsumexp of every position of the full vocabulary, from each rank's shard.

    Two all-reduces of O(N) floats: a max of 1 float per row, a sum of 2 floats per row (4 with
    ``return_stats``) plus one per call; a local backward.

    Args:
        logits: [..., V_r] this rank's shard (any widths; the shards tile the vocabulary).
        vocab_start: the first vocabulary id of the shard; without labels only the statistics' top-1 would need
            it, and there is none, so any value serves (kept for a uniform call).
        group: the tensor-parallel process group (None: the default group).
        temperature: positive divisor of the logits.
        softcap: optional soft cap of the logits.
        logit_scale: multiplier of the logits applied first.
        backend: "triton", "torch" or None; no "reference".
        inplace_backward: the backward writes the shard's gradient into its logits buffer.
        return_stats: also return log Σp² and the mean logit of every position.

    Returns:
        TokenEntropy(entropy, lse) of the full vocabulary (TokenStats with ``return_stats``), identical on
        every rank, differentiable in both.

    Raises:
        RuntimeError, TypeError, ValueError: as :func:`vocab_parallel_token_logprobs`.
    """
    where = "vocab_parallel_token_entropy"
    transform = _validate(logits, None, temperature, where, softcap, logit_scale)
    check_inplace(logits, inplace_backward, where)
    start = check_vocab_start(vocab_start, where)
    pg = resolve_group(group, where)
    be = resolve_vp_backend(backend, logits.device, where)
    lead = logits.shape[:-1]
    logits3d, _ = _as_3d(logits, None)
    outs = VocabParallelTokenFunction.apply(logits3d, None, 0, transform, bool(inplace_backward), bool(return_stats),
                                            be, pg, start, (where, tuple(lead)))
    outs = [t.view(lead) for t in outs]
    return TokenStats(None, outs[0], outs[2], outs[3], None, outs[1]) if return_stats else TokenEntropy(*outs)


def vocab_parallel_sequence_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_start: int,
    group: dist.ProcessGroup | None = None,
    ignore_index: int = IGNORE_INDEX,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    backend: str | None = None,
    inplace_backward: bool = False,
) -> SequenceLogprobs:
    """:func:`~mallowspo_fast.ops.logprobs.sequence_logprobs` over logits split by vocabulary across ``group``.

    Args:
        logits: [B, T, V_r] this rank's shard.
        labels: [B, T] global ids, the same on every rank (``ignore_index`` marks prompt and padding).
        vocab_start: the first vocabulary id of this rank's shard.
        group: the tensor-parallel process group (None: the default group).
        ignore_index: label value of masked positions.
        temperature: positive divisor of the logits.
        softcap: optional soft cap of the logits.
        logit_scale: multiplier of the logits applied first.
        backend: "triton", "torch" or None; no "reference".
        inplace_backward: the backward writes the shard's gradient into its logits buffer.

    Returns:
        SequenceLogprobs(logps [B], entropy [B], num_tokens [B]) of the full vocabulary, identical on every rank.

    Raises:
        RuntimeError, TypeError, ValueError: as :func:`vocab_parallel_token_logprobs`; labels None or logits
            that are not 3-D.
    """
    where = "vocab_parallel_sequence_logprobs"
    if labels is None:
        raise ValueError(f"{where}: labels are required; for the entropy of every position use "
                         "vocab_parallel_token_entropy")
    transform = _validate(logits, labels, temperature, where, softcap, logit_scale)
    check_inplace(logits, inplace_backward, where)
    if logits.dim() != 3:
        raise ValueError(f"{where}: expected logits [B, T, V_r], got shape {tuple(logits.shape)}")
    start = check_vocab_start(vocab_start, where)
    pg = resolve_group(group, where)
    labels = labels.long()
    be = resolve_vp_backend(backend, logits.device, where)
    check_negative_labels(labels, ignore_index, where)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return SequenceLogprobs(*VocabParallelSequenceFunction.apply(logits, labels, int(ignore_index), transform,
                                                                 bool(inplace_backward), be, pg, start,
                                                                 (where, tuple(labels.shape))))
