"""Functional API of the fused log-prob / entropy op and backend dispatch."""

from __future__ import annotations

import math
import os
from math import inf
from typing import NamedTuple

import torch

from .naive import naive_sequence_logprobs, naive_token_entropy, naive_token_logprobs

BACKENDS = ("triton", "torch", "reference")
BACKEND_ENV = "MALLOWSPO_FAST_BACKEND"
# Label value of positions that do not count (prompt, padding): the convention of PyTorch's cross-entropy,
# Hugging Face and TRL. The one definition of the library; every layer imports it from here.
IGNORE_INDEX = -100


class TokenLogprobs(NamedTuple):
    """Per-token outputs of :func:`token_logprobs`, fp32, shape of ``labels``; masked positions hold 0.

    Attributes:
        logps: [...] log-prob of each label, ``z[label] - logsumexp(z)``; differentiable.
        entropy: [...] entropy of each position's distribution, ``logsumexp(z) - sum(softmax(z) * z)``;
            differentiable.
    """

    logps: torch.Tensor
    entropy: torch.Tensor


class TokenEntropy(NamedTuple):
    """Per-row outputs without labels (:func:`token_entropy`, ``token_logprobs(logits, None)``), fp32,
    shape of ``logits.shape[:-1]``; nothing is masked.

    Attributes:
        entropy: [...] entropy of softmax(logits / temperature) at every position; differentiable.
        lse: [...] logsumexp(logits / temperature) at every position (e.g. for a z-loss); differentiable.
    """

    entropy: torch.Tensor
    lse: torch.Tensor


class SequenceLogprobs(NamedTuple):
    """Per-sequence outputs of :func:`sequence_logprobs`.

    Attributes:
        logps: [B] fp32, sum of the unmasked tokens' log-probs; differentiable.
        entropy: [B] fp32, mean entropy over the unmasked tokens (0 when the sequence has none);
            differentiable.
        num_tokens: [B] int64, the number of unmasked tokens; not differentiable.
    """

    logps: torch.Tensor
    entropy: torch.Tensor
    num_tokens: torch.Tensor


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


def _validate(logits: torch.Tensor, labels: torch.Tensor | None, temperature: float, where: str) -> None:
    if labels is None:
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"{where}: logits must be a tensor, got {type(logits)}")
        if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise TypeError(f"{where}: logits must be float32/bfloat16/float16/float64, got {logits.dtype}")
        if logits.dim() < 1 or logits.shape[-1] == 0:
            raise ValueError(f"{where}: expected logits [..., V] with V >= 1, got shape {tuple(logits.shape)}")
        if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and 0 < temperature < inf):
            raise ValueError(f"{where}: temperature must be a positive finite number, got {temperature!r}")
        return
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(f"{where}: logits and labels must be tensors, got {type(logits)} and {type(labels)}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(f"{where}: logits must be float32/bfloat16/float16/float64, got {logits.dtype}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{where}: labels must be int64 (or int32), got {labels.dtype}")
    if logits.dim() < 1 or tuple(logits.shape[:-1]) != tuple(labels.shape):
        raise ValueError(
            f"{where}: expected logits [..., V] and labels [...] with matching leading dims, got "
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )
    if logits.device != labels.device:
        raise ValueError(f"{where}: logits on {logits.device} but labels on {labels.device}")
    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and 0 < temperature < inf):
        raise ValueError(f"{where}: temperature must be a positive finite number, got {temperature!r}")
    if logits.shape[-1] == 0:
        raise ValueError(f"{where}: logits {tuple(logits.shape)} have an empty vocabulary dimension (V = 0)")


def check_inplace(logits: torch.Tensor, inplace_backward: bool, where: str) -> None:
    """In-place backward writes each gradient element into its logit's memory: elements sharing memory
    (an expanded view, stride 0) would receive each other's gradients."""
    if inplace_backward and logits.numel() > 1 and any(s == 0 and n > 1 for s, n in zip(logits.stride(), logits.shape)):
        raise ValueError(f"{where}: inplace_backward=True needs logits whose elements do not share memory; "
                         f"found strides {logits.stride()} for shape {tuple(logits.shape)} (an expanded view)")


def check_labels_in_range(labels: torch.Tensor, vocab_size: int, ignore_index: int, where: str) -> None:
    """Raise on labels outside [0, V) that are not ignore_index. Only on CPU: on CUDA this would be a
    host sync, so the kernels instead give NaN for such tokens and never read out of bounds."""
    if labels.device.type != "cpu" or labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
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
    backend: str | None = None,
    inplace_backward: bool = False,
) -> TokenLogprobs | TokenEntropy:
    """Token log-probs of the labels and token entropies, in one pass over the logits.

    With z = logits / temperature: ``logps = z[label] - logsumexp(z)`` and
    ``entropy = logsumexp(z) - sum(softmax(z) * z)`` (natural log), both fp32 whatever the input dtype.

    Args:
        logits: [..., V] float32/bfloat16/float16 (float64 is accepted and computed in fp32 on the
            fused paths); any row stride (e.g. the shifted view ``logits[:, :-1]`` works without a copy).
        labels: [...] int64 (or int32), already aligned with the logits (the caller shifts). Positions
            equal to ``ignore_index`` are masked: they give 0, get zero gradient and are not read.
            ``None``: no labels; the same single pass returns the entropy and the logsumexp of every
            position (what PPO/GRPO entropy bonuses and z-losses use), see :func:`token_entropy`.
        ignore_index: label value of masked positions.
        temperature: positive divisor of the logits.
        backend: "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "torch" (chunked pure PyTorch, any
            device), "reference" (naive eager) or None (triton on CUDA, torch elsewhere; the
            environment variable MALLOWSPO_FAST_BACKEND overrides).
        inplace_backward: opt-in; the backward writes the gradient into the logits buffer (only safe
            when nothing else needs the logits afterwards).

    Returns:
        TokenLogprobs(logps [...], entropy [...]), fp32, differentiable in both; with ``labels=None``
        TokenEntropy(entropy [...], lse [...]), fp32, differentiable in both.

    Raises:
        TypeError: logits not a floating tensor of a supported dtype, labels not int64/int32.
        ValueError: shapes that do not match, logits and labels on different devices, a temperature
            that is not a positive number, an unknown backend, or (on CPU, where the check is free) a
            label outside [0, V) that is not ``ignore_index``; the message names the first bad position.
            On CUDA such a label gives NaN for its token instead (a check would be a host sync).

    Examples:
        >>> out = token_logprobs(logits[:, :-1], input_ids[:, 1:].masked_fill(~mask, -100))
        >>> out.logps.sum(-1)
        >>> token_logprobs(logits, None).entropy  # every position, no labels
    """
    if labels is None:
        return token_entropy(logits, temperature=temperature, backend=backend, inplace_backward=inplace_backward)
    _validate(logits, labels, temperature, "token_logprobs")
    check_inplace(logits, inplace_backward, "token_logprobs")
    labels = labels.long()
    be = resolve_backend(backend, logits.device)
    check_labels_in_range(labels, logits.shape[-1], ignore_index, "token_logprobs")
    if be == "reference":
        logps, entropy = naive_token_logprobs(logits, labels, ignore_index, temperature)
        return TokenLogprobs(logps, entropy)
    lead = labels.shape
    logits3d, labels2d = _as_3d(logits, labels)
    if be == "torch":
        from .torch_path import torch_token_logprobs as impl
    else:
        from .triton_path import triton_token_logprobs as impl
    logps, entropy = impl(logits3d, labels2d, ignore_index, temperature, inplace_backward)
    return TokenLogprobs(logps.reshape(lead), entropy.reshape(lead))


def token_entropy(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    backend: str | None = None,
    inplace_backward: bool = False,
) -> TokenEntropy:
    """Entropy and logsumexp of every position, in one pass over the logits (no labels, no mask).

    With z = logits / temperature: ``entropy = logsumexp(z) - sum(softmax(z) * z)`` and
    ``lse = logsumexp(z)`` (natural log), fp32 whatever the input dtype. The same kernels as
    :func:`token_logprobs` with the label gather compiled away: the forward reads each logit once and
    the backward reads each once and writes each gradient element once,
    ``dL/dz_j = p_j·(dL/dlse − dL/dH·(log p_j + H)) / T``. Equivalent to ``token_logprobs(logits, None)``.

    Args:
        logits: [..., V] float32/bfloat16/float16 (float64 accepted); any row stride.
        temperature: positive divisor of the logits.
        backend: "triton", "torch", "reference" or None, as in :func:`token_logprobs`.
        inplace_backward: opt-in; the backward writes the gradient into the logits buffer.

    Returns:
        TokenEntropy(entropy [...], lse [...]), fp32, differentiable in both. A row whose logits are all
        -inf has no distribution and gives NaN.

    Raises:
        TypeError: logits not a floating tensor of a supported dtype.
        ValueError: a 0-dim tensor, a temperature that is not a positive number, an unknown backend.

    Examples:
        >>> ent = token_entropy(logits).entropy              # [B, T]
        >>> bonus = (ent * mask).sum() / mask.sum()
    """
    _validate(logits, None, temperature, "token_entropy")
    check_inplace(logits, inplace_backward, "token_entropy")
    be = resolve_backend(backend, logits.device)
    if be == "reference":
        return TokenEntropy(*naive_token_entropy(logits, temperature))
    lead = logits.shape[:-1]
    logits3d, _ = _as_3d(logits, None)
    if be == "torch":
        from .torch_entropy import torch_token_entropy as impl
    else:
        from .triton_path import triton_token_entropy as impl
    entropy, lse = impl(logits3d, temperature, inplace_backward)
    return TokenEntropy(entropy.reshape(lead), lse.reshape(lead))


def sequence_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    temperature: float = 1.0,
    backend: str | None = None,
    inplace_backward: bool = False,
) -> SequenceLogprobs:
    """Per-sequence masked sums of token log-probs and masked mean entropies.

    Args:
        logits: [B, T, V] float32/bfloat16/float16 (float64 accepted); any batch/time strides.
        labels: [B, T] int64 (or int32), aligned with the logits; ``ignore_index`` marks prompt and
            padding. Required: ``None`` raises (use :func:`token_entropy` for every position).
        ignore_index: label value of masked positions.
        temperature: positive, finite divisor of the logits.
        backend: "triton", "torch", "reference" or None, as in :func:`token_logprobs`.
        inplace_backward: opt-in; the backward writes the gradient into the logits buffer.

    Returns:
        SequenceLogprobs(logps [B] = sum over unmasked tokens, entropy [B] = mean over unmasked
        tokens (0 when there are none), num_tokens [B] int64). logps and entropy are fp32 and
        differentiable.

    Raises:
        TypeError: as :func:`token_logprobs` (dtypes of logits and labels).
        ValueError: labels None, logits not 3-D, and the checks of :func:`token_logprobs` (shapes,
            devices, temperature, backend, in-place on an expanded view, out-of-range labels on CPU).

    Examples:
        >>> seq = sequence_logprobs(out.logits[:, :-1], labels[:, 1:])
        >>> chosen, rejected = seq.logps.chunk(2)
    """
    if labels is None:
        raise ValueError("sequence_logprobs: labels are required (they define each sequence's tokens); "
                         "for the entropy of every position use token_logprobs(logits, None) or token_entropy")
    _validate(logits, labels, temperature, "sequence_logprobs")
    check_inplace(logits, inplace_backward, "sequence_logprobs")
    if logits.dim() != 3:
        raise ValueError(f"sequence_logprobs: expected logits [B, T, V], got shape {tuple(logits.shape)}")
    labels = labels.long()
    be = resolve_backend(backend, logits.device)
    check_labels_in_range(labels, logits.shape[-1], ignore_index, "sequence_logprobs")
    if be == "reference":
        return SequenceLogprobs(*naive_sequence_logprobs(logits, labels, ignore_index, temperature))
    if be == "triton":
        from .triton_path import triton_sequence_logprobs

        return SequenceLogprobs(
            *triton_sequence_logprobs(logits, labels, ignore_index, temperature, inplace_backward)
        )
    tok = token_logprobs(
        logits, labels, ignore_index=ignore_index, temperature=temperature, backend=be,
        inplace_backward=inplace_backward,
    )
    num_tokens = (labels != ignore_index).sum(-1)
    denom = num_tokens.clamp(min=1).to(torch.float32)
    return SequenceLogprobs(tok.logps.sum(-1), tok.entropy.sum(-1) / denom, num_tokens)


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
