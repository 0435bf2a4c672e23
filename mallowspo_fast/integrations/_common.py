"""Shared pieces of the drop-in functions: one call of the fused op per use."""

from __future__ import annotations

import torch

from ..ops import token_entropy, token_logprobs

IGNORE_INDEX = -100


def check_logits_labels(logits: object, labels: object, where: str) -> None:
    """TypeError/ValueError naming ``where`` when ``logits`` [..., V] and ``labels`` [...] do not fit."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"{where}: expected floating logits [..., V], found {type(logits).__name__}"
                        + (f" of dtype {logits.dtype}" if isinstance(logits, torch.Tensor) else ""))
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{where}: expected integer labels [...], found {type(labels).__name__}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"{where}: expected labels of shape {tuple(logits.shape[:-1])} (logits.shape[:-1]), "
                         f"found {tuple(labels.shape)}")


def label_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                   row_mask: torch.Tensor | None = None, inplace_backward: bool = False, where: str):
    """TokenLogprobs(logps, entropy) of ``labels`` (fp32, one pass); rows where ``row_mask == 0`` give 0
    and get no gradient (they become ignored labels, so the op never reads them)."""
    check_logits_labels(logits, labels, where)
    if row_mask is not None:
        if tuple(row_mask.shape) != tuple(labels.shape):
            raise ValueError(f"{where}: expected row_mask of shape {tuple(labels.shape)}, found "
                             f"{tuple(row_mask.shape)}")
        labels = labels.long().masked_fill(row_mask == 0, IGNORE_INDEX)
    return token_logprobs(logits, labels, temperature=temperature, inplace_backward=inplace_backward)


def every_row_entropy(logits: torch.Tensor, *, temperature: float = 1.0, where: str):
    """TokenEntropy(entropy, lse) of every row (fp32, one pass, no labels)."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"{where}: expected floating logits [..., V], found {type(logits).__name__}"
                        + (f" of dtype {logits.dtype}" if isinstance(logits, torch.Tensor) else ""))
    return token_entropy(logits, temperature=temperature)
