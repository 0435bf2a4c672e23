"""Chunked pure-PyTorch path of the op without labels: entropy and logsumexp of every row.

The same math as the Triton kernels with ``HAS_LABELS=False`` (KERNELS.md §1): per chunk of rows, the
max-relative sums s = Σ e^{z−m} and w = Σ e^{z−m}·(z−m) give lse = m + log s and H = log s − w/s, which
never subtract two large numbers. Only (H, lse) per row are saved; the backward recomputes p from lse
and writes each gradient element once, p·(∂L/∂lse − ∂L/∂H·(log p + H)) / T. Extra memory beyond the
gradient is two chunk-sized fp32 buffers, reused by every chunk of a call.
"""

from __future__ import annotations

import torch

# fp32 bytes of one chunk buffer (the labelled torch path uses the same budget).
CHUNK_BYTES = 8 * 1024 * 1024
# e^-200 underflows to 0 in fp32: clamping z − m (and log p) there keeps -inf logits out of 0·(-inf).
_FLOOR = -200.0


def _chunks(batch: int, seq: int, vocab: int):
    """(b, t0, t1) row slices of at most CHUNK_BYTES of fp32 each, over the [B, T] grid."""
    rows = max(1, CHUNK_BYTES // (4 * max(vocab, 1)))
    for b in range(batch):
        for t0 in range(0, seq, rows):
            yield b, t0, min(seq, t0 + rows)


class _Buffers:
    """Two fp32 chunk buffers allocated on first use and reused (fresh pages per chunk cost on CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.bufs = device, [None, None]

    def get(self, slot: int, rows: int, vocab: int) -> torch.Tensor:
        buf = self.bufs[slot]
        if buf is None or buf.numel() < rows * vocab:
            buf = self.bufs[slot] = torch.empty(rows * vocab, dtype=torch.float32, device=self.device)
        return buf[: rows * vocab].view(rows, vocab)


def _scaled(z: torch.Tensor, inv_temp: float, bufs: _Buffers) -> torch.Tensor:
    """z / T in fp32 in buffer 0 (widened before scaling: a low-precision product would round)."""
    out = bufs.get(0, z.shape[0], z.shape[1]).copy_(z)
    return out.mul_(inv_temp) if inv_temp != 1.0 else out


class TokenEntropyTorchFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, temperature, inplace_backward):
        batch, seq, vocab = logits.shape
        inv_temp = 1.0 / float(temperature)
        out = torch.empty(2, batch, seq, dtype=torch.float32, device=logits.device)
        entropy, lse = out[0], out[1]
        bufs = _Buffers(logits.device)
        for b, t0, t1 in _chunks(batch, seq, vocab):
            z = _scaled(logits[b, t0:t1], inv_temp, bufs)
            m = z.amax(-1, keepdim=True)
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # an all -inf row: shift by 0
            zm = z.sub_(m).clamp_(min=_FLOOR)
            e = torch.exp(zm, out=bufs.get(1, *zm.shape))
            s = e.sum(-1)
            w = torch.bmm(e.unsqueeze(1), zm.unsqueeze(2)).view(-1)  # Σ e·(z − m) without a temporary
            log_s = torch.log(s)
            lse[b, t0:t1] = m.squeeze(-1) + log_s
            entropy[b, t0:t1] = log_s - w / s
        ctx.save_for_backward(logits, lse, entropy)
        ctx.inv_temp, ctx.inplace = inv_temp, inplace_backward
        ctx.set_materialize_grads(False)
        return entropy, lse

    @staticmethod
    def backward(ctx, grad_entropy, grad_lse):
        if grad_entropy is None and grad_lse is None:
            return None, None, None
        logits, lse, entropy = ctx.saved_tensors
        batch, seq, vocab = logits.shape
        inv_temp = ctx.inv_temp
        grad = logits if ctx.inplace else torch.empty_like(logits)
        bufs = _Buffers(logits.device)
        for b, t0, t1 in _chunks(batch, seq, vocab):
            logp = _scaled(logits[b, t0:t1], inv_temp, bufs).sub_(lse[b, t0:t1].unsqueeze(-1)).clamp_(min=_FLOOR)
            p = torch.exp(logp, out=bufs.get(1, *logp.shape))
            # p·(a + k·log p) with a = (∂L/∂lse − ∂L/∂H·H)/T and k = −∂L/∂H/T.
            a = torch.zeros(t1 - t0, dtype=torch.float32, device=logits.device)
            if grad_lse is not None:
                a += grad_lse[b, t0:t1].float()
            if grad_entropy is None:
                grad[b, t0:t1] = p.mul_((a * inv_temp).unsqueeze(-1))
                continue
            h = grad_entropy[b, t0:t1].float()
            a -= h * entropy[b, t0:t1]
            logp.mul_((-h * inv_temp).unsqueeze(-1)).add_((a * inv_temp).unsqueeze(-1))
            grad[b, t0:t1] = logp.mul_(p)
        return grad, None, None


def torch_token_entropy(
    logits: torch.Tensor, temperature: float, inplace_backward: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, T, V] (any batch/time strides, unit stride along V) -> fp32 (entropy [B, T], lse [B, T])."""
    return TokenEntropyTorchFunction.apply(logits, float(temperature), bool(inplace_backward))
