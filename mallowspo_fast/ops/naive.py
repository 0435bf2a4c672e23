"""Naive eager reference for the log-prob / entropy op.

Materialises the full [N, V] log-softmax like the textbook code does. Used by the tests (in float64)
and by the benchmarks as the "reference" provider; never used on a hot path.
"""

from __future__ import annotations

import torch


def naive_token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    temperature: float = 1.0,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-prob of the label and entropy; masked positions give 0.

    Args:
        logits: [..., V] any float dtype.
        labels: [...] int64.
    Returns:
        (logps [...], entropy [...]) in ``compute_dtype``.
    """
    z = logits.to(compute_dtype) / temperature
    mask = labels != ignore_index
    safe_labels = torch.where(mask, labels, torch.zeros_like(labels))
    logp_all = torch.log_softmax(z, dim=-1)
    p = logp_all.exp()
    # p·log p is 0 where p == 0 (-inf logits). Zero the log *before* the product so that neither the
    # value nor the gradient meets 0·(-inf).
    plogp = p * torch.where(p > 0, logp_all, torch.zeros_like(p))
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked per-sequence sum of log-probs, masked mean entropy (0 when empty) and token counts.

    Args:
        logits: [B, T, V]; labels: [B, T].
    Returns:
        (logps [B], entropy [B], num_tokens [B] int64).
    """
    logps, entropy = naive_token_logprobs(logits, labels, ignore_index, temperature, compute_dtype)
    num_tokens = (labels != ignore_index).sum(-1)
    denom = num_tokens.clamp(min=1).to(compute_dtype)
    return logps.sum(-1), entropy.sum(-1) / denom, num_tokens


def naive_token_entropy(
    logits: torch.Tensor,
    temperature: float = 1.0,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy and logsumexp of every row (no labels, nothing masked).

    Args:
        logits: [..., V] any float dtype.
    Returns:
        (entropy [...], lse [...]) in ``compute_dtype``.
    """
    z = logits.to(compute_dtype) / temperature
    lse = torch.logsumexp(z, dim=-1)
    logp_all = z - lse.unsqueeze(-1)
    p = logp_all.exp()
    plogp = p * torch.where(p > 0, logp_all, torch.zeros_like(p))
    return -plogp.sum(-1), lse
