"""The op's autograd Functions, one set for every backend.

A backend is a module with the contract ``forward`` / ``backward`` / ``sequence_reduce``
(``torch_path``, ``triton_path``; docs/kernels.md). The Functions save only the logits (the caller's
tensor, no copy), the labels and two per-row statistics (lse, H); the backward recomputes everything
else. Every tensor they return is its own allocation, so callers may edit results in place.
"""

from __future__ import annotations

import types

import torch

from .transform import LogitTransform


def backend_module(name: str) -> types.ModuleType:
    """The module implementing backend ``name`` ("torch" or "triton")."""
    if name == "triton":
        from . import triton_path

        return triton_path
    from . import torch_path

    return torch_path


def _residual(lse_lo):
    """The lse residual for a backend's backward, when its forward gave one (RowStats.lse_lo)."""
    return {} if lse_lo is None else {"lse_lo": lse_lo}


def sequence_upstream(grad_logps, grad_entropy, num_tokens, seq: int):
    """Per-token upstream grads [B, T] of per-sequence ones [B] (a sum of log-probs, a mean of entropies),
    broadcast over time through a zero stride: no [B, T] copies. None stays None."""
    g = grad_logps.unsqueeze(1).expand(-1, seq) if grad_logps is not None else None
    h = None
    if grad_entropy is not None:
        h = (grad_entropy / num_tokens.clamp(min=1).to(grad_entropy.dtype)).unsqueeze(1).expand(-1, seq)
    return g, h


def save_token_outputs(ctx, logits, saved_labels, rows, has_labels: bool, return_stats: bool) -> tuple:
    """The per-token functions' forward epilogue (single device and vocab-parallel): save what the backward
    needs, mark the statistics non-differentiable, and return the outputs. The saved statistics are copies of
    what is returned ([B, T] floats): a caller editing a result in place must not change the backward."""
    lse = rows.lse if has_labels else rows.lse.clone()
    ctx.save_for_backward(logits, saved_labels, lse, rows.entropy.clone(), rows.lse_lo)
    ctx.has_labels = has_labels
    ctx.set_materialize_grads(False)
    extra = (rows.log_sum_sq_probs, rows.mean_logits) if return_stats else ()
    if has_labels:
        outs = (rows.logps, rows.entropy, *extra, *((rows.is_top1,) if return_stats else ()))
        ctx.mark_non_differentiable(rows.lse, *outs[2:])
    else:
        outs = (rows.entropy, rows.lse, *extra)
        ctx.mark_non_differentiable(*outs[2:])
    return outs


def token_upstream(ctx, grads) -> tuple:
    """(g, h, g_lse) of the per-token functions' outputs: (logps, entropy) with labels, (entropy, lse) without."""
    return (grads[0], grads[1], None) if ctx.has_labels else (None, grads[0], grads[1])


class TokenLogprobsFunction(torch.autograd.Function):
    """logits [B, T, V], labels [B, T] or None -> with labels (logps, entropy[, log_sum_sq_probs, mean_logits,
    is_top1]); without (entropy, lse[, log_sum_sq_probs, mean_logits]). The statistics are not differentiable."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index: int, transform: LogitTransform, inplace: bool,
                return_stats: bool, backend: str):
        impl = backend_module(backend)
        rows = impl.forward(logits, labels, ignore_index, transform, return_stats)
        ctx.ignore_index, ctx.transform, ctx.inplace, ctx.impl = ignore_index, transform, inplace, impl
        return save_token_outputs(ctx, logits, labels, rows, labels is not None, return_stats)

    @staticmethod
    def backward(ctx, *grads):
        logits, labels, lse, entropy, lse_lo = ctx.saved_tensors
        g, h, g_lse = token_upstream(ctx, grads)
        if g is None and h is None and g_lse is None:
            return (None,) * 7
        grad = ctx.impl.backward(logits, labels, lse, entropy, g, h, g_lse, ctx.ignore_index, ctx.transform,
                                 ctx.inplace, **_residual(lse_lo))
        return grad, None, None, None, None, None, None


class SequenceLogprobsFunction(torch.autograd.Function):
    """logits [B, T, V], labels [B, T] -> (Σ logps [B], mean entropy [B], num_tokens [B] int64)."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index: int, transform: LogitTransform, inplace: bool,
                backend: str):
        impl = backend_module(backend)
        rows = impl.forward(logits, labels, ignore_index, transform, False)
        seq_logps, seq_entropy, num_tokens = impl.sequence_reduce(labels, rows.logps, rows.entropy, ignore_index)
        ctx.save_for_backward(logits, labels, rows.lse, rows.entropy, num_tokens, rows.lse_lo)
        ctx.ignore_index, ctx.transform, ctx.inplace, ctx.impl = ignore_index, transform, inplace, impl
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(num_tokens)
        return seq_logps, seq_entropy, num_tokens

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy, _grad_count):
        if grad_logps is None and grad_entropy is None:
            return (None,) * 6
        logits, labels, lse, entropy, num_tokens, lse_lo = ctx.saved_tensors
        g, h = sequence_upstream(grad_logps, grad_entropy, num_tokens, labels.shape[1])
        grad = ctx.impl.backward(logits, labels, lse, entropy, g, h, None, ctx.ignore_index, ctx.transform,
                                 ctx.inplace, **_residual(lse_lo))
        return grad, None, None, None, None, None
