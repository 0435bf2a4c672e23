"""Drop-ins for OpenRLHF's log-prob, entropy and masked-mean helpers (OpenRLHF 0.11.2, the current release;
``openrlhf/models/utils.py``), computed by the fused op.

Same names, argument orders, defaults, result dtypes and side effects as OpenRLHF: results come back in the
dtype OpenRLHF returns for the same call (the logits' dtype, except float64 logits when flash-attn is
installed, which OpenRLHF sends to flash-attn's fp32 kernel), computed in fp32 (float64 for float64 logits)
and rounded once at the end. ``log_probs_from_logits`` divides the caller's logits by the temperature in
place, as OpenRLHF does. OpenRLHF is not imported (nor needed).
"""

from __future__ import annotations

import torch

from . import _common
from ._common import check_logits_labels, check_temperature, every_row_entropy, in_dtype, label_logprobs

__all__ = ["log_probs_from_logits", "compute_entropy", "masked_mean"]


def log_probs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each label under softmax(logits / temperature), one pass of the op over the logits.

    Source: OpenRLHF 0.11.2, ``openrlhf/models/utils.py::log_probs_from_logits(logits, labels,
    temperature=1.0)``. As there, a temperature other than 1 first divides ``logits`` in place (the caller
    sees the scaled logits afterwards, and autograd refuses a leaf that requires grad, or a view of one).

    Args:
        logits: [..., V].
        labels: [...] int64/int32 in [0, V).
        temperature: positive divisor of the logits.

    Returns:
        [...] (the shape of ``labels``), differentiable, in OpenRLHF's dtype: the logits' dtype (fp32 for
        float64 logits when flash-attn is installed, as OpenRLHF then uses flash-attn's kernel). Computed
        in fp32 (float64 for float64 logits).

    Differences from OpenRLHF: a temperature <= 0 raises a ValueError before anything is divided; a label
    of -100 gives 0 (OpenRLHF's flash-attn path does the same, its torch path raises an index error).
    """
    where = "log_probs_from_logits"
    check_temperature(temperature, where)
    check_logits_labels(logits, labels, where)
    if temperature != 1.0:
        logits.div_(temperature)  # OpenRLHF's contract: the caller's logits are scaled in place
    out_dtype = torch.float32 if logits.dtype == torch.float64 and _common.FLASH_ATTN_INSTALLED else logits.dtype
    return in_dtype(label_logprobs(logits, labels, where=where).logps, out_dtype)


def compute_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) at every position, one pass of the fused op.

    Source: OpenRLHF 0.11.2, ``openrlhf/models/utils.py::compute_entropy(logits)`` (logsumexp(z) −
    Σ softmax(z)·z).

    Returns:
        Shape ``logits.shape[:-1]``, differentiable, in the logits' dtype (as OpenRLHF); computed in fp32
        (float64 for float64 logits).
    """
    return in_dtype(every_row_entropy(logits, where="compute_entropy").entropy, logits.dtype)


def masked_mean(tensor: torch.Tensor, mask: torch.Tensor | None, dim: int | None = None) -> torch.Tensor:
    """Mean of ``tensor`` over the positions where ``mask`` is set (``tensor.mean(dim)`` without a mask).

    Source: OpenRLHF 0.11.2, ``openrlhf/models/utils.py::masked_mean(tensor, mask, dim=None)``; the same
    definition: Σ tensor·mask / Σ mask over ``dim``. As there, an all-zero mask gives NaN (0/0) and a NaN
    of ``tensor`` outside the mask propagates (NaN·0 is NaN); dtypes follow PyTorch's promotion of
    ``tensor * mask``.
    """
    if mask is None:
        return tensor.mean(dim=dim)
    return (tensor * mask).sum(dim=dim) / mask.sum(dim=dim)
