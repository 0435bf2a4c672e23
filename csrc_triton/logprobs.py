"""Fused log-softmax + label gather + entropy kernels (KERNELS.md).

Row r of the flattened [B, T] token grid lives at ``b * stride_logits_b + t * stride_logits_t`` with
b = r // seq_len, t = r % seq_len, so shifted views such as ``logits[:, :-1]`` need no copy. All
offsets are int64: N·V beyond 2^31 elements is the normal case for long sequences and big vocabularies.
"""

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["seq_len", "vocab_size", "ignore_index", "inv_temp"])
def _token_logprobs_fwd_kernel(
    logits_ptr,
    labels_ptr,
    logp_ptr,
    entropy_ptr,
    lse_ptr,
    seq_len,
    vocab_size,
    stride_logits_b,
    stride_logits_t,
    stride_labels_b,
    stride_labels_t,
    ignore_index,
    inv_temp,
    HAS_LABELS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program per token: online softmax over V with three fp32 accumulators (running max m,
    s = Σ e^{z−m}, w = Σ e^{z−m}·(z−m)), the label logit picked up on the fly. Masked tokens read no
    logits. Writes logp, H and lse (fp32, contiguous [B·T]). Without labels (HAS_LABELS=False: the
    entropy of every position) no row is masked and only H and lse are written."""
    row = tl.program_id(0).to(tl.int64)
    b = row // seq_len
    t = row % seq_len
    if HAS_LABELS:
        label = tl.load(labels_ptr + b * stride_labels_b + t * stride_labels_t)
        if label == ignore_index:
            tl.store(logp_ptr + row, 0.0)
            tl.store(entropy_ptr + row, 0.0)
            tl.store(lse_ptr + row, 0.0)
            return
    row_ptr = logits_ptr + b * stride_logits_b + t * stride_logits_t
    cols = tl.arange(0, BLOCK_V)
    neg_inf = float("-inf")
    m = tl.full((), neg_inf, tl.float32)
    s = tl.zeros((), tl.float32)
    # w is kept relative to the running max: Σ p·z = m + w/s never subtracts two large numbers,
    # so H stays exact for |z| ~ 1e4 and under a constant shift of the logits.
    w = tl.zeros((), tl.float32)
    z_label = tl.zeros((), tl.float32)
    for start in range(0, vocab_size, BLOCK_V):
        offs = start + cols
        in_row = offs < vocab_size
        z = tl.load(row_ptr + offs, mask=in_row, other=neg_inf).to(tl.float32) * inv_temp
        if HAS_LABELS:
            z_label += tl.sum(tl.where(offs == label, z, 0.0), axis=0)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # A block (or prefix) of only -inf keeps m_new = -inf: shift by 0 instead to avoid inf - inf.
        m_ref = tl.where(m_new == neg_inf, 0.0, m_new)
        alpha = tl.exp(m - m_ref)
        d = tl.where(m == neg_inf, 0.0, m - m_ref)
        e = tl.exp(z - m_ref)
        ez = e * tl.where(e > 0.0, z - m_ref, 0.0)
        w = alpha * (w + d * s) + tl.sum(ez, axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new
    log_s = tl.log(s)
    lse = m + log_s
    entropy = log_s - w / s
    if HAS_LABELS:
        # Out-of-range labels never match a column: report NaN rather than reading out of bounds.
        valid = (label >= 0) & (label < vocab_size)
        logp = tl.where(valid, z_label - lse, float("nan"))
        tl.store(logp_ptr + row, logp)
    tl.store(entropy_ptr + row, entropy)
    tl.store(lse_ptr + row, lse)


@triton.jit(do_not_specialize=["seq_len", "vocab_size", "ignore_index", "inv_temp"])
def _token_logprobs_bwd_kernel(
    logits_ptr,
    grad_logits_ptr,
    labels_ptr,
    lse_ptr,
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
    inv_temp,
    HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """dL/dz_j = g·(1[j=y] − p_j) − h·p_j·(log p_j + H), times 1/T. One read of the logits and one
    write of the gradient per element; masked tokens only write zeros. The upstream grads are read
    through strides, so a per-sequence grad [B] broadcasts over T with a zero time stride.
    Without labels the label term drops out and the launcher passes g = −∂L/∂lse (∂lse/∂z_j = p_j)."""
    row = tl.program_id(0).to(tl.int64)
    b = row // seq_len
    t = row % seq_len
    grad_row_ptr = grad_logits_ptr + b * stride_grad_b + t * stride_grad_t
    cols = tl.arange(0, BLOCK_V)
    if HAS_LABELS:
        label = tl.load(labels_ptr + b * stride_labels_b + t * stride_labels_t)
        if label == ignore_index:
            zeros = tl.zeros((BLOCK_V,), tl.float32)
            for start in range(0, vocab_size, BLOCK_V):
                offs = start + cols
                tl.store(grad_row_ptr + offs, zeros.to(grad_logits_ptr.dtype.element_ty), mask=offs < vocab_size)
            return
    row_ptr = logits_ptr + b * stride_logits_b + t * stride_logits_t
    lse = tl.load(lse_ptr + row)
    if HAS_GRAD_LOGP:
        g = tl.load(grad_logp_ptr + b * stride_glogp_b + t * stride_glogp_t).to(tl.float32)
    else:
        g = 0.0
    if HAS_GRAD_ENTROPY:
        h = tl.load(grad_entropy_ptr + b * stride_gent_b + t * stride_gent_t).to(tl.float32)
        ent = tl.load(entropy_ptr + row)
    for start in range(0, vocab_size, BLOCK_V):
        offs = start + cols
        in_row = offs < vocab_size
        z = tl.load(row_ptr + offs, mask=in_row, other=float("-inf")).to(tl.float32) * inv_temp
        logp = z - lse
        p = tl.exp(logp)
        if HAS_GRAD_ENTROPY:
            # p == 0 (a -inf logit) contributes nothing: zero its log first to avoid 0 * -inf.
            coef = g + h * (tl.where(p > 0.0, logp, 0.0) + ent)
            grad = -p * coef
        else:
            grad = -p * g
        if HAS_LABELS:
            grad = tl.where(offs == label, grad + g, grad)
        grad = grad * inv_temp
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
    """Masked per-sequence sum of logp, mean of H (0 when empty) and token count. One program per
    sequence, fixed summation order: bitwise deterministic (no float atomics)."""
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_T)
    acc_logp = tl.zeros((BLOCK_T,), tl.float32)
    acc_ent = tl.zeros((BLOCK_T,), tl.float32)
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
    tl.store(seq_entropy_ptr + b, tl.sum(acc_ent, axis=0) / tl.maximum(count, 1).to(tl.float32))
    tl.store(seq_count_ptr + b, count)
