"""Functional API of the fused log-prob / entropy op and backend dispatch."""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

from .functions import SequenceLogprobsFunction, TokenLogprobsFunction
from .naive import naive_sequence_logprobs, naive_token_entropy, naive_token_logprobs, naive_token_stats
from .torch_rows import compute_dtype
from .transform import LogitTransform

BACKENDS = ("triton", "torch", "reference")
BACKEND_ENV = "MALLOWSPO_FAST_BACKEND"
# Label value of positions that do not count (prompt, padding): the convention of PyTorch's cross-entropy,
# Hugging Face and TRL. The one definition of the library; every layer imports it from here.
IGNORE_INDEX = -100


class TokenLogprobs(NamedTuple):
    """Per-token outputs of :func:`token_logprobs`, shape of ``labels``; masked positions hold 0. fp32 (float64
    for float64 logits).

    Attributes:
        logps: [...] log-prob of each label, ``z[label] - logsumexp(z)``; differentiable.
        entropy: [...] entropy of each position's distribution, ``logsumexp(z) - sum(softmax(z) * z)``;
            differentiable.
    """

    logps: torch.Tensor
    entropy: torch.Tensor


class TokenEntropy(NamedTuple):
    """Per-row outputs without labels (:func:`token_entropy`, ``token_logprobs(logits, None)``), fp32 (float64
    for float64 logits), shape of ``logits.shape[:-1]``; nothing is masked.

    Attributes:
        entropy: [...] entropy of softmax(logits / temperature) at every position; differentiable.
        lse: [...] logsumexp(logits / temperature) at every position (e.g. for a z-loss); differentiable.
    """

    entropy: torch.Tensor
    lse: torch.Tensor


class SequenceLogprobs(NamedTuple):
    """Per-sequence outputs of :func:`sequence_logprobs`.

    Attributes:
        logps: [B] fp32 (float64 for float64 logits), sum of the unmasked tokens' log-probs; differentiable.
        entropy: [B] fp32 (float64 for float64 logits), mean entropy over the unmasked tokens (0 when the
            sequence has none); differentiable.
        num_tokens: [B] int64, the number of unmasked tokens; not differentiable.
    """

    logps: torch.Tensor
    entropy: torch.Tensor
    num_tokens: torch.Tensor


class TokenStats(NamedTuple):
    """Per-token outputs with ``return_stats=True``: one pass computes them all. Shape of ``labels`` (of
    ``logits.shape[:-1]`` without labels), fp32 (float64 for float64 logits); masked positions hold 0 (False).

    Attributes:
        logps: [...] log-prob of each label; differentiable. None without labels.
        entropy: [...] entropy of each position's distribution; differentiable.
        log_sum_sq_probs: [...] log Σ_v p_v², the per-token term of WPO's weights; not differentiable.
        mean_logits: [...] mean over the vocabulary of the (transformed) logits; not differentiable.
        is_top1: [...] bool, whether the label is the argmax of the logits (the first index wins on ties,
            as ``argmax``); None without labels.
        lse: [...] logsumexp of every position, differentiable; only without labels (None otherwise).
    """

    logps: torch.Tensor | None
    entropy: torch.Tensor
    log_sum_sq_probs: torch.Tensor
    mean_logits: torch.Tensor
    is_top1: torch.Tensor | None
    lse: torch.Tensor | None = None


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """``backend`` argument > ``MALLOWSPO_FAST_BACKEND`` > triton on CUDA, torch elsewhere. ``"auto"`` (the
    trainer's config value) means the same as None."""
    if backend == "auto":
        backend = None
    if backend is None:
        backend = os.environ.get(BACKEND_ENV) or None
    if backend is None:
        return "triton" if device.type == "cuda" else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, 'auto' or None, got {backend!r}")
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got device {device}); on CPU set TRITON_INTERPRET=1 "
            "before importing triton, or use backend='torch'"
        )
    return backend


def _validate(logits: torch.Tensor, labels: torch.Tensor | None, temperature: float, where: str,
              softcap: float | None = None, logit_scale: float = 1.0) -> LogitTransform:
    """Check the arguments shared by the logits-level ops; returns their logit transform."""
    if labels is None and not isinstance(logits, torch.Tensor):
        raise TypeError(f"{where}: logits must be a tensor, got {type(logits).__name__}")
    if not isinstance(logits, torch.Tensor) or (labels is not None and not isinstance(labels, torch.Tensor)):
        raise TypeError(f"{where}: logits and labels must be tensors, got {type(logits).__name__} and "
                        f"{type(labels).__name__}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(f"{where}: logits must be float32/bfloat16/float16/float64, got {logits.dtype}")
    if labels is None:
        if logits.dim() < 1 or logits.shape[-1] == 0:
            raise ValueError(f"{where}: expected logits [..., V] with V >= 1, got shape {tuple(logits.shape)}")
        return LogitTransform.checked(temperature, softcap, logit_scale, where)
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{where}: labels must be int64 (or int32), got {labels.dtype}")
    if logits.dim() < 1 or tuple(logits.shape[:-1]) != tuple(labels.shape):
        raise ValueError(
            f"{where}: expected logits [..., V] and labels [...] with matching leading dims, got "
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )
    if logits.device != labels.device:
        raise ValueError(f"{where}: logits on {logits.device} but labels on {labels.device}")
    transform = LogitTransform.checked(temperature, softcap, logit_scale, where)
    if logits.shape[-1] == 0:
        raise ValueError(f"{where}: logits {tuple(logits.shape)} have an empty vocabulary dimension (V = 0)")
    return transform


def check_inplace(logits: torch.Tensor, inplace_backward: bool, where: str) -> None:
    """In-place backward writes each gradient element into its logit's memory: elements sharing memory
    (an expanded view, stride 0) would receive each other's gradients."""
    if inplace_backward and logits.numel() > 1 and any(s == 0 and n > 1 for s, n in zip(logits.stride(), logits.shape)):
        raise ValueError(f"{where}: inplace_backward=True needs logits whose elements do not share memory; "
                         f"found strides {logits.stride()} for shape {tuple(logits.shape)} (an expanded view)")


def check_labels_in_range(labels: torch.Tensor, vocab_size: int, ignore_index: int, where: str) -> None:
    """Raise on labels outside [0, V) that are not ignore_index. Only on CPU: on CUDA this would be a
    host sync, so the kernels instead give NaN for such tokens and never read out of bounds. Inside a
    ``torch.compile`` graph the check is an asynchronous assertion (a RuntimeError without the position,
    and no graph break)."""
    if labels.device.type != "cpu" or labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), f"{where}: labels must lie in [0, {vocab_size}) or equal ignore_index")
        return
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0].tolist())
        raise ValueError(
            f"{where}: labels must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}; "
            f"found {int(labels[idx])} at position {idx} ({int(bad.sum())} bad labels in all)"
        )


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    ignore_index: int = IGNORE_INDEX,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    backend: str | None = None,
    inplace_backward: bool = False,
    return_stats: bool = False,
) -> TokenLogprobs | TokenEntropy | TokenStats:
    """Token log-probs of the labels and token entropies, in one pass over the logits.

    With z = logit_scale · logits / temperature (with a soft cap: ``z = softcap · tanh(logit_scale ·
    logits / softcap) / temperature``): ``logps = z[label] - logsumexp(z)`` and
    ``entropy = logsumexp(z) - sum(softmax(z) * z)`` (natural log), in fp32 whatever the input dtype (float64
    logits are computed and returned in float64).

    Args:
        logits: [..., V] float32/bfloat16/float16/float64; any row stride (e.g. the shifted view
            ``logits[:, :-1]`` works without a copy).
        labels: [...] int64 (or int32), already aligned with the logits (the caller shifts). Positions
            equal to ``ignore_index`` are masked: they give 0, get zero gradient and are not read.
            ``None``: no labels; the same single pass returns the entropy and the logsumexp of every
            position (what PPO/GRPO entropy bonuses and z-losses use), see :func:`token_entropy`.
        ignore_index: label value of masked positions.
        temperature: positive divisor of the logits.
        softcap: optional soft cap of the logits (Gemma-2/3's ``final_logit_softcapping``).
        logit_scale: multiplier of the logits applied first (Cohere's ``logit_scale``, Granite's
            ``1 / logits_scaling``, ...).
        backend: "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "torch" (pure PyTorch, any device),
            "reference" (naive eager) or None / "auto" (triton on CUDA, torch elsewhere; the environment
            variable MALLOWSPO_FAST_BACKEND overrides).
        inplace_backward: opt-in; the backward writes the gradient into the logits buffer (only safe
            when nothing else needs the logits afterwards).
        return_stats: also return log Σp², the mean logit and whether the label is the top-1 token, from
            the same pass, as :class:`TokenStats`.

    Returns:
        TokenLogprobs(logps [...], entropy [...]), differentiable in both; with ``labels=None``
        TokenEntropy(entropy [...], lse [...]), differentiable in both; with ``return_stats``
        :class:`TokenStats`. Each output is its own tensor (in-place edits are fine).

    Raises:
        TypeError: logits not a floating tensor of a supported dtype, labels not int64/int32.
        ValueError: shapes that do not match, logits and labels on different devices, a temperature or
            soft cap that is not a positive number, a zero or non-finite logit scale, an unknown backend,
            or (on CPU, where the check is free) a label outside [0, V) that is not ``ignore_index``; the
            message names the first bad position. On CUDA such a label gives NaN for its token instead (a
            check would be a host sync); inside ``torch.compile`` on CPU it raises a RuntimeError.

    Examples:
        >>> out = token_logprobs(logits[:, :-1], input_ids[:, 1:].masked_fill(~mask, -100))
        >>> out.logps.sum(-1)
        >>> token_logprobs(logits, None).entropy  # every position, no labels
    """
    if labels is None:
        return token_entropy(logits, temperature=temperature, softcap=softcap, logit_scale=logit_scale,
                             backend=backend, inplace_backward=inplace_backward, return_stats=return_stats)
    transform = _validate(logits, labels, temperature, "token_logprobs", softcap, logit_scale)
    check_inplace(logits, inplace_backward, "token_logprobs")
    labels = labels.long()
    be = resolve_backend(backend, logits.device)
    check_labels_in_range(labels, logits.shape[-1], ignore_index, "token_logprobs")
    if be == "reference":
        cdt = compute_dtype(logits.dtype)
        if return_stats:
            with torch.no_grad():
                _, _, sq, mean, top1 = naive_token_stats(logits, labels, ignore_index, transform, cdt)
        logps, entropy = naive_token_logprobs(logits, labels, ignore_index, compute_dtype=cdt, transform=transform)
        return TokenStats(logps, entropy, sq, mean, top1) if return_stats else TokenLogprobs(logps, entropy)
    lead = labels.shape
    logits3d, labels2d = _as_3d(logits, labels)
    outs = TokenLogprobsFunction.apply(logits3d, labels2d, int(ignore_index), transform, bool(inplace_backward),
                                       bool(return_stats), be)
    outs = [t.view(lead) for t in outs]
    return TokenStats(outs[0], outs[1], outs[2], outs[3], outs[4]) if return_stats else TokenLogprobs(*outs)


def token_entropy(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    backend: str | None = None,
    inplace_backward: bool = False,
    return_stats: bool = False,
) -> TokenEntropy | TokenStats:
    """Entropy and logsumexp of every position, in one pass over the logits (no labels, no mask).

    With z the transformed logits (as in :func:`token_logprobs`): ``entropy = logsumexp(z) - sum(softmax(z)
    * z)`` and ``lse = logsumexp(z)`` (natural log), fp32 whatever the input dtype (float64 logits: float64).
    The same kernels as :func:`token_logprobs` with the label gather compiled away: the forward reads each
    logit once and the backward reads each once and writes each gradient element once,
    ``dL/dz_j = p_j·(dL/dlse − dL/dH·(log p_j + H))``. Equivalent to ``token_logprobs(logits, None)``.

    Args:
        logits: [..., V] float32/bfloat16/float16/float64; any row stride.
        temperature: positive divisor of the logits.
        softcap: optional soft cap of the logits, as in :func:`token_logprobs`.
        logit_scale: multiplier of the logits applied first, as in :func:`token_logprobs`.
        backend: "triton", "torch", "reference" or None, as in :func:`token_logprobs`.
        inplace_backward: opt-in; the backward writes the gradient into the logits buffer.
        return_stats: also return log Σp² and the mean logit of every position (:class:`TokenStats` with
            ``logps`` and ``is_top1`` None).

    Returns:
        TokenEntropy(entropy [...], lse [...]), differentiable in both (TokenStats with ``return_stats``). A
        row whose logits are all -inf has no distribution and gives NaN.

    Raises:
        TypeError: logits not a floating tensor of a supported dtype.
        ValueError: a 0-dim tensor, a temperature or soft cap that is not a positive number, a zero logit
            scale, an unknown backend.

    Examples:
        >>> ent = token_entropy(logits).entropy              # [B, T]
        >>> bonus = (ent * mask).sum() / mask.sum()
    """
    transform = _validate(logits, None, temperature, "token_entropy", softcap, logit_scale)
    check_inplace(logits, inplace_backward, "token_entropy")
    be = resolve_backend(backend, logits.device)
    if be == "reference":
        cdt = compute_dtype(logits.dtype)
        entropy, lse = naive_token_entropy(logits, compute_dtype=cdt, transform=transform)
        if not return_stats:
            return TokenEntropy(entropy, lse)
        with torch.no_grad():
            _, _, sq, mean, _ = naive_token_stats(logits, None, transform=transform, compute_dtype=cdt)
        return TokenStats(None, entropy, sq, mean, None, lse)
    lead = logits.shape[:-1]
    logits3d, _ = _as_3d(logits, None)
    outs = TokenLogprobsFunction.apply(logits3d, None, 0, transform, bool(inplace_backward), bool(return_stats), be)
    outs = [t.view(lead) for t in outs]
    return TokenStats(None, outs[0], outs[2], outs[3], None, outs[1]) if return_stats else TokenEntropy(*outs)


def sequence_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    backend: str | None = None,
    inplace_backward: bool = False,
) -> SequenceLogprobs:
    """Per-sequence masked sums of token log-probs and masked mean entropies.

    Args:
        logits: [B, T, V] float32/bfloat16/float16/float64; any batch/time strides.
        labels: [B, T] int64 (or int32), aligned with the logits; ``ignore_index`` marks prompt and
            padding. Required: ``None`` raises (use :func:`token_entropy` for every position).
        ignore_index: label value of masked positions.
        temperature: positive, finite divisor of the logits.
        softcap: optional soft cap of the logits, as in :func:`token_logprobs`.
        logit_scale: multiplier of the logits applied first, as in :func:`token_logprobs`.
        backend: "triton", "torch", "reference" or None, as in :func:`token_logprobs`.
        inplace_backward: opt-in; the backward writes the gradient into the logits buffer.

    Returns:
        SequenceLogprobs(logps [B] = sum over unmasked tokens, entropy [B] = mean over unmasked
        tokens (0 when there are none), num_tokens [B] int64). logps and entropy are fp32 (float64 for
        float64 logits) and differentiable.

    Raises:
        TypeError: as :func:`token_logprobs` (dtypes of logits and labels).
        ValueError: labels None, logits not 3-D, and the checks of :func:`token_logprobs` (shapes,
            devices, temperature, soft cap, scale, backend, in-place on an expanded view, out-of-range
            labels on CPU).

    Examples:
        >>> seq = sequence_logprobs(out.logits[:, :-1], labels[:, 1:])
        >>> chosen, rejected = seq.logps.chunk(2)
    """
    if labels is None:
        raise ValueError("sequence_logprobs: labels are required (they define each sequence's tokens); "
                         "for the entropy of every position use token_logprobs(logits, None) or token_entropy")
    transform = _validate(logits, labels, temperature, "sequence_logprobs", softcap, logit_scale)
    check_inplace(logits, inplace_backward, "sequence_logprobs")
    if logits.dim() != 3:
        raise ValueError(f"sequence_logprobs: expected logits [B, T, V], got shape {tuple(logits.shape)}")
    labels = labels.long()
    be = resolve_backend(backend, logits.device)
    check_labels_in_range(labels, logits.shape[-1], ignore_index, "sequence_logprobs")
    if be == "reference":
        return SequenceLogprobs(*naive_sequence_logprobs(logits, labels, ignore_index,
                                                         compute_dtype=compute_dtype(logits.dtype),
                                                         transform=transform))
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return SequenceLogprobs(*SequenceLogprobsFunction.apply(logits, labels, int(ignore_index), transform,
                                                            bool(inplace_backward), be))


def _as_3d(logits: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Canonical [B, T, V] view of logits [..., V] without a copy: the backends take the batch and
    time strides as they are, so the shifted view ``logits[:, :-1]`` costs nothing. A last-dim stride
    != 1 costs one contiguous copy (the kernels stream along V). ``labels`` (or None) follow as [B, T]."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if logits.dim() == 1:
        out = logits.view(1, 1, -1)
    elif logits.dim() == 2:
        out = logits.unsqueeze(0)
    elif logits.dim() == 3:
        out = logits
    else:  # [..., T, V] with more leading dims: merge them (a copy only if they are not mergeable).
        out = logits.reshape(math.prod(logits.shape[:-2]), *logits.shape[-2:])  # -1 is ambiguous with a 0 dim
    return out, None if labels is None else labels.reshape(out.shape[:2])
