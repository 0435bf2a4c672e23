"""Drop-ins for OpenRLHF's ``openrlhf/models/utils.py`` log-prob, entropy and masked-mean helpers, computed
by the fused op. Same names, argument orders and defaults; outputs of the op are fp32. OpenRLHF is not
imported (nor needed)."""

from __future__ import annotations

import torch

from ._common import every_row_entropy, label_logprobs

__all__ = ["log_probs_from_logits", "compute_entropy", "masked_mean"]


def log_probs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each label under softmax(logits / temperature), one pass over the logits.

    Source: OpenRLHF, ``openrlhf/models/utils.py::log_probs_from_logits(logits, labels, temperature=1.0)``.
    Unlike it, the logits are not divided in place (the caller's tensor is left unchanged).

    Returns:
        fp32 [...] (the shape of ``labels``), differentiable.
    """
    if temperature <= 0:
        raise ValueError(f"log_probs_from_logits: expected a positive temperature, found {temperature!r}")
    return label_logprobs(logits, labels, temperature=temperature, where="log_probs_from_logits").logps


def compute_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) at every position, one pass of the fused op.

    Source: OpenRLHF, ``openrlhf/models/utils.py::compute_entropy(logits)`` (logsumexp(z) − Σ softmax(z)·z).

    Returns:
        fp32, shape ``logits.shape[:-1]``, differentiable.
    """
    return every_row_entropy(logits, where="compute_entropy").entropy


def masked_mean(tensor: torch.Tensor, mask: torch.Tensor | None, dim: int | None = None) -> torch.Tensor:
    """Mean of ``tensor`` over the positions where ``mask`` is set (``tensor.mean(dim)`` without a mask).

    Source: OpenRLHF, ``openrlhf/models/utils.py::masked_mean(tensor, mask, dim=None)``; same formula
    (Σ tensor·mask / Σ mask; an all-zero mask gives NaN, as there).
    """
    if mask is None:
        return tensor.mean(dim=dim)
    return (tensor * mask).sum(dim=dim) / mask.sum(dim=dim)
