"""Fused log-softmax + label gather + entropy kernels (docs/kernels.md).

Row r of the flattened [B, T] token grid lives at ``b * stride_logits_b + t * stride_logits_t`` with
b = r // seq_len, t = r % seq_len, so shifted views such as ``logits[:, :-1]`` need no copy. All
offsets are int64: N·V beyond 2^31 elements is the normal case for long sequences and big vocabularies.

The kernels see the transformed logit z = post·tanh(pre·y) (HAS_SOFTCAP) or z = post·y of the raw logit
y, with pre and post runtime arguments (a new temperature or scale never recompiles). The accumulation
dtype ACC is that of the logits pointer: float64 for float64 logits, fp32 for everything else. It is
fixed by the pointer type, so float64 adds no compiled variant beyond the dtype itself. A Python float
reaches a kernel as fp32, so the multipliers come twice: ``pre``/``post`` (fp32) for the fp32 variants
and ``pre_fp64``/``post_fp64`` for the float64 ones. One fp64 pair for all would cost the fp32 variants
registers (the 64-bit scalar and its conversion) for nothing.
"""

import triton
import triton.language as tl


@triton.jit
def _tanh_sech2(x):
    """tanh(x) and its derivative 1 − tanh²(x), from e = e^{−2|x|} ∈ [0, 1]. The exponent is never
    positive, so nothing overflows and ±inf give exactly ±1 and 0. 1 − tanh² is taken as 4e/(1 + e)²
    rather than from tanh itself: where tanh rounds to ±1 (|x| > 9 in fp32), 1 − t² would cancel to 0
    while 4e/(1 + e)² keeps full relative precision."""
    e = tl.exp(-2.0 * tl.abs(x))
    r = 1.0 / (1.0 + e)
    t = (1.0 - e) * r
    return tl.where(x < 0, -t, t), 4.0 * e * r * r


@triton.jit(do_not_specialize=["seq_len", "vocab_size", "ignore_index", "pre", "post", "pre_fp64", "post_fp64"])
def _token_logprobs_fwd_kernel(
    logits_ptr,
    labels_ptr,
    logp_ptr,
    entropy_ptr,
    lse_ptr,
    lse_lo_ptr,
    log_sum_sq_probs_ptr,
    mean_logits_ptr,
    is_top1_ptr,
    raw_ptr,
    seq_len,
    vocab_size,
    stride_logits_b,
    stride_logits_t,
    stride_labels_b,
    stride_labels_t,
    ignore_index,
    pre,
    post,
    pre_fp64: tl.float64,
    post_fp64: tl.float64,
    HAS_LABELS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    RETURN_STATS: tl.constexpr,
    RETURN_RAW: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program per token: online softmax over V with three accumulators (running max m,
    s = Σ e^{z−m}, w = Σ e^{z−m}·(z−m)), the label logit picked up on the fly. Masked tokens read no
    logits. Writes logp, H and lse (contiguous [B·T], accumulation dtype). Without labels
    (HAS_LABELS=False: the entropy of every position) no row is masked and logp is not written.
    RETURN_STATS adds, in the same pass, q = Σ e^{2(z−m)} (log Σ p² = log q − 2 log s), Σ z (the mean
    logit) and, with labels, the first index of the max (is_top1 = label is that index).

    RETURN_RAW (a shard of a vocabulary split over ranks, docs/vocab-parallel.md) writes the row's raw
    accumulators instead, for an exact combination across shards: NUM_RAW = 4 (7 with RETURN_STATS)
    consecutive values per row at ``raw_ptr + row * NUM_RAW``: m, s, w, z[label] (0 when no column is the
    label) [, q, Σ z, the first index of the max (as a float; 0 without labels)]. Masked rows write zeros."""
    ACC: tl.constexpr = tl.float64 if logits_ptr.dtype.element_ty == tl.float64 else tl.float32
    NUM_RAW: tl.constexpr = 7 if RETURN_STATS else 4
    row = tl.program_id(0).to(tl.int64)
    b = row // seq_len
    t = row % seq_len
    if HAS_LABELS:
        label = tl.load(labels_ptr + b * stride_labels_b + t * stride_labels_t)
        if label == ignore_index:
            if RETURN_RAW:
                raw_cols = tl.arange(0, 8)
                tl.store(raw_ptr + row * NUM_RAW + raw_cols, tl.zeros((8,), ACC), mask=raw_cols < NUM_RAW)
            else:
                tl.store(logp_ptr + row, 0.0)
                tl.store(entropy_ptr + row, 0.0)
                tl.store(lse_ptr + row, 0.0)
                tl.store(lse_lo_ptr + row, 0.0)
                if RETURN_STATS:
                    tl.store(log_sum_sq_probs_ptr + row, 0.0)
                    tl.store(mean_logits_ptr + row, 0.0)
                    tl.store(is_top1_ptr + row, False)
            return
    row_ptr = logits_ptr + b * stride_logits_b + t * stride_logits_t
    if ACC == tl.float64:
        pre, post = pre_fp64, post_fp64
    cols = tl.arange(0, BLOCK_V)
    neg_inf = float("-inf")
    m = tl.full((), neg_inf, ACC)
    s = tl.zeros((), ACC)
    # w is kept relative to the running max: Σ p·z = m + w/s never subtracts two large numbers,
    # so H stays exact for |z| ~ 1e4 and under a constant shift of the logits.
    w = tl.zeros((), ACC)
    z_label = tl.zeros((), ACC)
    if RETURN_STATS:
        q = tl.zeros((), ACC)
        z_sum = tl.zeros((), ACC)
        argmax = tl.zeros((), tl.int32)
    for start in range(0, vocab_size, BLOCK_V):
        offs = start + cols
        in_row = offs < vocab_size
        y = tl.load(row_ptr + offs, mask=in_row, other=0.0).to(ACC)
        if HAS_SOFTCAP:
            z, _ = _tanh_sech2(pre * y)
            z = post * z
        else:
            z = y * post
        if RETURN_STATS:
            # Padding columns hold the transform of the 0 fill, 0: they add nothing to Σ z.
            z_sum += tl.sum(z, axis=0)
        # Padding columns are set to -inf after the transform: a negative scale or the soft cap
        # would turn a -inf fill value into +inf or a finite logit.
        z = tl.where(in_row, z, neg_inf)
        if HAS_LABELS:
            z_label += tl.sum(tl.where(offs == label, z, 0.0), axis=0)
        z_max = tl.max(z, axis=0)
        m_new = tl.maximum(m, z_max)
        # A block (or prefix) of only -inf keeps m_new = -inf: shift by 0 instead to avoid inf - inf.
        m_ref = tl.where(m_new == neg_inf, 0.0, m_new)
        alpha = tl.exp(m - m_ref)
        d = tl.where(m == neg_inf, 0.0, m - m_ref)
        e = tl.exp(z - m_ref)
        ez = e * tl.where(e > 0.0, z - m_ref, 0.0)
        w = alpha * (w + d * s) + tl.sum(ez, axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        if RETURN_STATS:
            # e² is e^{2(z−m)}: the same running max, rescaled by α². Terms that underflow are
            # negligible next to the largest, which contributes exactly 1.
            q = alpha * alpha * q + tl.sum(e * e, axis=0)
            if HAS_LABELS:
                # First index of the block's max; an earlier block keeps a tie (argmax: first wins).
                first = tl.min(tl.where(z == z_max, offs, vocab_size), axis=0)
                argmax = tl.where(z_max > m, first, argmax)
        m = m_new
    if RETURN_RAW:
        # The shard's accumulators as they are: the combination across shards rescales them to the
        # global max (m = -inf for a shard of only -inf logits, with s = w = q = 0).
        raw_row = raw_ptr + row * NUM_RAW
        tl.store(raw_row, m)
        tl.store(raw_row + 1, s)
        tl.store(raw_row + 2, w)
        tl.store(raw_row + 3, z_label)
        if RETURN_STATS:
            tl.store(raw_row + 4, q)
            tl.store(raw_row + 5, z_sum)
            if HAS_LABELS:
                tl.store(raw_row + 6, argmax.to(ACC))
            else:
                tl.store(raw_row + 6, tl.zeros((), ACC))
    else:
        # The per-row tail runs in float64 (a few operations per row, none per element), so that each result is
        # rounded once. lse rounded to ACC loses up to half an ulp of m (5e-4 at |z| ~ 1e4): keep what the
        # rounding left out for the backward's log p = (z − lse) − lse_lo, and form the log-prob from
        # (z[label] − m) directly.
        m64 = m.to(tl.float64)
        log_s = tl.log(s.to(tl.float64))
        lse64 = m64 + log_s
        lse = lse64.to(ACC)
        lse_lo = (lse64 - lse.to(tl.float64)).to(ACC)
        entropy = (log_s - w.to(tl.float64) / s.to(tl.float64)).to(ACC)
        if HAS_LABELS:
            # Out-of-range labels never match a column: report NaN rather than reading out of bounds.
            valid = (label >= 0) & (label < vocab_size)
            logp = tl.where(valid, ((z_label.to(tl.float64) - m64) - log_s).to(ACC), float("nan"))
            tl.store(logp_ptr + row, logp)
        tl.store(entropy_ptr + row, entropy)
        tl.store(lse_ptr + row, lse)
        tl.store(lse_lo_ptr + row, lse_lo)
        if RETURN_STATS:
            tl.store(log_sum_sq_probs_ptr + row, (tl.log(q.to(tl.float64)) - 2.0 * log_s).to(ACC))
            tl.store(mean_logits_ptr + row, (z_sum.to(tl.float64) / vocab_size).to(ACC))
            if HAS_LABELS:
                # A row of only -inf keeps argmax = 0, as torch.argmax does.
                top1 = valid & (argmax == label)
                tl.store(is_top1_ptr + row, top1)


@triton.jit(do_not_specialize=["seq_len", "vocab_size", "ignore_index", "pre", "post", "pre_fp64", "post_fp64"])
def _token_logprobs_bwd_kernel(
    logits_ptr,
    grad_logits_ptr,
    labels_ptr,
    lse_ptr,
    lse_lo_ptr,
    entropy_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    seq_len,
    vocab_size,
    stride_logits_b,
    stride_logits_t,
    stride_grad_b,
    stride_grad_t,
    stride_labels_b,
    stride_labels_t,
    stride_glogp_b,
    stride_glogp_t,
    stride_gent_b,
    stride_gent_t,
    ignore_index,
    pre,
    post,
    pre_fp64: tl.float64,
    post_fp64: tl.float64,
    HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """dL/dz_j = g·(1[j=y] − p_j) − h·p_j·(log p_j + H), times dz/dy: post, or post·pre·(1 − tanh²(pre·y))
    with the soft cap (recomputed from y, like p from the saved lse). One read of the logits and one
    write of the gradient per element; masked tokens only write zeros. The upstream grads are read
    through strides, so a per-sequence grad [B] broadcasts over T with a zero time stride.
    Without labels the label term drops out and the launcher passes g = −∂L/∂lse (∂lse/∂z_j = p_j)."""
    ACC: tl.constexpr = tl.float64 if logits_ptr.dtype.element_ty == tl.float64 else tl.float32
    row = tl.program_id(0).to(tl.int64)
    b = row // seq_len
    t = row % seq_len
    grad_row_ptr = grad_logits_ptr + b * stride_grad_b + t * stride_grad_t
    cols = tl.arange(0, BLOCK_V)
    if HAS_LABELS:
        label = tl.load(labels_ptr + b * stride_labels_b + t * stride_labels_t)
        if label == ignore_index:
            zeros = tl.zeros((BLOCK_V,), ACC)
            for start in range(0, vocab_size, BLOCK_V):
                offs = start + cols
                tl.store(grad_row_ptr + offs, zeros.to(grad_logits_ptr.dtype.element_ty), mask=offs < vocab_size)
            return
    row_ptr = logits_ptr + b * stride_logits_b + t * stride_logits_t
    if ACC == tl.float64:
        pre, post = pre_fp64, post_fp64
    lse = tl.load(lse_ptr + row)
    lse_lo = tl.load(lse_lo_ptr + row)
    if HAS_GRAD_LOGP:
        g = tl.load(grad_logp_ptr + b * stride_glogp_b + t * stride_glogp_t).to(ACC)
    else:
        g = 0.0
    if HAS_GRAD_ENTROPY:
        h = tl.load(grad_entropy_ptr + b * stride_gent_b + t * stride_gent_t).to(ACC)
        ent = tl.load(entropy_ptr + row)
    for start in range(0, vocab_size, BLOCK_V):
        offs = start + cols
        in_row = offs < vocab_size
        # Padding lanes are never stored: their fill value only has to keep the arithmetic quiet.
        y = tl.load(row_ptr + offs, mask=in_row, other=float("-inf")).to(ACC)
        if HAS_SOFTCAP:
            tanh, sech2 = _tanh_sech2(pre * y)
            z = post * tanh
        else:
            z = y * post
        logp = (z - lse) - lse_lo
        p = tl.exp(logp)
        if HAS_GRAD_ENTROPY:
            # p == 0 (a -inf logit) contributes nothing: zero its log first to avoid 0 * -inf.
            coef = g + h * (tl.where(p > 0.0, logp, 0.0) + ent)
            grad = -p * coef
        else:
            grad = -p * g
        if HAS_LABELS:
            grad = tl.where(offs == label, grad + g, grad)
        if HAS_SOFTCAP:
            grad = grad * (post * pre) * sech2
        else:
            grad = grad * post
        tl.store(grad_row_ptr + offs, grad.to(grad_logits_ptr.dtype.element_ty), mask=in_row)


@triton.jit(do_not_specialize=["seq_len", "ignore_index"])
def _sequence_reduce_kernel(
    labels_ptr,
    logp_ptr,
    entropy_ptr,
    seq_logp_ptr,
    seq_entropy_ptr,
    seq_count_ptr,
    seq_len,
    stride_labels_b,
    stride_labels_t,
    ignore_index,
    BLOCK_T: tl.constexpr,
):
    """Masked per-sequence sum of logp, mean of H (0 when empty) and token count, accumulated in the
    dtype of logp (float64 stays float64). One program per sequence, fixed summation order: bitwise
    deterministic (no float atomics)."""
    ACC: tl.constexpr = logp_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_T)
    acc_logp = tl.zeros((BLOCK_T,), ACC)
    acc_ent = tl.zeros((BLOCK_T,), ACC)
    acc_cnt = tl.zeros((BLOCK_T,), tl.int64)
    for start in range(0, seq_len, BLOCK_T):
        offs = start + cols
        in_seq = offs < seq_len
        label = tl.load(labels_ptr + b * stride_labels_b + offs * stride_labels_t, mask=in_seq,
                        other=ignore_index)
        keep = label != ignore_index
        acc_logp += tl.where(keep, tl.load(logp_ptr + b * seq_len + offs, mask=in_seq, other=0.0), 0.0)
        acc_ent += tl.where(keep, tl.load(entropy_ptr + b * seq_len + offs, mask=in_seq, other=0.0), 0.0)
        acc_cnt += keep.to(tl.int64)
    count = tl.sum(acc_cnt, axis=0)
    tl.store(seq_logp_ptr + b, tl.sum(acc_logp, axis=0))
    tl.store(seq_entropy_ptr + b, tl.sum(acc_ent, axis=0) / tl.maximum(count, 1).to(ACC))
    tl.store(seq_count_ptr + b, count)
