"""Drop-ins for TRL's log-prob and entropy helpers (TRL 1.16.0, the current release), computed by the fused op.

- ``selective_log_softmax``, ``entropy_from_logits``, ``selective_log_softmax_and_entropy``: TRL's
  ``trl/trainer/utils.py`` functions.
- ``ChunkedLogProbFunction``: TRL's ``trl/kernels/chunked_logprob.py`` class (per-token log-probs and
  statistics straight from the hidden states and the output layer), with the same ``apply`` signature.

Same names, argument orders, defaults and result dtypes as TRL. TRL's helpers return the logits' dtype on its
eager path and fp32 where its fused Triton kernel takes the call (CUDA/XPU, fp32/bf16/fp16 logits of 1 to 3
dims, one label per row); the drop-ins return the dtype TRL would return for the same call, computing in fp32
(float64 for float64 logits) and rounding once at the end. ``ChunkedLogProbFunction`` returns fp32 as TRL's
does. Importing this module does not import TRL; the differences from TRL are stated per function.
"""

from __future__ import annotations

import torch

from ..ops import linear_token_logprobs
from . import _common
from ._common import check_logits, check_row_mask, check_temperature, every_row_entropy, in_dtype, label_logprobs

__all__ = ["selective_log_softmax", "entropy_from_logits", "selective_log_softmax_and_entropy",
           "ChunkedLogProbFunction", "OPTIONAL_OUTPUTS"]

# Devices on which TRL 1.16 hands these helpers to its Triton kernel (``_supports_trl_loss_kernel``).
TRL_KERNEL_DEVICES = ("cuda", "xpu")
_TRL_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)
_ROW_MASK_DTYPES = (torch.bool, torch.int32, torch.int64)


def trl_kernel_takes(logits: torch.Tensor, index: torch.Tensor | None = None,
                     row_mask: torch.Tensor | None = None) -> bool:
    """Whether TRL 1.16 would compute this call with its fused Triton kernel, whose results are fp32 (its
    eager path returns the logits' dtype). TRL's rule: Triton installed, logits on CUDA/XPU in
    fp32/bf16/fp16 with 1 to 3 dims, unit last stride and V > 0; one int32/int64 label per row on the same
    device; a row mask of the labels' shape, bool/int32/int64, on the same device."""
    takes = (_common.TRITON_INSTALLED and logits.device.type in TRL_KERNEL_DEVICES
             and logits.dtype in _TRL_KERNEL_DTYPES and 1 <= logits.dim() <= 3 and logits.stride(-1) == 1
             and logits.shape[-1] > 0)
    if index is not None:
        takes = (takes and tuple(index.shape) == tuple(logits.shape[:-1]) and index.dtype in _INDEX_DTYPES
                 and index.device == logits.device)
    if row_mask is not None:
        takes = (takes and index is not None and tuple(row_mask.shape) == tuple(index.shape)
                 and row_mask.dtype in _ROW_MASK_DTYPES and row_mask.device == logits.device)
    return bool(takes)


def _check_index(logits: torch.Tensor, index: object, where: str) -> None:
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"{where}: expected an integer index tensor, found {type(index).__name__}")
    if index.dim() == logits.dim() and tuple(index.shape[:-1]) != tuple(logits.shape[:-1]):
        raise ValueError(f"{where}: expected an index of shape {tuple(logits.shape[:-1])} or "
                         f"{tuple(logits.shape[:-1])} + (K,), found {tuple(index.shape)}")


def _topk_logprobs(logits: torch.Tensor, index: torch.Tensor, temperature: float, where: str):
    """(logps [..., K], entropy [...]) of K labels per row: lse and entropy from one pass of the op, then K
    gathers of the logits (a [..., K] read)."""
    rows = every_row_entropy(logits, temperature=temperature, where=where)
    picked = torch.gather(logits, -1, index.long()).to(rows.lse.dtype) / temperature
    return picked - rows.lse.unsqueeze(-1), rows.entropy


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, temperature: float = 1.0,
                          row_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``log_softmax(logits / temperature)`` gathered at ``index``, in one pass over the logits.

    Source: TRL 1.16.0, ``trl/trainer/utils.py::selective_log_softmax(logits, index, temperature=1.0,
    row_mask=None)``.

    Args:
        logits: [..., V].
        index: [...] (one label per row) or [..., K] (K labels per row, e.g. top-K).
        temperature: positive divisor of the logits.
        row_mask: optional, shape of ``index``; positions where it is 0 give 0 (and no gradient).

    Returns:
        Log-probs, shape of ``index``, in the dtype TRL returns: fp32 where TRL's fused kernel would take
        the call (:func:`trl_kernel_takes`), else the logits' dtype. Computed in fp32 (float64 for float64
        logits).

    Differences from TRL: a label of -100 gives 0 where TRL's eager path raises an index error; any other
    label outside [0, V) raises a ValueError (on CPU).
    """
    where = "selective_log_softmax"
    check_temperature(temperature, where)
    check_logits(logits, where)
    _check_index(logits, index, where)
    if index.dim() == logits.dim():  # K labels per row: TRL's eager path, the logits' dtype
        check_row_mask(row_mask, index.shape, where)
        out = _topk_logprobs(logits, index, temperature, where)[0]
        if row_mask is not None:
            out = out.masked_fill(row_mask == 0, 0.0)
        return in_dtype(out, logits.dtype)
    out_dtype = torch.float32 if trl_kernel_takes(logits, index, row_mask) else logits.dtype
    out = label_logprobs(logits, index, temperature=temperature, row_mask=row_mask, where=where).logps
    return in_dtype(out, out_dtype)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) at every position, one pass of the fused op.

    Source: TRL 1.16.0, ``trl/trainer/utils.py::entropy_from_logits(logits, chunk_size=128)``.
    ``chunk_size`` is accepted and unused: the op streams each row once and keeps no ``[chunk, V]``
    temporaries.

    Returns:
        Shape ``logits.shape[:-1]``, differentiable, in the dtype TRL returns (fp32 where its fused kernel
        would take the logits, else the logits' dtype); computed in fp32 (float64 for float64 logits).
    """
    del chunk_size
    check_logits(logits, "entropy_from_logits")
    out_dtype = torch.float32 if trl_kernel_takes(logits) else logits.dtype
    return in_dtype(every_row_entropy(logits, where="entropy_from_logits").entropy, out_dtype)


def selective_log_softmax_and_entropy(logits: torch.Tensor, index: torch.Tensor, entropy_requires_grad: bool = True,
                                      temperature: float = 1.0,
                                      row_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected log-probs and per-row entropies of ``softmax(logits / temperature)`` in one pass.

    Source: TRL 1.16.0, ``trl/trainer/utils.py::selective_log_softmax_and_entropy(logits, index,
    entropy_requires_grad=True, temperature=1.0, row_mask=None)``. Both come from the same pass of the
    fused op (TRL's eager path makes two).

    Args:
        logits: [..., V].
        index: [...] one label per row ([..., K] works too, without ``row_mask``, as on TRL's eager path).
        entropy_requires_grad: False returns the entropy detached.
        temperature: positive divisor of the logits.
        row_mask: optional, shape of ``index``; rows where it is 0 give 0 for both (and no gradient).

    Returns:
        (logps, entropy) in the dtype TRL returns (fp32 where its fused kernel would take the call, else the
        logits' dtype); computed in fp32 (float64 for float64 logits).
    """
    where = "selective_log_softmax_and_entropy"
    check_temperature(temperature, where)
    check_logits(logits, where)
    _check_index(logits, index, where)
    if index.dim() == logits.dim():
        if row_mask is not None:
            raise ValueError(f"{where}: row_mask needs one label per row (index of shape "
                             f"{tuple(logits.shape[:-1])}), found index {tuple(index.shape)}")
        logps, entropy = _topk_logprobs(logits, index, temperature, where)
        out_dtype = logits.dtype
    else:
        out = label_logprobs(logits, index, temperature=temperature, row_mask=row_mask, where=where)
        logps, entropy = out.logps, out.entropy
        out_dtype = torch.float32 if trl_kernel_takes(logits, index, row_mask) else logits.dtype
    entropy = in_dtype(entropy, out_dtype)
    return in_dtype(logps, out_dtype), entropy if entropy_requires_grad else entropy.detach()


# --- trl.kernels.chunked_logprob -------------------------------------------------------------------------------
# Per-token outputs besides the log-probs, in TRL's order; each is None unless named in ``outputs``.
OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_STATS = ("log_sum_sq_probs", "mean_logits", "is_top1")
_ALWAYS = ("log_probs",)  # TRL's own callers list it; it is always computed


class ChunkedLogProbFunction:
    """Per-token log-probs of ``hidden @ weight.T + bias`` and, on request, the entropy, ``log Σ_v p_v²``, the
    mean logit and whether the target is the argmax, without materialising the [N, V] logits.

    Source: TRL 1.16.0, ``trl/kernels/chunked_logprob.py::ChunkedLogProbFunction``; call it as TRL's,
    ``ChunkedLogProbFunction.apply(hidden, weight, bias, targets, temperature, chunk_size,
    final_logit_softcapping=None, logit_scale=1.0, outputs=OPTIONAL_OUTPUTS)``. Computed by
    :func:`mallowspo_fast.linear_token_logprobs` (``return_stats=True`` only when a statistic is asked for).
    """

    @staticmethod
    def apply(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
              temperature: float, chunk_size: int, final_logit_softcapping: float | None = None,
              logit_scale: float = 1.0, outputs: tuple[str, ...] = OPTIONAL_OUTPUTS) -> tuple[
                  torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1) of each of the N targets.

        With ``y = hidden @ weight.T + bias`` and ``z = softcap · tanh(logit_scale · y / softcap) /
        temperature`` (``z = logit_scale · y / temperature`` without a soft cap), as TRL.

        Args:
            hidden: [N, H] (any leading dims work), float32/bfloat16/float16/float64.
            weight: [V, H] output-layer weight.
            bias: [V] or None.
            targets: [N] int64/int32 labels in [0, V).
            temperature: positive divisor of the logits.
            chunk_size: TRL's vocabulary tile width; checked (a positive int) and otherwise unused: the op
                bounds its memory by rows instead (one chunk of rows' logits at a time,
                :func:`mallowspo_fast.ops.linear.default_chunk_size`).
            final_logit_softcapping: soft cap of the logits (Gemma-2/3), or None.
            logit_scale: multiplier of the logits applied first.
            outputs: which of :data:`OPTIONAL_OUTPUTS` to compute (``"log_probs"`` may be listed; it is
                always computed); the others come back as None.

        Returns:
            Five [N] tensors or None, as TRL: fp32 (float64 inputs are computed in float64 and rounded to
            fp32 at the end), ``is_top1`` bool (label == argmax of z, the first index winning ties). The
            log-probs and entropy are differentiable in ``hidden``, ``weight`` and ``bias`` (gradients in
            their dtypes); the statistics are not.

        Raises:
            ValueError: an unknown name in ``outputs``, a ``chunk_size`` that is not a positive int, and
                what :func:`mallowspo_fast.linear_token_logprobs` raises (shapes, a temperature or soft cap
                that is not positive, a target outside [0, V) on CPU).

        Differences from TRL: a target of -100 gives 0 for every output (TRL returns ``-logsumexp`` for an
        out-of-range target); names TRL would silently ignore in ``outputs`` raise.
        """
        unknown = [name for name in outputs if name not in OPTIONAL_OUTPUTS and name not in _ALWAYS]
        if unknown:
            raise ValueError(f"ChunkedLogProbFunction: outputs must be among {_ALWAYS + OPTIONAL_OUTPUTS}, "
                             f"found {unknown}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"ChunkedLogProbFunction: expected a positive int chunk_size, found {chunk_size!r}")
        stats = any(name in outputs for name in _STATS)
        tok = linear_token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                    softcap=final_logit_softcapping, logit_scale=logit_scale, return_stats=stats)
        fields = {"entropy": tok.entropy}
        if stats:
            fields.update(log_sum_sq_probs=tok.log_sum_sq_probs, mean_logits=tok.mean_logits, is_top1=tok.is_top1)
        extra = [None if name not in outputs else fields[name] if name == "is_top1"
                 else in_dtype(fields[name], torch.float32) for name in OPTIONAL_OUTPUTS]
        return (in_dtype(tok.logps, torch.float32), *extra)
