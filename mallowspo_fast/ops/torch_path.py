"""Chunked pure-PyTorch path of the log-prob / entropy op (any device).

Same contract and math as the Triton kernels (KERNELS.md §1), organised for memory: rows are processed
in chunks whose fp32 temporaries stay within ``CHUNK_BYTES``, only per-token statistics (lse, H) are
saved for the backward, and the backward writes each gradient element once into one preallocated
buffer (the logits buffer itself with ``inplace_backward=True``). Extra memory beyond the gradient is
one chunk of temporaries plus O(N) floats, whatever N and V are.
"""

from __future__ import annotations

import torch

# fp32 bytes of one chunk temporary. Small enough to stay cache-friendly on CPU and to keep the
# temporaries of a step far below the logits size; large enough to amortise per-op overhead.
CHUNK_BYTES = 8 * 1024 * 1024


def _row_chunks(batch: int, seq: int, vocab: int):
    """Yield (b0, b1, t0, t1) slices covering [B, T] with about CHUNK_BYTES of fp32 per chunk."""
    rows = max(1, CHUNK_BYTES // (4 * max(vocab, 1)))
    if seq >= rows:
        for b in range(batch):
            for t0 in range(0, seq, rows):
                yield b, b + 1, t0, min(seq, t0 + rows)
    else:
        per = max(1, rows // max(seq, 1))
        for b0 in range(0, batch, per):
            yield b0, min(batch, b0 + per), 0, seq


def _chunk_forward(z: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, inv_temp: float):
    """z: [r, V] slice in the input dtype -> (logp, H, lse) fp32 [r]; masked rows give 0 logp/H."""
    z = z.float()
    if inv_temp != 1.0:
        z = z * inv_temp
    m = z.amax(-1, keepdim=True)
    # A row of all -inf would give nan from (-inf) - (-inf); such rows only occur masked.
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    zm = z - m
    e = torch.exp(zm)
    s = e.sum(-1)
    # Σ p·(z − m) relative to the max: H = log s − Σ e(z − m)/s never subtracts two large numbers
    # (exact for |z| ~ 1e4 and under a constant shift). 0·(−inf) := 0 for -inf logits.
    w = (e * torch.where(e > 0, zm, torch.zeros_like(zm))).sum(-1)
    log_s = torch.log(s)
    lse = m.squeeze(-1) + log_s
    entropy = log_s - w / s
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    logp = z.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - lse
    zero = torch.zeros((), dtype=torch.float32, device=z.device)
    return torch.where(mask, logp, zero), torch.where(mask, entropy, zero), lse


def _chunk_backward(
    z: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    g: torch.Tensor | None,
    h: torch.Tensor | None,
    inv_temp: float,
) -> torch.Tensor:
    """dL/dlogits for one chunk, fp32 [r, V]: (g·(onehot − p) − h·p·(log p + H)) / T, 0 on masked rows."""
    zf = z.float()
    if inv_temp != 1.0:
        zf = zf * inv_temp
    logp_all = zf - lse.unsqueeze(-1)
    p = torch.exp(logp_all)
    zero = torch.zeros((), dtype=torch.float32, device=z.device)
    g = torch.where(mask, g, zero) if g is not None else None
    h = torch.where(mask, h, zero) if h is not None else None
    if h is not None:
        # coef = g + h·(log p + H); p·coef with 0·(-inf) := 0 where p == 0.
        coef = logp_all.add_(entropy.unsqueeze(-1)).mul_(h.unsqueeze(-1))
        if g is not None:
            coef.add_(g.unsqueeze(-1))
        grad = torch.where(p > 0, p * coef, zero).neg_()
    else:
        grad = p.mul_(g.unsqueeze(-1)).neg_()
    if g is not None:
        safe = torch.where(mask, labels, torch.zeros_like(labels))
        grad.scatter_add_(-1, safe.unsqueeze(-1), g.unsqueeze(-1))
    if inv_temp != 1.0:
        grad.mul_(inv_temp)
    return grad


class TokenLogprobsTorchFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, temperature, inplace_backward):
        batch, seq, vocab = logits.shape
        inv_temp = 1.0 / float(temperature)
        mask = labels != ignore_index
        logps = torch.empty(batch, seq, dtype=torch.float32, device=logits.device)
        entropy = torch.empty_like(logps)
        lse = torch.empty_like(logps)
        for b0, b1, t0, t1 in _row_chunks(batch, seq, vocab):
            z = logits[b0:b1, t0:t1].reshape(-1, vocab)
            lp, en, ls = _chunk_forward(z, labels[b0:b1, t0:t1].reshape(-1), mask[b0:b1, t0:t1].reshape(-1),
                                        inv_temp)
            logps[b0:b1, t0:t1] = lp.view(b1 - b0, t1 - t0)
            entropy[b0:b1, t0:t1] = en.view(b1 - b0, t1 - t0)
            lse[b0:b1, t0:t1] = ls.view(b1 - b0, t1 - t0)
        ctx.save_for_backward(logits, labels, lse, entropy)
        ctx.ignore_index, ctx.inv_temp, ctx.inplace = ignore_index, inv_temp, inplace_backward
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(lse)
        return logps, entropy, lse

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy, _grad_lse):
        logits, labels, lse, entropy = ctx.saved_tensors
        if grad_logps is None and grad_entropy is None:
            return None, None, None, None, None
        batch, seq, vocab = logits.shape
        mask = labels != ctx.ignore_index
        # Written once, chunk by chunk; every element is covered by exactly one chunk.
        grad = logits if ctx.inplace else torch.empty_like(logits)
        for b0, b1, t0, t1 in _row_chunks(batch, seq, vocab):
            sl = (slice(b0, b1), slice(t0, t1))
            g = grad_logps[sl].reshape(-1).float() if grad_logps is not None else None
            h = grad_entropy[sl].reshape(-1).float() if grad_entropy is not None else None
            gz = _chunk_backward(
                logits[sl].reshape(-1, vocab), labels[sl].reshape(-1), mask[sl].reshape(-1),
                lse[sl].reshape(-1), entropy[sl].reshape(-1), g, h, ctx.inv_temp,
            )
            grad[sl] = gz.view(b1 - b0, t1 - t0, vocab)
        return grad, None, None, None, None


def torch_token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    temperature: float,
    inplace_backward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, T, V] (any batch/time strides, unit stride along V), labels [B, T] -> fp32
    (logps [B, T], entropy [B, T])."""
    logps, entropy, _ = TokenLogprobsTorchFunction.apply(
        logits, labels, int(ignore_index), float(temperature), bool(inplace_backward)
    )
    return logps, entropy
