"""Memory mode: token log-probs and entropies straight from the last hidden states and the output layer.

The logits-level op still needs the [N, V] logits (and the same again for their gradient): at 16 × 4096
tokens and a 128k vocabulary that is 16.8 GB in bf16 before the op even starts. Here the logits of a
chunk of rows are computed, reduced to per-token statistics (logp, H, lse) and dropped; the backward
recomputes each chunk's logits, turns them into the chunk's logit gradient with the same fused backward
as the logits-level op, and contracts it at once into the gradients of the hidden states, the weight
(accumulated in fp32) and the bias. At most one chunk of logits exists at any time.

Costs: one extra matmul (the recompute in the backward: 4 instead of 3 [N, H] × [H, V] products), and
on accelerators one host sync per forward (the count of unmasked tokens, needed to skip masked rows
entirely: every masked row skipped saves its share of all four products). The softmax/entropy math is
not repeated here: the chunk statistics and gradients come from the torch path helpers
(``torch_path._chunk_forward``/``_chunk_backward``) or the Triton launchers (``triton_path._fwd``/``_bwd``).
"""

from __future__ import annotations

import math
from math import inf

import torch
import torch.nn.functional as F

from .logprobs import SequenceLogprobs, TokenLogprobs, check_labels_in_range, resolve_backend, token_logprobs
from .torch_path import Workspace, _chunk_backward, _chunk_forward

# Target size of one chunk of logits counted in fp32. On CPU the torch helpers keep a few such buffers
# (logits, shifted logits, exponentials / probabilities), allocated once per call and reused by every
# chunk (fresh chunk-sized allocations are new pages each time, and faulting them in cost as much as the
# arithmetic), so 48 MiB bounds a step's extra memory near 100-150 MiB whatever N and V are, while a
# chunk keeps enough rows for efficient matmuls (98 at V = 128256; fewer rows cost matmul speed). On
# accelerators the Triton kernels read the chunk in place and write its gradient into the same buffer,
# and bigger chunks re-read the weight fewer times: 256 MiB (512 rows at V = 128256).
CHUNK_BYTES_CPU = 48 * 1024 * 1024
CHUNK_BYTES_ACCELERATOR = 256 * 1024 * 1024


def default_chunk_size(vocab_size: int, device: torch.device | str) -> int:
    """Rows per chunk such that one chunk of fp32 logits takes about ``CHUNK_BYTES_CPU`` (CPU) or
    ``CHUNK_BYTES_ACCELERATOR`` (other devices; rounded down to a multiple of 64 for matmul tiles)."""
    device = torch.device(device)
    if device.type == "cpu":
        return max(1, CHUNK_BYTES_CPU // (4 * max(vocab_size, 1)))
    rows = CHUNK_BYTES_ACCELERATOR // (4 * max(vocab_size, 1))
    return max(64, rows // 64 * 64)


def _gather_rows(hidden: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` of the flattened [B, T] grid of hidden [B, T, H] as a dense [r, H]; works on any
    strides (the shifted view ``hidden[:, :-1]`` is never copied as a whole)."""
    seq = hidden.shape[1]
    return hidden[idx // seq, idx % seq]


def _chunk_logits(hidden_rows, weight, bias, ws: Workspace) -> torch.Tensor:
    """``hidden_rows @ weight.T + bias`` written into the workspace's logits buffer (slot 3)."""
    out = ws.get(3, hidden_rows.shape[0], weight.shape[0], weight.dtype)
    if bias is None:
        return torch.mm(hidden_rows, weight.t(), out=out)
    return torch.addmm(bias, hidden_rows, weight.t(), out=out)


def _chunk_stats(backend, logits, labels, ignore_index, inv_temp, ws):
    """(logp, H, lse) fp32 [r] of a chunk of unmasked rows."""
    if backend == "torch":
        return _chunk_forward(logits, labels, torch.ones_like(labels, dtype=torch.bool), inv_temp, ws)
    from .triton_path import _fwd

    logp, entropy, lse = _fwd(logits.unsqueeze(0), labels.unsqueeze(0), ignore_index, inv_temp)
    return logp[0], entropy[0], lse[0]


def _chunk_grad(backend, logits, labels, lse, entropy, g, h, ignore_index, inv_temp, ws):
    """dL/dlogits of a chunk of unmasked rows: fp32 (torch) or, written over ``logits``, in the logits
    dtype (Triton, in place: the recomputed chunk is ours and not needed afterwards)."""
    if backend == "torch":
        # fp32 logits: the gradient overwrites them (each element is read before it is written).
        out = logits if logits.dtype == torch.float32 else ws.get(2, *logits.shape)
        mask = torch.ones_like(labels, dtype=torch.bool)
        return _chunk_backward(logits, out, labels, mask, lse, entropy, g, h, inv_temp, ws)
    from .triton_path import _bwd

    def row(t):
        return None if t is None else t.unsqueeze(0)

    grad = _bwd(row(logits), row(labels), row(lse), row(entropy), row(g), row(h), ignore_index, inv_temp, True)
    return grad[0]


_FP32_OUT_ADDMM = [True]  # flips to False once if this torch build lacks addmm(..., out_dtype) on CUDA


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b in fp32 without an [V, H] temporary. bf16/fp16 operands on CUDA use the GEMM's
    fp32 output mode (fast half-precision math, fp32 accumulation and result); elsewhere the chunk
    operands are upcast (a chunk-sized copy)."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if a.is_cuda and _FP32_OUT_ADDMM[0]:
        try:
            torch.addmm(acc, a, b, torch.float32, out=acc)
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _FP32_OUT_ADDMM[0] = False
    acc.addmm_(a.float(), b.float())


class LinearTokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, temperature, chunk_size, backend):
        batch, seq, _ = hidden.shape
        inv_temp = 1.0 / float(temperature)
        # Indices of the unmasked tokens: masked rows enter no matmul at all. On an accelerator this is
        # the one host sync of the op (the number of chunks depends on the count).
        rows = (labels != ignore_index).reshape(-1).nonzero().squeeze(1)
        flat_labels = labels.reshape(-1)
        stats = torch.empty(3, rows.numel(), dtype=torch.float32, device=hidden.device)
        ws = Workspace(hidden.device)  # chunk buffers reused by every chunk (no fresh pages per chunk)
        for start in range(0, rows.numel(), chunk_size):
            idx = rows[start:start + chunk_size]
            logits = _chunk_logits(_gather_rows(hidden, idx), weight, bias, ws)
            chunk = _chunk_stats(backend, logits, flat_labels[idx], ignore_index, inv_temp, ws)
            for dst, val in zip(stats, chunk):
                dst[start:start + idx.numel()] = val
            del logits
        out = torch.zeros(2, batch * seq, dtype=torch.float32, device=hidden.device)
        out[0].index_copy_(0, rows, stats[0])
        out[1].index_copy_(0, rows, stats[1])
        # Only O(N) statistics are kept; hidden, weight and bias are the caller's tensors (no copies).
        ctx.save_for_backward(hidden, weight, bias, flat_labels, rows, stats[1], stats[2])
        ctx.ignore_index, ctx.inv_temp, ctx.chunk_size, ctx.backend = ignore_index, inv_temp, chunk_size, backend
        ctx.set_materialize_grads(False)
        return out[0].view(batch, seq), out[1].view(batch, seq)

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy):
        hidden, weight, bias, flat_labels, rows, entropy, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if grad_logps is None and grad_entropy is None:
            return (None,) * 8
        batch, seq, dim = hidden.shape
        dev = hidden.device
        grad_hidden = torch.zeros(batch * seq, dim, dtype=hidden.dtype, device=dev) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=dev) if need_weight else None
        need_bias = need_bias and bias is not None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=dev) if need_bias else None
        # Upstream grads of the unmasked tokens only (a per-sequence grad arrives expanded over T).
        g_all = grad_logps.reshape(-1)[rows].float() if grad_logps is not None else None
        h_all = grad_entropy.reshape(-1)[rows].float() if grad_entropy is not None else None
        step = ctx.chunk_size
        ws = Workspace(dev)
        for start in range(0, rows.numel(), step):
            sl = slice(start, start + step)
            idx = rows[sl]
            h_rows = _gather_rows(hidden, idx)
            logits = _chunk_logits(h_rows, weight, bias, ws)
            dlogits = _chunk_grad(
                ctx.backend, logits, flat_labels[idx], lse[sl], entropy[sl],
                None if g_all is None else g_all[sl], None if h_all is None else h_all[sl],
                ctx.ignore_index, ctx.inv_temp, ws,
            )
            del logits
            if need_hidden:
                grad_hidden.index_copy_(0, idx, torch.mm(dlogits.to(weight.dtype), weight))
            if need_weight:
                _addmm_fp32(grad_weight, dlogits.t(), h_rows)
            if need_bias:
                grad_bias += dlogits.sum(0, dtype=torch.float32)
            del dlogits
        if grad_hidden is not None:
            grad_hidden = grad_hidden.view(batch, seq, dim)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def _validate(hidden, weight, labels, bias, temperature, chunk_size, where: str) -> None:
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a tensor, got {type(t)}")
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(f"{where}: hidden must be float32/bfloat16/float16/float64, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{where}: weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{where}: labels must be int64 (or int32), got {labels.dtype}")
    if hidden.dim() < 2 or tuple(hidden.shape[:-1]) != tuple(labels.shape):
        raise ValueError(
            f"{where}: expected hidden [..., H] and labels [...] with matching leading dims, got hidden "
            f"{tuple(hidden.shape)} and labels {tuple(labels.shape)}"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{where}: expected weight [V, H] with H = {hidden.shape[-1]} (the last dim of hidden), got "
            f"weight {tuple(weight.shape)}"
        )
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{where}: bias must be a tensor or None, got {type(bias)}")
        if tuple(bias.shape) != (weight.shape[0],) or bias.dtype != weight.dtype:
            raise ValueError(
                f"{where}: expected bias [{weight.shape[0]}] of dtype {weight.dtype}, got "
                f"{tuple(bias.shape)} of dtype {bias.dtype}"
            )
    for name, t in (("weight", weight), ("labels", labels), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{where}: hidden on {hidden.device} but {name} on {t.device}")
    if weight.shape[0] == 0:
        raise ValueError(f"{where}: weight {tuple(weight.shape)} has an empty vocabulary dimension (V = 0)")
    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and 0 < temperature < inf):
        raise ValueError(f"{where}: temperature must be a positive finite number, got {temperature!r}")
    if chunk_size is not None and not (isinstance(chunk_size, int) and not isinstance(chunk_size, bool)
                                       and chunk_size > 0):
        raise ValueError(f"{where}: chunk_size must be a positive int or None, got {chunk_size!r}")


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> TokenLogprobs:
    """Token log-probs and entropies of ``logits = hidden @ weight.T + bias`` without materialising the
    logits: only one chunk of rows exists at a time, forward and backward.

    Same outputs as ``token_logprobs(F.linear(hidden, weight, bias), labels, ...)``, differentiable in
    ``hidden``, ``weight`` and ``bias`` (the weight and bias gradients are accumulated in fp32 and
    returned in their dtype). Masked tokens enter no matmul.

    Args:
        hidden: [N, H] (or [..., H]) last hidden states, float32/bfloat16/float16; any strides.
        weight: [V, H] output-layer weight, same dtype as ``hidden`` (tied embeddings: pass the
            embedding matrix).
        labels: [N] (or [...]) int64, already aligned with ``hidden`` (the caller shifts). Positions
            equal to ``ignore_index`` give 0 and zero gradient.
        bias: optional [V] output-layer bias.
        ignore_index: label value of masked positions.
        temperature: positive divisor of the logits.
        chunk_size: unmasked rows per chunk; None picks :func:`default_chunk_size` (about 48 MiB of fp32
            logits per chunk on CPU, 256 MiB on accelerators).
        backend: "triton", "torch", "reference" (materialises the logits: tests and benchmarks) or None,
            as in :func:`token_logprobs`.

    Returns:
        TokenLogprobs(logps, entropy), fp32, shape of ``labels``.

    Raises:
        TypeError: a non-tensor argument, ``hidden`` not floating point, ``weight`` / ``bias`` of another
            dtype than ``hidden``, or labels that are not int64 / int32.
        ValueError: shapes that do not fit together (H of ``hidden`` and ``weight``, ``labels`` and
            ``hidden``'s leading dims, ``bias`` [V]), tensors on different devices, a temperature that
            is not positive, a bad ``chunk_size``, an unknown backend, or (on CPU) a label outside
            [0, V) that is not ``ignore_index``, naming its position.

    Examples:
        >>> hidden = model.model(input_ids, attention_mask=mask).last_hidden_state
        >>> tok = linear_token_logprobs(hidden[:, :-1], model.lm_head.weight, labels[:, 1:])
    """
    _validate(hidden, weight, labels, bias, temperature, chunk_size, "linear_token_logprobs")
    labels = labels.long()
    be = resolve_backend(backend, hidden.device)
    check_labels_in_range(labels, weight.shape[0], ignore_index, "linear_token_logprobs")
    if be == "reference":
        return token_logprobs(F.linear(hidden, weight, bias), labels, ignore_index=ignore_index,
                              temperature=temperature, backend="reference")
    lead = labels.shape
    if hidden.dim() == 2:
        hidden3d, labels2d = hidden.unsqueeze(0), labels.reshape(1, -1)
    else:
        rows3d = math.prod(hidden.shape[:-2])  # explicit: reshape(-1, 0, H) is ambiguous
        hidden3d = hidden.reshape(rows3d, *hidden.shape[-2:])
        labels2d = labels.reshape(rows3d, labels.shape[-1])
    rows = chunk_size or default_chunk_size(weight.shape[0], hidden.device)
    logps, entropy = LinearTokenLogprobsFunction.apply(
        hidden3d, weight, bias, labels2d, int(ignore_index), float(temperature), int(rows), be
    )
    return TokenLogprobs(logps.reshape(lead), entropy.reshape(lead))


def linear_sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> SequenceLogprobs:
    """Per-sequence masked sums of token log-probs and mean entropies from hidden states and the output
    layer, without materialising the logits.

    Args:
        hidden: [B, T, H] last hidden states, float32/bfloat16/float16; any strides (the shifted view
            ``hidden[:, :-1]`` is never copied whole).
        weight: [V, H] output-layer weight, same dtype as ``hidden``.
        labels: [B, T] int64 (or int32), aligned with ``hidden``; ``ignore_index`` marks prompt and
            padding.
        bias: optional [V] output-layer bias.
        ignore_index: label value of masked positions.
        temperature: positive divisor of the logits.
        chunk_size: unmasked rows per chunk (None: :func:`default_chunk_size`).
        backend: "triton", "torch", "reference" or None (triton on CUDA, torch elsewhere).

    Returns:
        SequenceLogprobs(logps [B] = sum over unmasked tokens, entropy [B] = mean over unmasked tokens
        (0 when there are none), num_tokens [B] int64), as :func:`sequence_logprobs` of the logits.

    Raises:
        ValueError: ``hidden`` not 3-D, and everything :func:`linear_token_logprobs` raises.
        TypeError: as :func:`linear_token_logprobs`.

    Examples:
        >>> hidden = model.model(input_ids, attention_mask=mask).last_hidden_state
        >>> seq = linear_sequence_logprobs(hidden[:, :-1], model.lm_head.weight, labels[:, 1:])
        >>> chosen, rejected = seq.logps.chunk(2)
    """
    if isinstance(hidden, torch.Tensor) and hidden.dim() != 3:
        raise ValueError(f"linear_sequence_logprobs: expected hidden [B, T, H], got shape {tuple(hidden.shape)}")
    tok = linear_token_logprobs(
        hidden, weight, labels, bias=bias, ignore_index=ignore_index, temperature=temperature,
        chunk_size=chunk_size, backend=backend,
    )
    num_tokens = (labels != ignore_index).sum(-1)
    denom = num_tokens.clamp(min=1).to(torch.float32)
    return SequenceLogprobs(tok.logps.sum(-1), tok.entropy.sum(-1) / denom, num_tokens)
