"""The exact combination of per-shard row statistics across the ranks of a vocabulary split
(docs/vocab-parallel.md): two all-reduces, O(N) floats, no [N, V] tensor.

Each rank holds the logits of a contiguous slice of the vocabulary, ``[vocab_start, vocab_start + V_r)``,
and its backend's ``forward_raw`` gives per row (relative to the shard's own max ``m_r``):
``s_r = Σ e^{z−m_r}``, ``w_r = Σ e^{z−m_r}(z − m_r)``, ``z[label]`` when the shard holds the label (else 0),
and with the statistics ``q_r = Σ e^{2(z−m_r)}``, ``Σ z`` and the first index of the shard's max. With
``M = max_r m_r`` and ``a_r = e^{m_r − M}``:

    S = Σ_r a_r s_r,   W = Σ_r a_r (w_r + (m_r − M) s_r),   Q = Σ_r a_r² q_r,
    lse = M + log S,   H = log S − W/S,   logp = (z[label] − M) − log S,   log Σp² = log Q − 2 log S,

every term kept relative to the global max, as in the single-device kernels (exact for |z| ~ 1e4 and
under a shift). The collectives: an all-reduce (max) of ``m`` (1 float per row), then one all-reduce
(sum) of ``[a·s, a·(w + (m − M)s), z[label]]`` (3 floats per row; 7 with the statistics; without labels
2, or 4 with the statistics) plus one float per call, the rank's ``V_r`` (their sum is V, for the mean
logit and the label range).

The pieces are pure functions around the two collectives (:func:`pack`, :func:`finish`), so that a test can
combine shards computed in one process with plain tensor reductions.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .transform import RowStats

# Columns of the summed buffer per row: S, W[, z[label]]; with the statistics also Q, Σ z and, with labels,
# the owner's "the label is the first max of my shard and my max is the global max" and the count of
# shards that reach the global max at an index before the label (the first index wins on ties).


def num_summed(has_labels: bool, return_stats: bool) -> int:
    """Floats per row of the summed buffer."""
    return 2 + has_labels + (2 + 2 * has_labels if return_stats else 0)


def pack(raw: torch.Tensor, global_max: torch.Tensor, labels: torch.Tensor | None, ignore_index: int,
         vocab_start: int, vocab_local: int, return_stats: bool) -> torch.Tensor:
    """This shard's share of the sum: [N·P + 1] (P = :func:`num_summed`), the last value this shard's width.
    ``raw`` [N, K] from ``forward_raw``, ``global_max`` [N] the max of ``raw[:, 0]`` over the ranks, ``labels``
    [N] global ids (or None)."""
    m, s, w, z_label = raw[:, 0], raw[:, 1], raw[:, 2], raw[:, 3]
    ref = torch.where(global_max == float("-inf"), torch.zeros_like(global_max), global_max)
    a = torch.exp(m - ref)  # 0 for a shard of only -inf logits (m = -inf)
    # (m − M)·s is 0 where s = 0 (a shard of only -inf, or a masked row): never -inf·0.
    d = torch.where(s > 0, m - ref, torch.zeros_like(m))
    cols = [a * s, a * (w + d * s)] + ([z_label] if labels is not None else [])
    if return_stats:
        q, z_sum, first = raw[:, 4], raw[:, 5], raw[:, 6]
        cols += [a * a * q, z_sum]
        if labels is not None:
            at_max = m == global_max
            local = labels - vocab_start
            owned = (local >= 0) & (local < vocab_local) & (labels != ignore_index)
            owner_top1 = (owned & at_max & (first == local.to(first.dtype))).to(m.dtype)
            earlier_tie = (~owned & at_max & (vocab_start + first < labels.to(first.dtype))).to(m.dtype)
            cols += [owner_top1, earlier_tie]
    width = torch.full((1,), float(vocab_local), dtype=raw.dtype, device=raw.device)
    return torch.cat([torch.stack(cols, dim=-1).reshape(-1), width])


def finish(global_max: torch.Tensor, summed: torch.Tensor, labels: torch.Tensor | None, ignore_index: int,
           return_stats: bool) -> tuple[RowStats, int]:
    """RowStats of [N] rows (with ``lse_lo``) from the all-reduced max and sums, and V (the sum of the shards'
    widths).
    Masked rows give 0 (False); a label outside [0, V) gives a NaN log-prob (the callers on CPU raise)."""
    has_labels = labels is not None
    vocab = int(summed[-1].item()) if summed.device.type == "cpu" else None
    rows = summed[:-1].view(-1, num_summed(has_labels, return_stats))
    stat = 2 + has_labels  # first column of the statistics
    ref = torch.where(global_max == float("-inf"), torch.zeros_like(global_max), global_max)
    log_s = torch.log(rows[:, 0])
    lse = ref + log_s  # rounded at the scale of M: the log-prob below is formed without it, and
    lse_lo = (ref - lse) + log_s  # what the rounding left out, for the backward's log p = (z − lse) − lse_lo
    entropy = log_s - rows[:, 1] / rows[:, 0]
    log_sum_sq = mean = top1 = logp = None
    if return_stats:
        log_sum_sq = torch.log(rows[:, stat]) - 2 * log_s
        mean = rows[:, stat + 1] / summed[-1]
    if labels is not None:
        keep = labels != ignore_index
        valid = (labels >= 0) & (labels < summed[-1])
        # (z[label] − M) − log S: exact at |z| ~ 1e4, where z[label] − lse would carry lse's rounding (1e-3 in fp32)
        logp = torch.where(keep, torch.where(valid, (rows[:, 2] - ref) - log_s, float("nan")), 0.0)
        entropy, lse, lse_lo = (torch.where(keep, t, 0.0) for t in (entropy, lse, lse_lo))
        if return_stats:
            log_sum_sq, mean = torch.where(keep, log_sum_sq, 0.0), torch.where(keep, mean, 0.0)
            top1 = keep & valid & (rows[:, stat + 2] == 1) & (rows[:, stat + 3] == 0)
    return RowStats(logp, entropy, lse, log_sum_sq, mean, top1, lse_lo), vocab


def combine(raw: torch.Tensor, labels: torch.Tensor | None, ignore_index: int, vocab_start: int, vocab_local: int,
            return_stats: bool, group) -> tuple[RowStats, int | None]:
    """The global RowStats of [N] rows from this rank's ``raw`` [N, K], over the ranks of ``group``: an
    all-reduce (max) of N floats, then an all-reduce (sum) of P·N + 1 (P = :func:`num_summed`).
    Returns V too (None off CPU, where reading it would be a host sync)."""
    global_max = raw[:, 0].contiguous()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    summed = pack(raw, global_max, labels, ignore_index, vocab_start, vocab_local, return_stats)
    dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
    return finish(global_max, summed, labels, ignore_index, return_stats)


def local_labels(labels: torch.Tensor, vocab_start: int, vocab_local: int, ignore_index: int) -> torch.Tensor:
    """Global label ids -> ids in this shard's columns; a label held by another shard becomes a negative
    value that is not ``ignore_index`` (it matches no column, so the backends give it no label term)."""
    outside = -2 if ignore_index == -1 else -1
    local = labels - vocab_start
    mine = (local >= 0) & (local < vocab_local)
    return torch.where(labels == ignore_index, labels, torch.where(mine, local, torch.full_like(local, outside)))
