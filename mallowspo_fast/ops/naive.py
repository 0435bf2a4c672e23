"""Naive eager reference for the log-prob / entropy op.

Materialises the full [N, V] log-softmax like the textbook code does. Used by the tests (in float64)
and by the benchmarks as the "reference" provider; never used on a hot path.
"""

from __future__ import annotations

import torch

from .transform import IDENTITY, LogitTransform


def _transformed(logits: torch.Tensor, temperature: float, transform: LogitTransform | None,
                 compute_dtype: torch.dtype) -> torch.Tensor:
    if transform is None:
        transform = LogitTransform(temperature=temperature) if temperature != 1.0 else IDENTITY
    return transform.apply(logits.to(compute_dtype))


def _log_softmax_parts(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log_softmax(z), p·log p with 0 where p == 0)."""
    logp_all = torch.log_softmax(z, dim=-1)
    p = logp_all.exp()
    # p·log p is 0 where p == 0 (-inf logits). Zero the log *before* the product so that neither the
    # value nor the gradient meets 0·(-inf).
    return logp_all, p * torch.where(p > 0, logp_all, torch.zeros_like(p))


def naive_token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    temperature: float = 1.0,
    compute_dtype: torch.dtype = torch.float32,
    transform: LogitTransform | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-prob of the label and entropy; masked positions give 0.

    Args:
        logits: [..., V] any float dtype.
        labels: [...] int64.
        transform: scale / soft cap / temperature of the logits (overrides ``temperature``).
    Returns:
        (logps [...], entropy [...]) in ``compute_dtype``.
    """
    z = _transformed(logits, temperature, transform, compute_dtype)
    mask = labels != ignore_index
    safe_labels = torch.where(mask, labels, torch.zeros_like(labels))
    logp_all, plogp = _log_softmax_parts(z)
    entropy = -plogp.sum(-1)
    logps = logp_all.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    zero = torch.zeros((), dtype=compute_dtype, device=logits.device)
    return torch.where(mask, logps, zero), torch.where(mask, entropy, zero)


def naive_sequence_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    temperature: float = 1.0,
    compute_dtype: torch.dtype = torch.float32,
    transform: LogitTransform | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked per-sequence sum of log-probs, masked mean entropy (0 when empty) and token counts.

    Args:
        logits: [B, T, V]; labels: [B, T].
    Returns:
        (logps [B], entropy [B], num_tokens [B] int64).
    """
    logps, entropy = naive_token_logprobs(logits, labels, ignore_index, temperature, compute_dtype, transform)
    num_tokens = (labels != ignore_index).sum(-1)
    denom = num_tokens.clamp(min=1).to(compute_dtype)
    return logps.sum(-1), entropy.sum(-1) / denom, num_tokens


def naive_token_entropy(
    logits: torch.Tensor,
    temperature: float = 1.0,
    compute_dtype: torch.dtype = torch.float32,
    transform: LogitTransform | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy and logsumexp of every row (no labels, nothing masked).

    Args:
        logits: [..., V] any float dtype.
    Returns:
        (entropy [...], lse [...]) in ``compute_dtype``.
    """
    z = _transformed(logits, temperature, transform, compute_dtype)
    lse = torch.logsumexp(z, dim=-1)
    _, plogp = _log_softmax_parts(z)
    return -plogp.sum(-1), lse.clone()  # logsumexp saves its result for its backward: hand out a copy


def naive_token_stats(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    ignore_index: int = -100,
    transform: LogitTransform = IDENTITY,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The per-token statistics besides log-probs and entropies (none of them differentiable):

    - ``log_sum_sq_probs`` = log Σ_v p_v² (the WPO weight's per-token term);
    - ``mean_logits`` = mean over the vocabulary of the transformed logits z;
    - ``is_top1`` = whether the label is ``argmax(z)`` (ties: the first index wins, as ``argmax``).

    Returns:
        (logps, entropy, log_sum_sq_probs, mean_logits, is_top1) [...]; without labels logps and is_top1
        are None. Masked positions (label == ignore_index) give 0 / False everywhere.
    """
    z = _transformed(logits, 1.0, transform, compute_dtype)
    logp_all, plogp = _log_softmax_parts(z)
    entropy = -plogp.sum(-1)
    log_sum_sq = torch.logsumexp(2 * logp_all, dim=-1)
    mean = z.mean(-1)
    if labels is None:
        return None, entropy, log_sum_sq, mean, None
    mask = labels != ignore_index
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    logps = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    top1 = (z.argmax(-1) == safe) & mask
    zero = torch.zeros((), dtype=compute_dtype, device=logits.device)
    return (torch.where(mask, logps, zero), torch.where(mask, entropy, zero), torch.where(mask, log_sum_sq, zero),
            torch.where(mask, mean, zero), top1)
