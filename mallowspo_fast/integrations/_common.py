"""Shared pieces of the drop-in functions: one call of the fused op per use, and what the peers' dtype
rules depend on.

The op returns fp32 (float64 for float64 logits); a drop-in casts that to the dtype its peer returns, so
the arithmetic is always fp32 or better and only the final result is rounded.
"""

from __future__ import annotations

import importlib.util

import torch

from ..ops import IGNORE_INDEX, token_entropy, token_logprobs

__all__ = ["IGNORE_INDEX", "FLASH_ATTN_INSTALLED", "TRITON_INSTALLED", "check_logits_labels", "label_logprobs",
           "every_row_entropy", "in_dtype"]

# verl and OpenRLHF switch to flash-attn's cross-entropy kernel (fp32 results, -100 labels give 0, optional
# in-place backward) when flash-attn imports; TRL switches to its own Triton kernel (fp32 results) when
# Triton is installed and the logits are on CUDA/XPU. Looked up once, without importing either package.
FLASH_ATTN_INSTALLED = importlib.util.find_spec("flash_attn") is not None
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def check_logits_labels(logits: object, labels: object, where: str) -> None:
    """TypeError/ValueError naming ``where`` when ``logits`` [..., V] and ``labels`` [...] do not fit."""
    check_logits(logits, where)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{where}: expected integer labels [...], found {type(labels).__name__}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"{where}: expected labels of shape {tuple(logits.shape[:-1])} (logits.shape[:-1]), "
                         f"found {tuple(labels.shape)}")


def check_logits(logits: object, where: str) -> None:
    """TypeError naming ``where`` unless ``logits`` is a floating tensor."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"{where}: expected floating logits [..., V], found {type(logits).__name__}"
                        + (f" of dtype {logits.dtype}" if isinstance(logits, torch.Tensor) else ""))


def check_row_mask(row_mask: object, shape: torch.Size, where: str) -> None:
    """ValueError naming ``where`` unless ``row_mask`` is None or a tensor of ``shape``."""
    if row_mask is None:
        return
    if not isinstance(row_mask, torch.Tensor):
        raise TypeError(f"{where}: expected row_mask to be a tensor or None, found {type(row_mask).__name__}")
    if tuple(row_mask.shape) != tuple(shape):
        raise ValueError(f"{where}: expected row_mask of shape {tuple(shape)}, found {tuple(row_mask.shape)}")


def check_temperature(temperature: object, where: str) -> None:
    """ValueError naming ``where`` unless ``temperature`` is a positive number (checked before anything is
    computed or, for OpenRLHF, divided in place)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"{where}: expected a positive temperature, found {temperature!r}")


def label_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                   row_mask: torch.Tensor | None = None, inplace_backward: bool = False, where: str):
    """TokenLogprobs(logps, entropy) of ``labels`` (fp32, float64 for float64 logits; one pass); rows where
    ``row_mask == 0`` give 0 and get no gradient (they become ignored labels, so the op never reads them)."""
    check_logits_labels(logits, labels, where)
    check_row_mask(row_mask, labels.shape, where)
    if row_mask is not None:
        labels = labels.long().masked_fill(row_mask == 0, IGNORE_INDEX)
    return token_logprobs(logits, labels, temperature=temperature, inplace_backward=inplace_backward)


def every_row_entropy(logits: torch.Tensor, *, temperature: float = 1.0, where: str):
    """TokenEntropy(entropy, lse) of every row (fp32, float64 for float64 logits; one pass, no labels)."""
    check_logits(logits, where)
    return token_entropy(logits, temperature=temperature)


def in_dtype(result: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``result`` as ``dtype``: the one rounding of a drop-in, at its end (no copy when it already is)."""
    return result if result.dtype == dtype else result.to(dtype)
