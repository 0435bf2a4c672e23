"""Drop-ins for verl's ``verl/utils/torch_functional.py`` log-prob, entropy and masked-mean helpers, computed
by the fused op. Same names, argument orders and defaults; outputs of the op are fp32. verl is not imported
(nor needed)."""

from __future__ import annotations

import torch

from ._common import every_row_entropy, label_logprobs

__all__ = ["logprobs_from_logits", "entropy_from_logits", "masked_sum", "masked_mean"]


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, inplace_backward: bool = True) -> torch.Tensor:
    """Log-probability of each label under softmax(logits), one pass over the logits.

    Source: verl, ``verl/utils/torch_functional.py::logprobs_from_logits(logits, labels, inplace_backward=True)``.
    ``inplace_backward=True`` (verl's default, as with its flash-attn kernel) writes the gradient into the
    logits buffer: only valid when nothing else uses those logits after this call in the backward.

    Returns:
        fp32 [...] (the shape of ``labels``), differentiable.
    """
    return label_logprobs(logits, labels, inplace_backward=bool(inplace_backward), where="logprobs_from_logits").logps


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) at every position, one pass of the fused op.

    Source: verl, ``verl/utils/torch_functional.py::entropy_from_logits(logits)``
    (logsumexp(z) − Σ softmax(z)·z).

    Returns:
        fp32, shape ``logits.shape[:-1]``, differentiable.
    """
    return every_row_entropy(logits, where="entropy_from_logits").entropy


def masked_sum(values: torch.Tensor, mask: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """Σ values·mask over ``axis`` (all axes when None). Source: verl, ``verl/utils/torch_functional.py::
    masked_sum(values, mask, axis=None)``."""
    return (values * mask).sum(axis=axis)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """Σ values·mask / Σ mask over ``axis`` (all axes when None); an all-zero mask gives NaN.

    Source: verl, ``verl/utils/torch_functional.py::masked_mean(values, mask, axis=None)`` (the form
    without an epsilon in the denominator).
    """
    return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
