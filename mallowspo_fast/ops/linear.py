"""Memory mode: token log-probs and entropies straight from the last hidden states and the output layer.

The logits-level op still needs the [N, V] logits (and the same again for their gradient): at 16 × 4096
tokens and a 128k vocabulary that is 16.8 GB in bf16 before the op even starts. Here the logits of a
chunk of rows are computed, reduced to per-token statistics (logp, H, lse) and dropped; the backward
recomputes each chunk's logits, turns them into the chunk's logit gradient with the same fused backward
as the logits-level op (in place, over the recomputed chunk), and contracts it at once into the gradients
of the hidden states, the weight (accumulated in fp32) and the bias. At most one chunk of logits exists.

Costs: one extra matmul (the recompute in the backward: 4 instead of 3 [N, H] × [H, V] products), and
on accelerators one host sync per forward (the count of unmasked tokens, needed to skip masked rows
entirely: every masked row skipped saves its share of all four products). The softmax/entropy math is
not repeated here: each chunk goes through the backend contract (``torch_path`` / ``triton_path``
``forward`` and ``backward``, docs/kernels.md).

Dtypes follow TRL's fused head: the products run in the autocast dtype when autocast is on, else in the
hidden states' dtype (a weight of another dtype, e.g. an fp32 head under a bf16 backbone, is cast once per
pass); the weight and bias gradients accumulate in fp32 and are returned in their own dtypes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .functions import backend_module
from .logprobs import (
    IGNORE_INDEX,
    SequenceLogprobs,
    TokenLogprobs,
    TokenStats,
    check_labels_in_range,
    resolve_backend,
    token_logprobs,
)
from .transform import LogitTransform

# Target size of one chunk of logits counted in fp32. On CPU 48 MiB bounds a step's extra memory near
# 100-150 MiB whatever N and V are, while a chunk keeps enough rows for efficient matmuls (98 at
# V = 128256). On accelerators the Triton kernels read the chunk in place and write its gradient into the
# same buffer, and bigger chunks re-read the weight fewer times: 256 MiB (512 rows at V = 128256).
CHUNK_BYTES_CPU = 48 * 1024 * 1024
CHUNK_BYTES_ACCELERATOR = 256 * 1024 * 1024
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def default_chunk_size(vocab_size: int, device: torch.device | str) -> int:
    """Rows per chunk such that one chunk of fp32 logits takes about ``CHUNK_BYTES_CPU`` (CPU) or
    ``CHUNK_BYTES_ACCELERATOR`` (other devices; rounded down to a multiple of 64 for matmul tiles)."""
    device = torch.device(device)
    if device.type == "cpu":
        return max(1, CHUNK_BYTES_CPU // (4 * max(vocab_size, 1)))
    rows = CHUNK_BYTES_ACCELERATOR // (4 * max(vocab_size, 1))
    return max(64, rows // 64 * 64)


def default_fp32_logits(device: torch.device | str) -> bool:
    """Whether chunk logits of bf16/fp16 products are kept in fp32 by default: on CUDA, where the GEMM
    writes fp32 directly from the same half-precision math (``out_dtype``); not on CPU, where fp32 logits
    mean fp32 GEMMs (4.9× the time of a bf16 GEMM at 256 × 512 × 32000 on the 2-core test machine)."""
    return torch.device(device).type == "cuda"


def compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype of the head's products: the autocast dtype when autocast is on for hidden's device type
    and hidden is a floating type autocast would cast, else hidden's own dtype (TRL's rule)."""
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind) and hidden.dtype != torch.float64:
        return torch.get_autocast_dtype(kind)
    return hidden.dtype


def _gather_rows(hidden: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` of the flattened [B, T] grid of hidden [B, T, H] as a dense [r, H]; works on any
    strides (the shifted view ``hidden[:, :-1]`` is never copied as a whole)."""
    seq = hidden.shape[1]
    return hidden[idx // seq, idx % seq]


_FP32_OUT_MM = [True]  # flips to False once if this torch build lacks mm(..., out_dtype) on the device


def _chunk_logits(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fp32: bool) -> torch.Tensor:
    """``rows @ weight.T + bias`` [r, V]; with ``fp32`` and half-precision operands the product is written in
    fp32 (the GEMM's fp32 output mode on CUDA, else upcast operands)."""
    if fp32 and rows.dtype in (torch.bfloat16, torch.float16):
        out = None
        if rows.is_cuda and _FP32_OUT_MM[0]:
            try:
                out = torch.mm(rows, weight.t(), out_dtype=torch.float32)
            except (TypeError, RuntimeError, NotImplementedError):
                _FP32_OUT_MM[0] = False
        if out is None:
            out = torch.mm(rows.float(), weight.t().float())
        return out if bias is None else out.add_(bias.float())
    if bias is None:
        return torch.mm(rows, weight.t())
    return torch.addmm(bias, rows, weight.t())


_FP32_OUT_ADDMM = [True]  # flips to False once if this torch build lacks addmm(..., out_dtype) on CUDA


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b in acc's dtype (fp32, or float64) without an [V, H] temporary. bf16/fp16 operands on CUDA
    use the GEMM's fp32 output mode (fast half-precision math, fp32 accumulation and result); elsewhere the
    chunk operands are upcast (a chunk-sized copy)."""
    if a.dtype == acc.dtype and b.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if a.is_cuda and _FP32_OUT_ADDMM[0] and a.dtype == b.dtype and acc.dtype == torch.float32:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _FP32_OUT_ADDMM[0] = False
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


class LinearTokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, transform, chunk_size, backend, return_stats,
                cdt, fp32_logits):
        impl = backend_module(backend)
        batch, seq, _ = hidden.shape
        sdt = torch.float64 if cdt == torch.float64 else torch.float32
        # Indices of the unmasked tokens: masked rows enter no matmul at all. On an accelerator this is
        # the one host sync of the op (the number of chunks depends on the count).
        if torch.compiler.is_compiling():  # traced: no data-dependent row count; masked rows give 0 anyway
            rows = torch.arange(batch * seq, device=hidden.device)
        else:
            rows = (labels != ignore_index).reshape(-1).nonzero().squeeze(1)
        flat_labels = labels.reshape(-1)
        n_out = 6 if return_stats else 3
        stats = [torch.empty(rows.numel(), dtype=sdt, device=hidden.device) for _ in range(n_out)]
        if return_stats:
            stats[5] = torch.empty(rows.numel(), dtype=torch.bool, device=hidden.device)
        w = weight.to(cdt)  # no copy when the dtypes agree
        b = None if bias is None else bias.to(cdt)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, rows.numel(), chunk_size):
                idx = rows[start:start + chunk_size]
                logits = _chunk_logits(_gather_rows(hidden, idx).to(cdt), w, b, fp32_logits)
                chunk = impl.forward(logits.unsqueeze(0), flat_labels[idx].unsqueeze(0), ignore_index, transform,
                                     return_stats)
                for dst, val in zip(stats, chunk):
                    if val is not None:
                        dst[start:start + idx.numel()] = val[0]
                del logits
        outs = []
        for k, val in enumerate(stats):
            if k == 2:  # lse: kept for the backward, not returned
                continue
            full = torch.zeros(batch, seq, dtype=val.dtype, device=hidden.device)
            full.view(-1).index_copy_(0, rows, val)
            outs.append(full)  # its own tensor, not a view: callers may edit it in place
        # Only O(N) statistics are kept; hidden, weight and bias are the caller's tensors (no copies).
        ctx.save_for_backward(hidden, weight, bias, flat_labels, rows, stats[1], stats[2])
        ctx.ignore_index, ctx.transform, ctx.chunk_size, ctx.backend = ignore_index, transform, chunk_size, backend
        ctx.cdt, ctx.fp32_logits = cdt, fp32_logits
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*outs[2:])
        return tuple(outs)

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy, *_stats_grads):
        hidden, weight, bias, flat_labels, rows, entropy, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        n_inputs = 11
        if grad_logps is None and grad_entropy is None:
            return (None,) * n_inputs
        impl = backend_module(ctx.backend)
        batch, seq, dim = hidden.shape
        dev, cdt = hidden.device, ctx.cdt
        grad_hidden = torch.zeros(batch * seq, dim, dtype=hidden.dtype, device=dev) if need_hidden else None
        # The weight gradient only when asked for (a frozen head under LoRA: no [V, H] GEMM at all), accumulated
        # in fp32 (float64 when the products run in float64).
        acc = torch.float64 if cdt == torch.float64 else torch.float32
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=dev) if need_weight else None
        need_bias = need_bias and bias is not None
        grad_bias = torch.zeros(weight.shape[0], dtype=acc, device=dev) if need_bias else None
        # Upstream grads of the unmasked tokens only (a per-sequence grad arrives expanded over T).
        g_all = grad_logps.reshape(-1)[rows] if grad_logps is not None else None
        h_all = grad_entropy.reshape(-1)[rows] if grad_entropy is not None else None
        w = weight.to(cdt)
        b = None if bias is None else bias.to(cdt)
        step = ctx.chunk_size
        with torch.autocast(dev.type, enabled=False):
            for start in range(0, rows.numel(), step):
                sl = slice(start, start + step)
                idx = rows[sl]
                h_rows = _gather_rows(hidden, idx).to(cdt)
                logits = _chunk_logits(h_rows, w, b, ctx.fp32_logits).unsqueeze(0)

                def row(t, sl=sl):
                    return None if t is None else t[sl].unsqueeze(0)

                # In place: the recomputed chunk is ours and not needed afterwards.
                dlogits = impl.backward(logits, flat_labels[idx].unsqueeze(0), row(lse), row(entropy), row(g_all),
                                        row(h_all), None, ctx.ignore_index, ctx.transform, True)[0]
                if need_hidden:
                    if hidden.dtype == cdt:
                        rows_grad = torch.mm(dlogits.to(cdt), w)
                    else:  # e.g. fp32 hidden states under bf16 autocast: the product accumulates in fp32 (as TRL)
                        rows_grad = torch.zeros(idx.numel(), dim, dtype=torch.float32, device=dev)
                        _addmm_fp32(rows_grad, dlogits.to(cdt), w)
                    grad_hidden.index_copy_(0, idx, rows_grad.to(hidden.dtype))
                if need_weight:
                    _addmm_fp32(grad_weight, dlogits.t().to(cdt), h_rows)
                if need_bias:
                    grad_bias += dlogits.sum(0, dtype=acc)
                del logits, dlogits
        if grad_hidden is not None:
            grad_hidden = grad_hidden.view(batch, seq, dim)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return (grad_hidden, grad_weight, grad_bias) + (None,) * (n_inputs - 3)


def _validate(hidden, weight, labels, bias, temperature, softcap, logit_scale, chunk_size,
              where: str) -> LogitTransform:
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a tensor, got {type(t)}")
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a tensor or None, got {type(t)}")
        if t is not None and t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{where}: {name} must be float32/bfloat16/float16/float64, got {t.dtype}")
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
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{where}: expected bias [{weight.shape[0]}], got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("labels", labels), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{where}: hidden on {hidden.device} but {name} on {t.device}")
    if weight.shape[0] == 0:
        raise ValueError(f"{where}: weight {tuple(weight.shape)} has an empty vocabulary dimension (V = 0)")
    transform = LogitTransform.checked(temperature, softcap, logit_scale, where)
    if chunk_size is not None and not (isinstance(chunk_size, int) and not isinstance(chunk_size, bool)
                                       and chunk_size > 0):
        raise ValueError(f"{where}: chunk_size must be a positive int or None, got {chunk_size!r}")
    return transform


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    chunk_size: int | None = None,
    backend: str | None = None,
    return_stats: bool = False,
    fp32_logits: bool | None = None,
) -> TokenLogprobs | TokenStats:
    """Token log-probs and entropies of ``logits = hidden @ weight.T + bias`` without materialising the
    logits: only one chunk of rows exists at a time, forward and backward.

    Same outputs as ``token_logprobs(F.linear(hidden, weight, bias), labels, ...)``, differentiable in
    ``hidden``, ``weight`` and ``bias`` (the weight and bias gradients are accumulated in fp32 and
    returned in their dtype; no weight-gradient product at all when the weight does not require grad).
    Masked tokens enter no matmul.

    Args:
        hidden: [N, H] (or [..., H]) last hidden states, float32/bfloat16/float16/float64; any strides.
        weight: [V, H] output-layer weight (tied embeddings: pass the embedding matrix). Its dtype may
            differ from ``hidden``'s: the products run in the autocast dtype when autocast is on, else in
            ``hidden``'s dtype (as TRL's fused head).
        labels: [N] (or [...]) int64, already aligned with ``hidden`` (the caller shifts). Positions
            equal to ``ignore_index`` give 0 and zero gradient.
        bias: optional [V] output-layer bias.
        ignore_index: label value of masked positions.
        temperature: positive divisor of the logits.
        softcap: optional soft cap of the logits (Gemma-2/3's ``final_logit_softcapping``).
        logit_scale: multiplier of the logits applied first (Cohere, Granite, ...).
        chunk_size: unmasked rows per chunk; None picks :func:`default_chunk_size` (about 48 MiB of fp32
            logits per chunk on CPU, 256 MiB on accelerators).
        backend: "triton", "torch", "reference" (materialises the logits: tests and benchmarks) or None,
            as in :func:`token_logprobs`.
        return_stats: also return log Σp², the mean logit and whether the label is the top-1 token
            (:class:`TokenStats`), from the same pass.
        fp32_logits: keep each chunk's logits in fp32 when the products run in bf16/fp16 (more exact
            log-probs); None: :func:`default_fp32_logits` (on CUDA, not on CPU).

    Returns:
        TokenLogprobs(logps, entropy) (TokenStats with ``return_stats``), shape of ``labels``, fp32
        (float64 when the products run in float64).

    Raises:
        TypeError: a non-tensor argument, ``hidden`` / ``weight`` / ``bias`` not floating point, or labels
            that are not int64 / int32.
        ValueError: shapes that do not fit together (H of ``hidden`` and ``weight``, ``labels`` and
            ``hidden``'s leading dims, ``bias`` [V]), tensors on different devices, a temperature or soft
            cap that is not positive, a zero logit scale, a bad ``chunk_size``, an unknown backend, or (on
            CPU) a label outside [0, V) that is not ``ignore_index``, naming its position.

    Examples:
        >>> hidden = model.model(input_ids, attention_mask=mask).last_hidden_state
        >>> tok = linear_token_logprobs(hidden[:, :-1], model.lm_head.weight, labels[:, 1:])
    """
    transform = _validate(hidden, weight, labels, bias, temperature, softcap, logit_scale, chunk_size,
                          "linear_token_logprobs")
    labels = labels.long()
    be = resolve_backend(backend, hidden.device)
    check_labels_in_range(labels, weight.shape[0], ignore_index, "linear_token_logprobs")
    cdt = compute_dtype(hidden)
    if be == "reference":
        with torch.autocast(hidden.device.type, enabled=False):
            logits = F.linear(hidden.to(cdt), weight.to(cdt), None if bias is None else bias.to(cdt))
        return token_logprobs(logits, labels, ignore_index=ignore_index, temperature=temperature, softcap=softcap,
                              logit_scale=logit_scale, backend="reference", return_stats=return_stats)
    lead = labels.shape
    if hidden.dim() == 2:
        hidden3d, labels2d = hidden.unsqueeze(0), labels.reshape(1, -1)
    else:
        rows3d = math.prod(hidden.shape[:-2])  # explicit: reshape(-1, 0, H) is ambiguous
        hidden3d = hidden.reshape(rows3d, *hidden.shape[-2:])
        labels2d = labels.reshape(rows3d, labels.shape[-1])
    rows = chunk_size or default_chunk_size(weight.shape[0], hidden.device)
    fp32 = default_fp32_logits(hidden.device) if fp32_logits is None else bool(fp32_logits)
    outs = LinearTokenLogprobsFunction.apply(hidden3d, weight, bias, labels2d, int(ignore_index), transform,
                                             int(rows), be, bool(return_stats), cdt, fp32)
    outs = [t.view(lead) for t in outs]
    return TokenStats(*outs) if return_stats else TokenLogprobs(*outs)


def linear_sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    chunk_size: int | None = None,
    backend: str | None = None,
    fp32_logits: bool | None = None,
) -> SequenceLogprobs:
    """Per-sequence masked sums of token log-probs and mean entropies from hidden states and the output
    layer, without materialising the logits.

    Args:
        hidden: [B, T, H] last hidden states, float32/bfloat16/float16/float64; any strides (the shifted
            view ``hidden[:, :-1]`` is never copied whole).
        weight: [V, H] output-layer weight (its dtype may differ, as in :func:`linear_token_logprobs`).
        labels: [B, T] int64 (or int32), aligned with ``hidden``; ``ignore_index`` marks prompt and
            padding.
        bias: optional [V] output-layer bias.
        ignore_index: label value of masked positions.
        temperature: positive divisor of the logits.
        softcap: optional soft cap of the logits.
        logit_scale: multiplier of the logits applied first.
        chunk_size: unmasked rows per chunk (None: :func:`default_chunk_size`).
        backend: "triton", "torch", "reference" or None (triton on CUDA, torch elsewhere).
        fp32_logits: as in :func:`linear_token_logprobs`.

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
        hidden, weight, labels, bias=bias, ignore_index=ignore_index, temperature=temperature, softcap=softcap,
        logit_scale=logit_scale, chunk_size=chunk_size, backend=backend, fp32_logits=fp32_logits,
    )
    num_tokens = (labels != ignore_index).sum(-1)
    denom = num_tokens.clamp(min=1).to(tok.entropy.dtype)
    return SequenceLogprobs(tok.logps.sum(-1), tok.entropy.sum(-1) / denom, num_tokens)
