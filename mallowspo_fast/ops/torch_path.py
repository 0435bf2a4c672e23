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


# Log-probs below this are exactly 0 in fp32 probability (e^-104 underflows); clamping -inf logits
# here keeps every product finite (no 0·(-inf)) without changing any result.
_LOGP_FLOOR = -200.0


class Workspace:
    """fp32 chunk temporaries allocated once per call and reused by every chunk.

    Fresh allocations of chunk size are served by the OS as new pages on CPU, and faulting them in on
    every chunk costs as much as the arithmetic; reusing warm buffers removes that."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bufs: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    def get(self, slot: int, rows: int, vocab: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n = rows * vocab
        buf = self.bufs.get((slot, dtype))
        if buf is None or buf.numel() < n:
            buf = self.bufs[(slot, dtype)] = torch.empty(n, dtype=dtype, device=self.device)
        return buf[:n].view(rows, vocab)


def _as_fp32(z: torch.Tensor, inv_temp: float, ws: Workspace, slot: int) -> torch.Tensor:
    """z / T in fp32: z itself when it already is (T = 1), else written into a workspace buffer."""
    if z.dtype == torch.float32 and inv_temp == 1.0:
        return z
    buf = ws.get(slot, z.shape[0], z.shape[1])
    buf.copy_(z)  # widen first: a low-precision product would round before the cast
    return buf.mul_(inv_temp) if inv_temp != 1.0 else buf


def _chunk_forward(z: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, inv_temp: float,
                   ws: Workspace | None = None):
    """z: [r, V] slice in the input dtype -> (logp, H, lse) fp32 [r]; masked rows give 0 logp/H."""
    ws = ws if ws is not None else Workspace(z.device)
    rows, vocab = z.shape
    z = _as_fp32(z, inv_temp, ws, 0)
    m = z.amax(-1, keepdim=True)
    # A row of all -inf would give nan from (-inf) - (-inf); such rows only occur masked.
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    zm = torch.sub(z, m, out=ws.get(1, rows, vocab)).clamp_(min=_LOGP_FLOOR)
    e = torch.exp(zm, out=ws.get(2, rows, vocab))
    s = e.sum(-1)
    # Σ p·(z − m) relative to the max: H = log s − Σ e(z − m)/s never subtracts two large numbers
    # (exact for |z| ~ 1e4 and under a constant shift). A batched dot product: no [r, V] temporary.
    w = torch.bmm(e.unsqueeze(1), zm.unsqueeze(2)).view(-1)
    log_s = torch.log(s)
    lse = m.squeeze(-1) + log_s
    entropy = log_s - w / s
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    logp = z.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - lse
    zero = torch.zeros((), dtype=torch.float32, device=z.device)
    return torch.where(mask, logp, zero), torch.where(mask, entropy, zero), lse


def _chunk_backward(
    z: torch.Tensor,
    out: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    g: torch.Tensor | None,
    h: torch.Tensor | None,
    inv_temp: float,
    ws: Workspace | None = None,
) -> torch.Tensor:
    """Write dL/dlogits of one chunk into ``out`` (fp32 [r, V]; may be ``z`` itself, else aliases nothing):
    (g·(onehot − p) − h·p·(log p + H)) / T, exactly 0 on masked rows. Returns ``out``."""
    ws = ws if ws is not None else Workspace(z.device)
    zf = _as_fp32(z, inv_temp, ws, 0)
    zero = torch.zeros((), dtype=torch.float32, device=z.device)
    # Masked rows get zero upstream grads, so their gradient row is exactly 0 with no special case.
    g = torch.where(mask, g, zero) if g is not None else torch.zeros_like(lse)
    logp = torch.sub(zf, lse.unsqueeze(-1), out=out)
    if h is None:
        # −g·p / T (+ g/T at the label): sub, exp, scale — three passes.
        logp.exp_().mul_((-g * inv_temp).unsqueeze(-1))
    else:
        h = torch.where(mask, h, zero)
        logp.clamp_(min=_LOGP_FLOOR)
        p = torch.exp(logp, out=ws.get(1, logp.shape[0], logp.shape[1]))
        # −p·(g + h·(log p + H)) / T = p·(c + k·log p) with c = −(g + h·H)/T, k = −h/T.
        c = (-(g + h * entropy) * inv_temp).unsqueeze(-1)
        k = (-h * inv_temp).unsqueeze(-1)
        torch.addcmul(c, logp, k, out=logp).mul_(p)
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    out.scatter_add_(-1, safe.unsqueeze(-1), (g * inv_temp).unsqueeze(-1))
    return out


def _unmasked_rows(mask: torch.Tensor) -> torch.Tensor | None:
    """Indices of the unmasked rows of a chunk when skipping the others pays off, else None.

    Only on CPU, where the index computation is free: on an accelerator it would be a host sync, so
    there every row of the chunk is computed and masked rows are zeroed through their zero upstream
    grads (the Triton kernels skip masked rows without any sync)."""
    if mask.device.type != "cpu" or bool(mask.all()):
        return None
    return mask.nonzero().squeeze(1)


class TokenLogprobsTorchFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, temperature, inplace_backward):
        batch, seq, vocab = logits.shape
        inv_temp = 1.0 / float(temperature)
        mask = labels != ignore_index
        out = torch.zeros(3, batch, seq, dtype=torch.float32, device=logits.device)
        ws = Workspace(logits.device)
        logps, entropy, lse = out[0], out[1], out[2]
        for b0, b1, t0, t1 in _row_chunks(batch, seq, vocab):
            sl = (slice(b0, b1), slice(t0, t1))
            z, lab, m = logits[sl].reshape(-1, vocab), labels[sl].reshape(-1), mask[sl].reshape(-1)
            keep = _unmasked_rows(m)
            if keep is not None:  # masked rows are never read; their outputs stay 0
                if keep.numel() == 0:
                    continue
                z, lab, m = z.index_select(0, keep), lab[keep], m[keep]
            stats = _chunk_forward(z, lab, m, inv_temp, ws)
            for dst, val in zip((logps, entropy, lse), stats):
                rows = dst[sl].reshape(-1)
                if keep is None:
                    dst[sl] = val.view(b1 - b0, t1 - t0)
                else:
                    dst[sl] = rows.index_copy(0, keep, val).view(b1 - b0, t1 - t0)
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
        # Written once, chunk by chunk; every element is covered by exactly one chunk. When the buffer
        # is fp32 and the chunk is a dense block of it, the chunk gradient is computed in place there.
        grad = logits if ctx.inplace else torch.empty_like(logits)
        ws = Workspace(logits.device)
        for b0, b1, t0, t1 in _row_chunks(batch, seq, vocab):
            sl = (slice(b0, b1), slice(t0, t1))
            nrows = (b1 - b0) * (t1 - t0)
            m = mask[sl].reshape(-1)
            keep = _unmasked_rows(m)

            def pick(t, sl=sl, keep=keep):
                rows = t[sl].reshape(-1)
                return rows if keep is None else rows[keep]

            g = pick(grad_logps).float() if grad_logps is not None else None
            h = pick(grad_entropy).float() if grad_entropy is not None else None
            target = grad[sl]
            direct = (keep is None and target.dtype == torch.float32 and target.is_contiguous()
                      and not ctx.inplace)
            n = nrows if keep is None else keep.numel()
            out = target.view(-1, vocab) if direct else ws.get(2, n, vocab)
            z = logits[sl].reshape(-1, vocab)
            if keep is not None:
                z = z.index_select(0, keep)
            _chunk_backward(z, out, pick(labels), pick(mask), pick(lse), pick(entropy), g, h, ctx.inv_temp, ws)
            if direct:
                continue
            if keep is None:
                target.copy_(out.view(b1 - b0, t1 - t0, vocab))
            elif target.is_contiguous():
                # Masked rows get their zeros, unmasked rows their gradient: each element written once.
                rows = target.view(-1, vocab)
                rows.index_fill_(0, (~m).nonzero().squeeze(1), 0)
                rows.index_copy_(0, keep, out.to(target.dtype))
            else:  # in place into a strided logits view
                full = torch.zeros(nrows, vocab, dtype=target.dtype, device=target.device)
                full.index_copy_(0, keep, out.to(target.dtype))
                target.copy_(full.view(b1 - b0, t1 - t0, vocab))
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
