"""Drop-ins for verl's log-prob, entropy and masked-reduction helpers (verl 0.9.1, the current release;
``verl/utils/torch_functional.py``), computed by the fused op.

Same names, argument orders, defaults and result dtypes as verl. ``logprobs_from_logits`` follows the path
verl would take: with flash-attn installed (and ``VERL_DISABLE_FLASH_ATTN_CE`` not ``1``) verl calls
flash-attn's cross-entropy kernel, which returns fp32 and honours ``inplace_backward``; otherwise it
computes in the logits' dtype and never writes the logits. The drop-in returns that dtype and writes the
gradient into the logits only where verl would, computing in fp32 (float64 for float64 logits) and
rounding once at the end. ``masked_sum`` / ``masked_mean`` are verl's current definitions:
NaN outside the mask is ignored and an empty mask gives 0. verl is not imported (nor needed).
"""

from __future__ import annotations

import os

import torch

from . import _common
from ._common import every_row_entropy, in_dtype, label_logprobs

__all__ = ["logprobs_from_logits", "entropy_from_logits", "masked_sum", "masked_mean"]

# verl's switch back to its torch path (bitwise-reproducible log-probs) when flash-attn is installed.
DISABLE_FLASH_CE_ENV = "VERL_DISABLE_FLASH_ATTN_CE"
# verl's guard against an empty mask in masked_mean (the denominator is Σ mask + this).
MASKED_MEAN_EPS = 1e-8


def uses_flash_attn_path() -> bool:
    """Whether verl 0.9.1's ``logprobs_from_logits`` would call flash-attn's kernel: flash-attn installed and
    ``VERL_DISABLE_FLASH_ATTN_CE`` not set to ``1`` (read at each call, as verl does)."""
    return _common.FLASH_ATTN_INSTALLED and os.environ.get(DISABLE_FLASH_CE_ENV, "0") != "1"


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, inplace_backward: bool = True) -> torch.Tensor:
    """Log-probability of each label under softmax(logits), one pass over the logits.

    Source: verl 0.9.1, ``verl/utils/torch_functional.py::logprobs_from_logits(logits, labels,
    inplace_backward=True)``.

    Args:
        logits: [..., V].
        labels: [...] int64/int32 in [0, V) (-100 gives 0, as flash-attn's kernel).
        inplace_backward: on verl's flash-attn path (:func:`uses_flash_attn_path`), True (verl's default)
            writes the gradient into the logits buffer: pass logits nothing else reads in the backward, as
            verl's callers do (they pass False when they also take the entropy of the same logits). On its
            torch path verl ignores it, and so does the drop-in.

    Returns:
        [...] (the shape of ``labels``), differentiable: fp32 on the flash-attn path, else the logits' dtype
        (verl's dtypes). Computed in fp32 (float64 for float64 logits).

    Differences from verl: on its torch path verl raises an index error for a label of -100, the drop-in
    gives 0; verl's Ascend NPU path is not mirrored.
    """
    flash = uses_flash_attn_path()
    out = label_logprobs(logits, labels, inplace_backward=flash and bool(inplace_backward),
                         where="logprobs_from_logits").logps
    return in_dtype(out, torch.float32 if flash else logits.dtype)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) at every position, one pass of the fused op.

    Source: verl 0.9.1, ``verl/utils/torch_functional.py::entropy_from_logits(logits)``
    (logsumexp(z) − Σ softmax(z)·z).

    Returns:
        Shape ``logits.shape[:-1]``, differentiable, in the logits' dtype (as verl); computed in fp32
        (float64 for float64 logits).
    """
    return in_dtype(every_row_entropy(logits, where="entropy_from_logits").entropy, logits.dtype)


def masked_sum(values: torch.Tensor, mask: torch.Tensor, axis: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """Σ values·mask over ``axis`` (all axes when None), values outside the mask counting as 0 even when they
    are NaN or infinite.

    Source: verl 0.9.1, ``verl/utils/torch_functional.py::masked_sum(values, mask, axis=None)``: values
    where ``mask`` is zero are replaced by 0 before the weighted sum. Dtypes follow PyTorch's promotion, as
    there.
    """
    kept = values.where(mask.bool(), 0.0)
    return (kept * mask).sum(axis=axis)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, axis: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """Mean of ``values`` over the positions where ``mask`` is set, along ``axis`` (all axes when None).

    Source: verl 0.9.1, ``verl/utils/torch_functional.py::masked_mean(values, mask, axis=None)``:
    :func:`masked_sum` / (Σ mask + 1e-8). NaN outside the mask is ignored, and an empty mask gives 0.
    """
    return masked_sum(values, mask, axis) / (mask.sum(axis=axis) + MASKED_MEAN_EPS)
