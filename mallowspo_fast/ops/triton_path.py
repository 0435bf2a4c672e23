"""Launchers and autograd Functions of the Triton kernels (validate, allocate, grid).

Launch heuristics (one program per token; V is streamed in blocks of BLOCK_V columns):
- BLOCK_V = next power of two of V, capped at 16 KiB of input per block (4096 fp32 / 8192 bf16, fp16
  columns). Below the cap one block covers the row; above it the online softmax loops
  ceil(V / BLOCK_V) times (V = 32000 bf16: 4 iterations; V = 262144 bf16: 32).
- num_warps = BLOCK_V / 512 clamped to [1, 16]: 16 columns per thread in the steady state, enough
  loads in flight per thread to cover HBM latency while the per-thread fp32 temporaries (z, e, e·z)
  stay far below the register limit (checked by the AOT report: zero spills at V up to 256000).
Per-call scalars (seq_len, V, ignore_index, 1/T) are runtime arguments: changing them never recompiles.
"""

from __future__ import annotations

import torch
import triton

from .._kernels import _sequence_reduce_kernel, _token_logprobs_bwd_kernel, _token_logprobs_fwd_kernel

MAX_BLOCK_BYTES = 16 * 1024


def launch_config(vocab_size: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a row of ``vocab_size`` logits of ``dtype`` (see module docstring)."""
    elem = torch.empty((), dtype=dtype).element_size()
    block = min(triton.next_power_of_2(max(vocab_size, 16)), MAX_BLOCK_BYTES // elem)
    warps = min(16, max(1, block // 512))
    return block, warps


def _no_labels(device: torch.device) -> torch.Tensor:
    """A valid int64 pointer for the labels slot when HAS_LABELS=False (never read)."""
    return torch.empty(1, 1, dtype=torch.int64, device=device)


def _fwd(logits: torch.Tensor, labels: torch.Tensor | None, ignore_index: int, inv_temp: float):
    """-> (logp, entropy, lse) fp32 [B, T]; without labels logp is None and every row is computed."""
    batch, seq, vocab = logits.shape
    n = batch * seq
    has_labels = labels is not None
    out = torch.empty(3 if has_labels else 2, batch, seq, dtype=torch.float32, device=logits.device)
    logp, entropy, lse = (out[0], out[1], out[2]) if has_labels else (None, out[0], out[1])
    if n > 0:
        block, warps = launch_config(vocab, logits.dtype)
        lab = labels if has_labels else _no_labels(logits.device)
        _token_logprobs_fwd_kernel[(n,)](
            logits, lab, logp if has_labels else entropy, entropy, lse,
            seq, vocab,
            logits.stride(0), logits.stride(1), lab.stride(0), lab.stride(1),
            ignore_index, inv_temp,
            HAS_LABELS=has_labels, BLOCK_V=block, num_warps=warps,
        )
    return logp, entropy, lse


def _bwd(logits, labels, lse, entropy, grad_logp, grad_entropy, ignore_index, inv_temp, inplace):
    batch, seq, vocab = logits.shape
    grad = logits if inplace else torch.empty_like(logits)
    if batch * seq == 0:
        return grad
    block, warps = launch_config(vocab, logits.dtype)
    has_g, has_h = grad_logp is not None, grad_entropy is not None
    # Unused pointer slots get a valid tensor; the HAS_* flags compile their loads away.
    g = grad_logp if has_g else lse
    h = grad_entropy if has_h else lse
    lab = labels if labels is not None else _no_labels(logits.device)
    _token_logprobs_bwd_kernel[(batch * seq,)](
        logits, grad, lab, lse, entropy, g, h,
        seq, vocab,
        logits.stride(0), logits.stride(1), grad.stride(0), grad.stride(1),
        lab.stride(0), lab.stride(1),
        g.stride(0), g.stride(1), h.stride(0), h.stride(1),
        ignore_index, inv_temp,
        HAS_GRAD_LOGP=has_g, HAS_GRAD_ENTROPY=has_h, HAS_LABELS=labels is not None,
        BLOCK_V=block, num_warps=warps,
    )
    return grad


class TokenLogprobsTritonFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, temperature, inplace_backward):
        inv_temp = 1.0 / float(temperature)
        logp, entropy, lse = _fwd(logits, labels, ignore_index, inv_temp)
        ctx.save_for_backward(logits, labels, lse, entropy)
        ctx.ignore_index, ctx.inv_temp, ctx.inplace = ignore_index, inv_temp, inplace_backward
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None
        logits, labels, lse, entropy = ctx.saved_tensors
        grad = _bwd(logits, labels, lse, entropy, grad_logp, grad_entropy, ctx.ignore_index, ctx.inv_temp,
                    ctx.inplace)
        return grad, None, None, None, None


class TokenEntropyTritonFunction(torch.autograd.Function):
    """Entropy and logsumexp of every row (no labels): one pass forward, one read + one write backward."""

    @staticmethod
    def forward(ctx, logits, temperature, inplace_backward):
        inv_temp = 1.0 / float(temperature)
        _, entropy, lse = _fwd(logits, None, 0, inv_temp)
        ctx.save_for_backward(logits, lse, entropy)
        ctx.inv_temp, ctx.inplace = inv_temp, inplace_backward
        ctx.set_materialize_grads(False)
        return entropy, lse

    @staticmethod
    def backward(ctx, grad_entropy, grad_lse):
        if grad_entropy is None and grad_lse is None:
            return None, None, None
        logits, lse, entropy = ctx.saved_tensors
        # ∂lse/∂z_j = p_j: the kernel's −g·p_j term with g = −∂L/∂lse (no label term without labels).
        g = -grad_lse if grad_lse is not None else None
        grad = _bwd(logits, None, lse, entropy, g, grad_entropy, 0, ctx.inv_temp, ctx.inplace)
        return grad, None, None


class SequenceLogprobsTritonFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, temperature, inplace_backward):
        inv_temp = 1.0 / float(temperature)
        logp, entropy, lse = _fwd(logits, labels, ignore_index, inv_temp)
        batch, seq = labels.shape
        seq_logp = torch.empty(batch, dtype=torch.float32, device=logits.device)
        seq_entropy = torch.empty_like(seq_logp)
        num_tokens = torch.empty(batch, dtype=torch.int64, device=logits.device)
        if batch > 0:
            _sequence_reduce_kernel[(batch,)](
                labels, logp, entropy, seq_logp, seq_entropy, num_tokens,
                seq, labels.stride(0), labels.stride(1), ignore_index,
                BLOCK_T=min(1024, triton.next_power_of_2(max(seq, 16))), num_warps=4,
            )
        ctx.save_for_backward(logits, labels, lse, entropy, num_tokens)
        ctx.ignore_index, ctx.inv_temp, ctx.inplace = ignore_index, inv_temp, inplace_backward
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(num_tokens)
        return seq_logp, seq_entropy, num_tokens

    @staticmethod
    def backward(ctx, grad_seq_logp, grad_seq_entropy, _grad_count):
        if grad_seq_logp is None and grad_seq_entropy is None:
            return None, None, None, None, None
        logits, labels, lse, entropy, num_tokens = ctx.saved_tensors
        seq = labels.shape[1]
        # Per-sequence upstream grads broadcast over time through a zero stride: no [B, T] copies.
        g = grad_seq_logp.float().unsqueeze(1).expand(-1, seq) if grad_seq_logp is not None else None
        h = None
        if grad_seq_entropy is not None:
            h = (grad_seq_entropy.float() / num_tokens.clamp(min=1).float()).unsqueeze(1).expand(-1, seq)
        grad = _bwd(logits, labels, lse, entropy, g, h, ctx.ignore_index, ctx.inv_temp, ctx.inplace)
        return grad, None, None, None, None


def triton_token_logprobs(logits, labels, ignore_index, temperature, inplace_backward=False):
    """logits [B, T, V] (unit stride along V), labels [B, T] -> fp32 (logps [B, T], entropy [B, T])."""
    return TokenLogprobsTritonFunction.apply(logits, labels, int(ignore_index), float(temperature),
                                             bool(inplace_backward))


def triton_token_entropy(logits, temperature, inplace_backward=False):
    """logits [B, T, V] (unit stride along V) -> fp32 (entropy [B, T], lse [B, T]) of every row."""
    return TokenEntropyTritonFunction.apply(logits, float(temperature), bool(inplace_backward))


def triton_sequence_logprobs(logits, labels, ignore_index, temperature, inplace_backward=False):
    """logits [B, T, V], labels [B, T] -> (logps [B], entropy [B], num_tokens [B])."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return SequenceLogprobsTritonFunction.apply(logits, labels, int(ignore_index), float(temperature),
                                                bool(inplace_backward))
