"""The op's arithmetic on a block of rows, in plain PyTorch: the one home of the math of the torch path.

Both routes of the torch backend (``torch_path``) call these two functions: the compiled route hands them
to ``torch.compile`` (Inductor turns each into one fused loop over the rows), the eager route calls them
on fixed-size chunks of rows. Under a user's own ``torch.compile`` they are traced into the user's graph.

Same math as the Triton kernels (docs/kernels.md): with z = transform(y),

    m = max z,  s = Σ e^{z−m},  w = Σ e^{z−m}·(z − m),  lse = m + log s,  H = log s − w/s,
    logp = z[label] − lse,  log Σp² = log Σ e^{2(z−m)} − 2 log s,

w relative to the max so that H never subtracts two large numbers (exact for |z| ~ 1e4 and under a shift).
"""

from __future__ import annotations

import torch

# e^x underflows to 0 below these (fp32: e^-104; fp64: e^-745): clamping z − m (and log p) there keeps
# -inf logits out of 0·(-inf) without changing any result.
FLOOR = {torch.float32: -200.0, torch.float64: -1000.0}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 logits are computed in float64, everything else in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _transformed(y: torch.Tensor, pre: torch.Tensor, post: torch.Tensor, softcap: bool):
    """(z, t) with z = post·tanh(pre·y) and t = tanh(pre·y) (softcap), else (post·y, None)."""
    if softcap:
        t = torch.tanh(y * pre)
        return t * post, t
    return y * post, None


def rows_forward(z, labels, mask, pre, post, *, softcap: bool, stats: bool, acc: torch.dtype):
    """One pass over logits ``z`` [R, V] (raw, input dtype) -> tuple of [R] tensors in z's compute dtype:
    (logp, H, lse, log Σp², mean z, is_top1, lse_lo). ``labels``/``mask`` [R] or None (no labels: logp and
    is_top1 are None, nothing is masked); masked rows give 0 (False). ``acc`` is the dtype of the row sums:
    float64 in the compiled route (the fused loop accumulates sequentially; float64 sums make H and lse
    as exact as the fp32 inputs allow, at the cost of a wider accumulator), the compute dtype in the
    eager route (torch's reductions sum in cascades). Without ``stats`` log Σp², mean and is_top1 are None.

    ``lse`` is rounded to the compute dtype; ``lse_lo`` is what the rounding left out (lse + lse_lo is the
    logsumexp to about twice the precision), so that log p = (z − lse) − lse_lo stays exact when the logits
    are large (|z| ~ 1e4: one fp32 ulp of lse is 1e-3). The log-prob is formed as (z[label] − m) − log s
    for the same reason."""
    cdt = compute_dtype(z.dtype)
    zt, _ = _transformed(z.to(cdt), pre, post, softcap)
    m = zt.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # a row of only -inf: shift by 0
    zm = (zt - m).clamp(min=FLOOR[cdt])
    e = torch.exp(zm)
    # Row sums in ``acc``; what follows is per row (O(R)) and runs in float64 whatever ``acc`` is, so that each
    # result is rounded once.
    s = e.to(acc).sum(-1).double()
    w = (e.to(acc) * zm.to(acc)).sum(-1).double()
    log_s = torch.log(s)
    m1 = m.squeeze(-1).double()
    lse64 = m1 + log_s
    lse = lse64.to(cdt)
    lse_lo = (lse64 - lse.double()).to(cdt)
    entropy = (log_s - w / s).to(cdt)
    log_sum_sq = mean = top1 = logp = None
    if stats:
        log_sum_sq = (torch.log((e.to(acc) * e.to(acc)).sum(-1).double()) - 2 * log_s).to(cdt)
        mean = (zt.to(acc).sum(-1).double() / zt.shape[-1]).to(cdt)
    if labels is None:
        return logp, entropy, lse, log_sum_sq, mean, top1, lse_lo
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    picked = zt.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(mask, ((picked.double() - m1) - log_s).to(cdt), 0.0)
    entropy = torch.where(mask, entropy, 0.0)
    lse = torch.where(mask, lse, 0.0)
    lse_lo = torch.where(mask, lse_lo, 0.0)
    if stats:
        log_sum_sq = torch.where(mask, log_sum_sq, 0.0)
        mean = torch.where(mask, mean, 0.0)
        top1 = (zt.argmax(-1) == safe) & mask  # argmax: the first index wins on ties
    return logp, entropy, lse, log_sum_sq, mean, top1, lse_lo


def rows_backward(z, labels, mask, lse, entropy, g, h, g_lse, pre, post, *, softcap: bool, lse_lo=None):
    """dL/dy of logits ``z`` [R, V] (raw) in the compute dtype:
    dL/dz_j = g·(1[j = label] − p_j) − h·p_j·(log p_j + H) + g_lse·p_j, times dz/dy
    (post·pre·(1 − t²) with a soft cap, else post). ``g``, ``h``, ``g_lse`` [R] (zeros when unused),
    ``labels``/``mask`` [R] or None; masked rows give exactly 0. ``lse_lo`` [R]: the residual of lse's
    rounding (:func:`rows_forward`), or None."""
    cdt = compute_dtype(z.dtype)
    zt, t = _transformed(z.to(cdt), pre, post, softcap)
    logp = zt - lse.unsqueeze(-1)
    if lse_lo is not None:
        logp = logp - lse_lo.unsqueeze(-1)
    logp = logp.clamp(min=FLOOR[cdt])
    p = torch.exp(logp)
    c = (g_lse - g - h * entropy).unsqueeze(-1)
    grad = p * (c - h.unsqueeze(-1) * logp)
    if labels is not None:
        onehot = torch.arange(z.shape[-1], device=z.device) == labels.unsqueeze(-1)
        grad = grad + torch.where(onehot, g.unsqueeze(-1), 0.0)
    if softcap:
        grad = grad * ((post * pre) * ((1 - t) * (1 + t)))  # (1 − t)(1 + t): exact near |t| = 1
    else:
        grad = grad * post
    if mask is not None:
        grad = torch.where(mask.unsqueeze(-1), grad, 0.0)
    return grad


def rows_forward_raw(z, labels, mask, pre, post, *, softcap: bool, stats: bool, acc: torch.dtype):
    """The raw accumulators of one vocabulary shard (``vocab_parallel``), one pass over logits ``z`` [R, V]
    -> [R, K] in the compute dtype, K = 4 (7 with ``stats``): m = max z (−inf for a row of only −inf),
    s = Σ e^{z−m}, w = Σ e^{z−m}·(z − m), z[label] (0 when the label is not a column of the shard)
    [, q = Σ e^{2(z−m)}, Σ z, the first index of the max as a float (0 without labels)]. ``labels`` are
    shard-local (out-of-shard rows hold any value outside [0, V) but the mask's); masked rows give zeros.
    ``acc`` as in :func:`rows_forward`."""
    cdt = compute_dtype(z.dtype)
    zt, _ = _transformed(z.to(cdt), pre, post, softcap)
    m = zt.amax(-1, keepdim=True)
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # a row of only -inf: shift by 0
    zm = (zt - shift).clamp(min=FLOOR[cdt])
    e = torch.exp(zm)
    cols = [m.squeeze(-1), e.to(acc).sum(-1).to(cdt), (e.to(acc) * zm.to(acc)).sum(-1).to(cdt)]
    if labels is None:
        cols.append(torch.zeros_like(cols[0]))
    else:
        owned = mask & (labels >= 0) & (labels < zt.shape[-1])
        safe = torch.where(owned, labels, torch.zeros_like(labels))
        cols.append(torch.where(owned, zt.gather(-1, safe.unsqueeze(-1)).squeeze(-1), 0.0))
    if stats:
        cols.append((e.to(acc) * e.to(acc)).sum(-1).to(cdt))
        cols.append(zt.to(acc).sum(-1).to(cdt))
        first = zt.argmax(-1).to(cdt) if labels is not None else torch.zeros_like(cols[0])  # first index on ties
        cols.append(first)
    raw = torch.stack(cols, dim=-1)
    if mask is not None:
        raw = torch.where(mask.unsqueeze(-1), raw, 0.0)
    return raw
