"""The Triton backend's contract (``triton_path.forward`` / ``backward`` / ``sequence_reduce``) against the
float64 references of ``ops.naive``, called directly (no autograd Function in between). On a machine
without a GPU the kernels run under the Triton interpreter (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from mallowspo_fast.ops import triton_path
from mallowspo_fast.ops.transform import IDENTITY, LogitTransform
from mallowspo_fast.testing import (
    ALL_DTYPES,
    DEVICE,
    DTYPE_NAMES,
    GRAD_ATOL,
    GRAD_RTOL,
    VALUE_ATOL,
    VALUE_RTOL,
    ref_entropy,
    ref_stats,
    ref_token,
    sequence_labels,
    shifted_logits,
    transform_scales,
)

IGNORE = -100
DTYPES = ALL_DTYPES
TRANSFORMS = {
    "temperature": LogitTransform(temperature=0.7),
    "negative-scale": LogitTransform(temperature=1.3, logit_scale=-1.5),
    "softcap": LogitTransform(temperature=0.7, softcap=30.0, logit_scale=2.0),
}


def _close(actual, expected, dtype, scale=1.0, what=""):
    torch.testing.assert_close(actual.double(), expected.double(), atol=VALUE_ATOL[dtype] * scale,
                               rtol=VALUE_RTOL[dtype], msg=lambda m: f"{what}: {m}")


def _logits(shape, dtype, seed, scale=3.0):
    """[B, T + 1, V] logits; the tests use the shifted view [:, :-1] (no copy, row stride jumps)."""
    return shifted_logits(*shape, dtype, torch.Generator().manual_seed(seed), scale=scale)


def _labels(batch, seq, vocab, seed, mask_frac=0.3):
    """Labels whose first is V - 1, the last sequence all masked (from two sequences on)."""
    return sequence_labels(batch, seq, vocab, torch.Generator().manual_seed(seed + 1), mask_frac=mask_frac,
                           first_label=vocab - 1, mask_last_sequence=batch > 1)


def _reference(logits, labels, transform):
    """float64 leaf and (logps, entropy, lse, log Σp², mean z, is_top1) of the references, masked like the op."""
    lss, mean, top1 = ref_stats(logits, labels, IGNORE, transform)
    if labels is None:
        x, entropy, lse = ref_entropy(logits, transform=transform)
        return x, (None, entropy, lse, lss, mean, None)
    x, logps, entropy = ref_token(logits, labels, IGNORE, transform=transform)
    lse = torch.logsumexp(transform.apply(x.detach()), -1)
    return x, (logps, entropy, torch.where(labels != IGNORE, lse, 0.0), lss, mean, top1)


def _check(logits, labels, transform, return_stats=True, seed=0, inplace=False):
    """Forward and backward of the contract against float64 (values, stats, gradients). Returns the
    forward's RowStats."""
    dtype = logits.dtype
    vscale, gscale = transform_scales(logits, transform)
    out = triton_path.forward(logits, labels, IGNORE, transform, return_stats)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x, ref = _reference(logits, labels, transform)
    names = ("logps", "entropy", "lse", "log_sum_sq_probs", "mean_logits")
    for name, got, want in zip(names, out, ref):
        if want is None or (name in names[3:] and not return_stats):
            assert got is None, name
            continue
        assert got.dtype == acc and got.shape == logits.shape[:2], name
        _close(got, want, dtype, vscale, name)
    if return_stats and labels is not None:
        assert out.is_top1.dtype == torch.bool and torch.equal(out.is_top1, ref[5])
    else:
        assert out.is_top1 is None
    gen = torch.Generator().manual_seed(seed + 2)
    g, h = (torch.randn(logits.shape[:2], generator=gen).to(DEVICE) for _ in range(2))
    if labels is None:  # upstream grads on the entropies and on lse
        grad_args, loss = (None, h, g), (ref[1] * h.double() + ref[2] * g.double()).sum()
    else:
        grad_args, loss = (g, h, None), (ref[0] * g.double() + ref[1] * h.double()).sum()
    loss.backward()
    buffer = logits.clone() if inplace else logits
    grad = triton_path.backward(buffer, labels, out.lse, out.entropy, *grad_args, IGNORE, transform, inplace)
    assert grad.dtype == dtype and grad.shape == logits.shape
    if inplace:
        assert grad.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(grad.double(), x.grad, atol=GRAD_ATOL[dtype] * vscale * gscale,
                               rtol=GRAD_RTOL[dtype])
    return out


# ----------------------------------------------------------------------------------------- values


@pytest.mark.parametrize("vocab", [7, 37, 257, 1000, 32000])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES.get)
def test_values_stats_and_grads_on_a_shifted_view(dtype, vocab):
    full = _logits((3, 4 if vocab < 32000 else 2, vocab), dtype, seed=vocab)
    logits = full[:, :-1]
    assert not logits.is_contiguous()
    labels = _labels(*logits.shape, seed=vocab)
    _check(logits, labels, IDENTITY, seed=vocab)


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES.get)
def test_transforms(dtype, name):
    logits = _logits((2, 5, 300), dtype, seed=3)[:, :-1]
    _check(logits, _labels(2, 5, 300, seed=3), TRANSFORMS[name], seed=3)


@pytest.mark.parametrize("name", ["identity", "softcap"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES.get)
def test_without_labels_every_row_and_the_lse_grad(dtype, name):
    transform = TRANSFORMS.get(name, IDENTITY)
    _check(_logits((2, 3, 500), dtype, seed=4)[:, :-1], None, transform, seed=4)


@pytest.mark.parametrize("labels", ["labels", "no-labels"])
def test_stats_off_gives_the_same_bits_and_no_stats(labels):
    logits = _logits((2, 4, 3000), torch.bfloat16, seed=5)[:, :-1]
    lab = _labels(2, 4, 3000, seed=5) if labels == "labels" else None
    for transform in (IDENTITY, TRANSFORMS["softcap"]):
        off = _check(logits, lab, transform, return_stats=False)
        on = triton_path.forward(logits, lab, IGNORE, transform, True)
        for a, b in zip(off[:3], on[:3]):
            # The interpreter runs the same arithmetic in both; compiled code may contract differently.
            tol = {"atol": 0.0, "rtol": 0.0} if DEVICE == "cpu" else {"atol": 1e-6, "rtol": 1e-6}
            assert (a is None and b is None) or torch.testing.assert_close(a, b, **tol) is None


def test_large_vocab_128256():
    logits = _logits((1, 2, 128256), torch.bfloat16, seed=6)[:, :-1]
    labels = torch.tensor([[17, 128255]], device=DEVICE)
    _check(logits, labels, TRANSFORMS["softcap"], seed=6)


def test_outputs_are_separate_fresh_tensors():
    out = triton_path.forward(_logits((2, 3, 40), torch.float32, seed=7), _labels(2, 4, 40, seed=7), IGNORE,
                              IDENTITY, True)
    tensors = [t for t in out if t is not None]
    assert len(tensors) == 7 and all(t._base is None and t.is_contiguous() for t in tensors)
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == 7


# ------------------------------------------------------------------------------- masks and labels


@pytest.mark.parametrize("transform", [IDENTITY, TRANSFORMS["softcap"]], ids=["identity", "softcap"])
def test_masked_rows_are_not_read_and_give_zero(transform):
    """NaN in the masked rows' logits: nothing of it may reach the outputs or the gradient."""
    logits = _logits((2, 3, 50), torch.float32, seed=8)[:, :-1].contiguous()
    labels = torch.tensor([[3, IGNORE, 7], [IGNORE, IGNORE, IGNORE]], device=DEVICE)
    logits[labels == IGNORE] = float("nan")
    out = triton_path.forward(logits, labels, IGNORE, transform, True)
    masked = labels == IGNORE
    for t in out[:5]:
        assert torch.isfinite(t).all() and (t[masked] == 0).all()
    assert not out.is_top1[masked].any()
    g = torch.randn(2, 3, device=DEVICE)
    grad = triton_path.backward(logits, labels, out.lse, out.entropy, g, g, None, IGNORE, transform, False)
    assert (grad[masked] == 0).all() and torch.isfinite(grad).all()
    seq = triton_path.sequence_reduce(labels, out.logps, out.entropy, IGNORE)
    assert seq[2].tolist() == [2, 0] and seq[0][1] == 0 and seq[1][1] == 0


def test_out_of_range_labels_give_nan_and_leave_the_other_rows_exact():
    logits = _logits((1, 4, 60), torch.float32, seed=9)[:, :-1]
    labels = torch.tensor([[5, 60, -7, 10**6]], device=DEVICE)
    out = triton_path.forward(logits, labels, IGNORE, IDENTITY, True)
    assert torch.isnan(out.logps[0, 1:]).all() and not out.is_top1[0, 1:].any()
    _, ref = _reference(logits[:, :1], labels[:, :1], IDENTITY)
    _close(out.logps[:, :1], ref[0], torch.float32)
    assert torch.isfinite(out.entropy).all() and torch.isfinite(out.log_sum_sq_probs).all()


def test_neg_inf_logits_padded_vocab():
    logits = _logits((2, 3, 400), torch.float32, seed=10)[:, :-1].contiguous()
    logits[..., 350:] = float("-inf")
    logits[0, 1, :120] = float("-inf")
    labels = torch.tensor([[3, 200, 349], [IGNORE, 0, 17]], device=DEVICE)
    for transform in (IDENTITY, TRANSFORMS["temperature"]):
        out = _check(logits, labels, transform)
        assert torch.isfinite(out.logps).all() and torch.isfinite(out.log_sum_sq_probs).all()
        ones = torch.ones(2, 3, device=DEVICE)
        grad = triton_path.backward(logits, labels, out.lse, out.entropy, ones, ones, None, IGNORE, transform, False)
        assert (grad[..., 350:] == 0).all() and (grad[0, 1, :120] == 0).all()
    # The soft cap maps -inf to the finite -cap/T: a small but real probability, a zero slope.
    _check(logits, labels, TRANSFORMS["softcap"])


# ------------------------------------------------------------------------------------- extremes


def test_extreme_logits_and_shift_invariance():
    gen = torch.Generator().manual_seed(11)
    # Multiples of 2^-10 below 8: adding 64 is exact in fp32, so the shifted input is the same logits.
    base = (torch.randn(2, 4, 700, generator=gen) * 2).clamp(-7.9, 7.9).mul(1024).round().div(1024).to(DEVICE)
    labels = _labels(2, 4, 700, seed=11)
    a = triton_path.forward(base, labels, IGNORE, IDENTITY, True)
    b = triton_path.forward(base + 64.0, labels, IGNORE, IDENTITY, True)
    for name in ("logps", "entropy", "log_sum_sq_probs"):
        _close(getattr(b, name), getattr(a, name), torch.float32, what=name)
    _close(b.mean_logits, torch.where(labels != IGNORE, a.mean_logits + 64.0, 0.0), torch.float32)
    assert torch.equal(a.is_top1, b.is_top1)
    # |z| ~ 1e4: logp itself ~ 1e4 (relative tolerance), H near 0 (absolute).
    huge = (torch.randn(2, 4, 500, generator=gen) * 1e4).to(DEVICE)
    out = triton_path.forward(huge, labels[:, :4].clamp(max=499), IGNORE, IDENTITY, True)
    _, ref = _reference(huge, labels[:, :4].clamp(max=499), IDENTITY)
    torch.testing.assert_close(out.logps.double(), ref[0], atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(out.entropy.double(), ref[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.log_sum_sq_probs.double(), ref[3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.mean_logits.double(), ref[4], atol=1e-2, rtol=1e-5)
    assert torch.equal(out.is_top1, ref[5])


def test_softcap_saturation_values_grads_and_first_index_ties():
    """|pre·y| ~ 30: tanh is ±1 in every precision, so many columns tie at the cap; argmax takes the first."""
    transform = LogitTransform(softcap=30.0)
    gen = torch.Generator().manual_seed(12)
    # |y| >= 800 everywhere (|pre·y| > 26): no column sits where fp32 rounds tanh to ±1 and float64 not.
    y = torch.randn(2, 3, 300, generator=gen)
    logits = (torch.sign(y) * (800 + y.abs() * 1e3)).to(DEVICE)
    logits[0, :2] = -5e3
    logits[0, 0, 10] = logits[0, 0, 40] = 5e3  # both at +cap: the first is the argmax
    logits[0, 1, 20] = logits[0, 1, 40] = 5e3  # label 40 ties with column 20: not top-1
    first_positive = int((logits[1, 0] > 0).nonzero()[0])
    labels = torch.tensor([[10, 40, 7], [first_positive, IGNORE, 299]], device=DEVICE)
    out = _check(logits, labels, transform)
    assert out.is_top1[0, 0] and not out.is_top1[0, 1] and out.is_top1[1, 0]
    grad = triton_path.backward(logits, labels, out.lse, out.entropy, torch.ones(2, 3, device=DEVICE), None, None,
                                IGNORE, transform, False)
    # Saturated columns have a slope of 0 (up to e^{-2·pre·|y|}): no NaN, no inf.
    assert torch.isfinite(grad).all() and grad[0, 1].abs().max() < 1e-20
    # Ties across blocks of the online pass (fp32: 4096 columns a block): the earlier block wins.
    logits = torch.full((1, 2, 5000), -5e3, device=DEVICE)
    logits[..., 100] = logits[..., 4500] = 5e3
    out = triton_path.forward(logits, torch.tensor([[100, 4500]], device=DEVICE), IGNORE, transform, True)
    assert out.is_top1.tolist() == [[True, False]]


# ------------------------------------------------------------------------------------- backward


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("labels", ["labels", "no-labels"])
def test_inplace_backward_writes_the_same_gradient_into_the_logits(dtype, labels):
    full = _logits((2, 3, 300), dtype, seed=13)
    lab = _labels(2, 3, 300, seed=13) if labels == "labels" else None
    out = triton_path.forward(full[:, :-1], lab, IGNORE, TRANSFORMS["softcap"])
    g, h = torch.randn(2, 3, device=DEVICE), torch.randn(2, 3, device=DEVICE)
    grads = (g, h, None) if lab is not None else (None, h, g)
    new = triton_path.backward(full[:, :-1], lab, out.lse, out.entropy, *grads, IGNORE, TRANSFORMS["softcap"], False)
    buffer = full.clone()
    last = buffer[:, -1].clone()
    same = triton_path.backward(buffer[:, :-1], lab, out.lse, out.entropy, *grads, IGNORE, TRANSFORMS["softcap"],
                                True)
    assert same.data_ptr() == buffer.data_ptr() and torch.equal(same, new)
    assert torch.equal(buffer[:, -1], last), "the position outside the view is untouched"


def test_upstream_grads_as_expanded_views_and_other_dtypes():
    logits = _logits((3, 6, 200), torch.float32, seed=14)[:, :-1]
    labels = _labels(3, 6, 200, seed=14)
    out = triton_path.forward(logits, labels, IGNORE, IDENTITY)
    per_seq = torch.randn(3, 1, device=DEVICE)
    g, h = per_seq.expand(3, 6), (per_seq * 0.5).expand(3, 6)
    assert g.stride(1) == 0
    expected = triton_path.backward(logits, labels, out.lse, out.entropy, g.contiguous(), h.contiguous(), None,
                                    IGNORE, IDENTITY, False)
    got = triton_path.backward(logits, labels, out.lse, out.entropy, g, h, None, IGNORE, IDENTITY, False)
    assert torch.equal(got, expected)
    # Upstream grads of another float dtype are read as fp32 values.
    low = triton_path.backward(logits, labels, out.lse, out.entropy, g.bfloat16(), h.double(), None, IGNORE,
                               IDENTITY, False)
    ref = triton_path.backward(logits, labels, out.lse, out.entropy, g.bfloat16().float(), h, None, IGNORE,
                               IDENTITY, False)
    assert torch.equal(low, ref)


@pytest.mark.parametrize("which", ["logps", "entropy", "none"])
def test_backward_with_one_upstream_grad_or_none(which):
    logits = _logits((2, 3, 100), torch.float32, seed=15)[:, :-1]
    labels = _labels(2, 3, 100, seed=15)
    out = triton_path.forward(logits, labels, IGNORE, TRANSFORMS["softcap"])
    g = torch.randn(2, 3, device=DEVICE)
    grads = {"logps": (g, None), "entropy": (None, g), "none": (None, None)}[which]
    grad = triton_path.backward(logits, labels, out.lse, out.entropy, *grads, None, IGNORE, TRANSFORMS["softcap"],
                                False)
    x, ref = _reference(logits, labels, TRANSFORMS["softcap"])
    if which == "none":
        assert (grad == 0).all()
        return
    (ref[0 if which == "logps" else 1] * g.double()).sum().backward()
    torch.testing.assert_close(grad.double(), x.grad, atol=1e-5, rtol=1e-2)


# ------------------------------------------------------------------------------ sequence_reduce


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("seq", [5, 1500])
def test_sequence_reduce_in_the_dtype_of_its_inputs(dtype, seq):
    gen = torch.Generator().manual_seed(seq)
    labels = _labels(3, seq, 10, seed=seq, mask_frac=0.5)
    logps, entropy = (torch.randn(3, seq, generator=gen, dtype=torch.float64).to(DEVICE, dtype) for _ in range(2))
    logps, entropy = logps * (labels != IGNORE), entropy * (labels != IGNORE)
    out = triton_path.sequence_reduce(labels, logps, entropy, IGNORE)
    count = (labels != IGNORE).sum(-1)
    assert [t.dtype for t in out] == [dtype, dtype, torch.int64] and torch.equal(out[2], count)
    tol = {"atol": 1e-12, "rtol": 1e-12} if dtype == torch.float64 else {"atol": 1e-4, "rtol": 1e-5}
    torch.testing.assert_close(out[0].double(), logps.double().sum(-1), **tol)
    torch.testing.assert_close(out[1].double(), entropy.double().sum(-1) / count.clamp(min=1), **tol)
    again = triton_path.sequence_reduce(labels, logps, entropy, IGNORE)
    assert all(torch.equal(a, b) for a, b in zip(out, again)), "fixed summation order"


# ------------------------------------------------------------------------------------ edge cases


def test_empty_batch():
    logits = torch.zeros(0, 3, 10, device=DEVICE)
    labels = torch.zeros(0, 3, dtype=torch.long, device=DEVICE)
    out = triton_path.forward(logits, labels, IGNORE, IDENTITY, True)
    assert out.logps.shape == (0, 3) and out.is_top1.shape == (0, 3)
    assert triton_path.backward(logits, labels, out.lse, out.entropy, out.lse, None, None, IGNORE, IDENTITY,
                                False).shape == (0, 3, 10)
    assert triton_path.sequence_reduce(labels, out.logps, out.entropy, IGNORE)[0].shape == (0,)


def test_bad_input_raises_with_what_was_expected_and_found():
    logits = torch.zeros(2, 3, 10, device=DEVICE)
    with pytest.raises(ValueError, match=r"unit stride along V, got strides"):
        triton_path.forward(logits.transpose(1, 2), None, IGNORE, IDENTITY)
    with pytest.raises(TypeError, match=r"fp32/bf16/fp16/fp64 logits, got torch.int32"):
        triton_path.forward(logits.int(), None, IGNORE, IDENTITY)
    with pytest.raises(ValueError, match=r"logits \[B, T, V\], got shape \(6, 10\)"):
        triton_path.forward(logits.view(6, 10), None, IGNORE, IDENTITY)
    with pytest.raises(TypeError, match="expected int64 labels, got torch.int32"):
        triton_path.forward(logits, torch.zeros(2, 3, dtype=torch.int32, device=DEVICE), IGNORE, IDENTITY)
    with pytest.raises(ValueError, match=r"labels of shape \(2, 3\) \(the logits' \[B, T\]\), got \(3, 2\)"):
        triton_path.forward(logits, torch.zeros(3, 2, dtype=torch.long, device=DEVICE), IGNORE, IDENTITY)
    lse = torch.zeros(2, 3, device=DEVICE)
    with pytest.raises(ValueError, match="grad_lse is only supported without labels"):
        triton_path.backward(logits, torch.zeros(2, 3, dtype=torch.long), lse, lse, None, None, lse, IGNORE,
                             IDENTITY, False)
    with pytest.raises(TypeError, match="fp32 or fp64 logps and entropy of one dtype"):
        triton_path.sequence_reduce(torch.zeros(2, 3, dtype=torch.long), lse, lse.double(), IGNORE)
