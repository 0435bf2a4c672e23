"""Triton backend of the op: the backend contract (``forward``, ``backward``, ``sequence_reduce``;
docs/kernels.md) as launchers of the kernels (validate, allocate, grid). No autograd here.

Launch heuristics (one program per token; V is streamed in blocks of BLOCK_V columns):
- BLOCK_V = next power of two of V, capped at 16 KiB of input per block (4096 fp32 / 8192 bf16, fp16 /
  2048 fp64 columns). Below the cap one block covers the row; above it the online softmax loops
  ceil(V / BLOCK_V) times (V = 32000 bf16: 4 iterations; V = 262144 bf16: 32).
- num_warps = BLOCK_V / 512 clamped to [1, 16]: 16 columns per thread in the steady state, enough
  loads in flight per thread to cover HBM latency while the per-thread temporaries (z, e, e·z)
  stay far below the register limit (checked by the AOT report: zero spills at V up to 256000).
Per-call scalars (seq_len, V, ignore_index, the transform's pre and post) are runtime arguments:
changing them never recompiles. The compile-time flags come from the arguments: HAS_LABELS (labels
given), HAS_SOFTCAP (``transform.has_softcap``), RETURN_STATS, RETURN_RAW (``forward_raw``: a vocabulary
shard's raw accumulators), HAS_GRAD_* (upstream grads given).
"""

from __future__ import annotations

import torch
import triton

from .._kernels import _sequence_reduce_kernel, _token_logprobs_bwd_kernel, _token_logprobs_fwd_kernel
from .transform import LogitTransform, RowStats

MAX_BLOCK_BYTES = 16 * 1024
LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def launch_config(vocab_size: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a row of ``vocab_size`` logits of ``dtype`` (see module docstring)."""
    elem = torch.empty((), dtype=dtype).element_size()
    block = min(triton.next_power_of_2(max(vocab_size, 16)), MAX_BLOCK_BYTES // elem)
    warps = min(16, max(1, block // 512))
    return block, warps


def reduce_block(seq_len: int) -> int:
    """BLOCK_T of the per-sequence reduction: one block up to 1024 tokens, then a loop."""
    return min(1024, triton.next_power_of_2(max(seq_len, 16)))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the kernels accumulate and return in for logits of ``dtype`` (the kernels' ACC)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_logits(logits: torch.Tensor, where: str) -> None:
    if logits.dim() != 3:
        raise ValueError(f"{where}: expected logits [B, T, V], got shape {tuple(logits.shape)}")
    if logits.dtype not in LOGITS_DTYPES:
        raise TypeError(f"{where}: expected fp32/bf16/fp16/fp64 logits, got {logits.dtype}")
    if logits.shape[-1] > 1 and logits.stride(-1) != 1:
        raise ValueError(f"{where}: expected unit stride along V, got strides {tuple(logits.stride())}")


def _check_labels(labels: torch.Tensor | None, shape: tuple[int, ...], where: str) -> None:
    """The kernels are compiled for int64 labels of the logits' [B, T] (any strides)."""
    if labels is None:
        return
    if labels.dtype != torch.int64:
        raise TypeError(f"{where}: expected int64 labels, got {labels.dtype}")
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"{where}: expected labels of shape {tuple(shape)} (the logits' [B, T]), "
                         f"got {tuple(labels.shape)}")


def _unused_int64(device: torch.device) -> torch.Tensor:
    """A valid int64 pointer for the labels slot when HAS_LABELS=False (never read)."""
    return torch.empty(1, 1, dtype=torch.int64, device=device)


def forward(logits: torch.Tensor, labels: torch.Tensor | None, ignore_index: int, transform: LogitTransform,
            return_stats: bool = False) -> RowStats:
    """logits [B, T, V] (any batch/time strides, unit stride along V), labels [B, T] int64 or None ->
    RowStats of fresh [B, T] tensors in the accumulation dtype (``is_top1`` bool); masked rows 0."""
    _check_logits(logits, "triton_path.forward")
    _check_labels(labels, logits.shape[:2], "triton_path.forward")
    batch, seq, vocab = logits.shape
    acc = accumulation_dtype(logits.dtype)
    has_labels = labels is not None

    def new(dtype=acc):
        return torch.empty(batch, seq, dtype=dtype, device=logits.device)

    logp, entropy, lse, lse_lo = new() if has_labels else None, new(), new(), new()
    log_sum_sq = mean = top1 = None
    if return_stats:
        log_sum_sq, mean = new(), new()
        top1 = new(torch.bool) if has_labels else None
    if batch * seq > 0:
        block, warps = launch_config(vocab, logits.dtype)
        lab = labels if has_labels else _unused_int64(logits.device)
        # Slots of outputs a variant does not write get a valid tensor of the accumulation dtype; the
        # flags compile their stores away.
        _token_logprobs_fwd_kernel[(batch * seq,)](
            logits, lab, logp if has_labels else lse, entropy, lse, lse_lo,
            log_sum_sq if return_stats else lse, mean if return_stats else lse, top1 if top1 is not None else lse,
            lse, seq, vocab,
            logits.stride(0), logits.stride(1), lab.stride(0), lab.stride(1),
            ignore_index, transform.pre, transform.post, transform.pre, transform.post,
            HAS_LABELS=has_labels, HAS_SOFTCAP=transform.has_softcap, RETURN_STATS=return_stats, RETURN_RAW=False,
            BLOCK_V=block, num_warps=warps,
        )
    return RowStats(logp, entropy, lse, log_sum_sq, mean, top1, lse_lo)


def num_raw(return_stats: bool) -> int:
    """Values per row of :func:`forward_raw`: m, s, w, z[label] (+ q, Σ z, first index of the max)."""
    return 7 if return_stats else 4


def check_raw_index_exact(vocab: int, acc: torch.dtype, return_stats: bool, where: str) -> None:
    """The index of the max travels as a float: exact below 2^24 columns in fp32 (2^53 in float64)."""
    if return_stats and acc == torch.float32 and vocab > 2**24:
        raise ValueError(f"{where}: return_stats needs at most 2^24 columns per shard in fp32, got {vocab}")


def forward_raw(logits: torch.Tensor, labels: torch.Tensor | None, ignore_index: int, transform: LogitTransform,
                return_stats: bool = False) -> torch.Tensor:
    """The raw per-row accumulators of one shard of the vocabulary, for an exact combination across shards
    (``vocab_parallel``): [B, T, K] in the accumulation dtype with K = :func:`num_raw`, per row
    m = max z, s = Σ e^{z−m}, w = Σ e^{z−m}·(z − m), z[label] (0 when no column of the shard is the label:
    the caller passes shard-local labels, out-of-shard ones as any negative value but ``ignore_index``)
    and with ``return_stats`` q = Σ e^{2(z−m)}, Σ z and the first index of the max (a float; 0 without
    labels). Masked rows (label == ignore_index) are not read and give zeros. Same pass, same reads as
    :func:`forward`; only the per-row values written differ."""
    _check_logits(logits, "triton_path.forward_raw")
    _check_labels(labels, logits.shape[:2], "triton_path.forward_raw")
    batch, seq, vocab = logits.shape
    acc = accumulation_dtype(logits.dtype)
    check_raw_index_exact(vocab, acc, return_stats, "triton_path.forward_raw")
    raw = torch.empty(batch, seq, num_raw(return_stats), dtype=acc, device=logits.device)
    if batch * seq > 0:
        block, warps = launch_config(vocab, logits.dtype)
        has_labels = labels is not None
        lab = labels if has_labels else _unused_int64(logits.device)
        # Only raw_ptr is written: every other output slot gets the raw buffer (compiled away).
        _token_logprobs_fwd_kernel[(batch * seq,)](
            logits, lab, raw, raw, raw, raw, raw, raw, raw, raw,
            seq, vocab,
            logits.stride(0), logits.stride(1), lab.stride(0), lab.stride(1),
            ignore_index, transform.pre, transform.post, transform.pre, transform.post,
            HAS_LABELS=has_labels, HAS_SOFTCAP=transform.has_softcap, RETURN_STATS=return_stats, RETURN_RAW=True,
            BLOCK_V=block, num_warps=warps,
        )
    return raw


def _upstream(grad: torch.Tensor | None, batch: int, seq: int, acc: torch.dtype) -> torch.Tensor | None:
    """An upstream grad as a [B, T] view of the accumulation dtype: expanded views keep their zero
    strides (a per-sequence grad is never copied over T); other dtypes are converted once (O(B·T))."""
    if grad is None:
        return None
    return grad.to(acc).expand(batch, seq)


def backward(logits: torch.Tensor, labels: torch.Tensor | None, lse: torch.Tensor, entropy: torch.Tensor,
             grad_logps: torch.Tensor | None, grad_entropy: torch.Tensor | None, grad_lse: torch.Tensor | None,
             ignore_index: int, transform: LogitTransform, inplace: bool,
             lse_lo: torch.Tensor | None = None) -> torch.Tensor:
    """dL/dlogits [B, T, V] in the logits dtype: a new tensor, or written over ``logits`` (``inplace``;
    each element is read before it is written). Masked rows get exactly 0 and are not read. ``lse_lo``: the
    forward's residual of lse (None: 0)."""
    _check_logits(logits, "triton_path.backward")
    _check_labels(labels, logits.shape[:2], "triton_path.backward")
    if grad_lse is not None and labels is not None:
        raise ValueError("triton_path.backward: grad_lse is only supported without labels (labels is not None)")
    batch, seq, vocab = logits.shape
    acc = accumulation_dtype(logits.dtype)
    grad = logits if inplace else torch.empty_like(logits)
    if batch * seq == 0:
        return grad
    g = _upstream(grad_logps, batch, seq, acc)
    if grad_lse is not None:
        # ∂lse/∂z_j = p_j: the kernel's −g·p_j term with g = −∂L/∂lse (no label term without labels).
        g = -_upstream(grad_lse, batch, seq, acc)
    h = _upstream(grad_entropy, batch, seq, acc)
    if g is None and h is None:
        return grad.zero_()
    block, warps = launch_config(vocab, logits.dtype)
    # Unused pointer slots get a valid tensor; the HAS_* flags compile their loads away.
    g_arg = g if g is not None else lse
    h_arg = h if h is not None else lse
    lab = labels if labels is not None else _unused_int64(logits.device)
    lse_lo = torch.zeros_like(lse) if lse_lo is None else lse_lo
    _token_logprobs_bwd_kernel[(batch * seq,)](
        logits, grad, lab, lse, lse_lo, entropy, g_arg, h_arg,
        seq, vocab,
        logits.stride(0), logits.stride(1), grad.stride(0), grad.stride(1),
        lab.stride(0), lab.stride(1),
        g_arg.stride(0), g_arg.stride(1), h_arg.stride(0), h_arg.stride(1),
        ignore_index, transform.pre, transform.post, transform.pre, transform.post,
        HAS_GRAD_LOGP=g is not None, HAS_GRAD_ENTROPY=h is not None, HAS_LABELS=labels is not None,
        HAS_SOFTCAP=transform.has_softcap, BLOCK_V=block, num_warps=warps,
    )
    return grad


def sequence_reduce(labels: torch.Tensor, logps: torch.Tensor, entropy: torch.Tensor,
                    ignore_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """labels [B, T], logps / entropy [B, T] (outputs of ``forward``) -> (Σ logps [B], mean entropy over
    the unmasked tokens [B] (0 when none), num_tokens [B] int64) in the dtype of ``logps``; fixed order."""
    if logps.dtype != entropy.dtype or logps.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"triton_path.sequence_reduce: expected fp32 or fp64 logps and entropy of one dtype, "
                        f"got {logps.dtype} and {entropy.dtype}")
    _check_labels(labels, logps.shape, "triton_path.sequence_reduce")
    batch, seq = labels.shape
    # The kernel reads the per-token values as contiguous [B, T] rows (what forward returns).
    logps, entropy = logps.contiguous(), entropy.contiguous()
    seq_logp = torch.empty(batch, dtype=logps.dtype, device=logps.device)
    seq_entropy = torch.empty_like(seq_logp)
    num_tokens = torch.empty(batch, dtype=torch.int64, device=logps.device)
    if batch > 0:
        _sequence_reduce_kernel[(batch,)](
            labels, logps, entropy, seq_logp, seq_entropy, num_tokens,
            seq, labels.stride(0), labels.stride(1), ignore_index,
            BLOCK_T=reduce_block(seq), num_warps=4,
        )
    return seq_logp, seq_entropy, num_tokens
