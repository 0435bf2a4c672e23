"""Forward and backward of the fused log-prob / entropy op against a float64 reference."""

from __future__ import annotations

import pytest
import torch

import mallowspo_fast as mpf
from mallowspo_fast.testing import (
    BACKENDS,
    DEVICE,
    DTYPE_NAMES,
    DTYPES,
    GRAD_ATOL,
    VALUE_ATOL,
    random_labels,
    ref_sequence,
    ref_token,
)


def _check_token(backend, logits, labels, *, temperature=1.0, ignore_index=-100, seed=0):
    dtype = logits.dtype
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(labels.shape, generator=gen).to(DEVICE)
    h = torch.randn(labels.shape, generator=gen).to(DEVICE)
    x = logits.detach().clone().requires_grad_(True) if logits.is_leaf else logits
    out = mpf.token_logprobs(x, labels, temperature=temperature, ignore_index=ignore_index, backend=backend)
    assert out.logps.dtype == torch.float32 and out.entropy.dtype == torch.float32
    assert out.logps.shape == labels.shape and out.entropy.shape == labels.shape
    xr, ref_lp, ref_h = ref_token(logits, labels, ignore_index, temperature)
    atol = VALUE_ATOL[dtype]
    torch.testing.assert_close(out.logps.double(), ref_lp, atol=atol, rtol=1e-5)
    torch.testing.assert_close(out.entropy.double(), ref_h, atol=atol, rtol=1e-5)
    (out.logps * g + out.entropy * h).sum().backward()
    (ref_lp * g.double() + ref_h * h.double()).sum().backward()
    grad = x.grad if x.is_leaf else None
    return grad, xr.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1, 7), (3, 5, 37), (2, 9, 257), (4, 3, 1000)], ids=str)
def test_small_shapes_values_and_grads(backend, dtype, shape):
    gen = torch.Generator().manual_seed(hash(shape) % 1000)
    logits = (torch.randn(shape, generator=gen) * 3).to(DEVICE, dtype)
    labels = random_labels(shape[:-1], shape[-1], generator=gen)
    grad, ref_grad = _check_token(backend, logits.requires_grad_(True), labels)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), ref_grad, atol=GRAD_ATOL[dtype], rtol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", [32000, 50257, 128256])
def test_large_vocab_few_rows(backend, dtype, vocab):
    gen = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(2, 2, vocab, generator=gen) * 2).to(DEVICE, dtype).requires_grad_(True)
    labels = torch.tensor([[5, vocab - 1], [-100, vocab // 2]], device=DEVICE)
    grad, ref_grad = _check_token(backend, logits, labels)
    torch.testing.assert_close(grad.double(), ref_grad, atol=GRAD_ATOL[dtype], rtol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shifted_noncontiguous_view(backend):
    """logits[:, :-1] (row stride jumps at batch boundaries) against labels[:, 1:], no copy needed."""
    gen = torch.Generator().manual_seed(1)
    full = torch.randn(3, 8, 129, generator=gen).to(DEVICE).requires_grad_(True)
    ids = torch.randint(0, 129, (3, 8), generator=gen).to(DEVICE)
    labels = ids.clone()
    labels[:, :3] = -100
    view, shifted = full[:, :-1], labels[:, 1:]
    assert not view.is_contiguous()
    seq = mpf.sequence_logprobs(view, shifted, backend=backend)
    xr, (ref_lp, ref_h, ref_n) = ref_sequence(view, shifted)
    torch.testing.assert_close(seq.logps.double(), ref_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seq.entropy.double(), ref_h, atol=1e-5, rtol=1e-5)
    assert torch.equal(seq.num_tokens.cpu(), ref_n.cpu())
    g, h = torch.randn(3, generator=gen).to(DEVICE), torch.randn(3, generator=gen).to(DEVICE)
    (seq.logps * g + seq.entropy * h).sum().backward()
    (ref_lp * g.double() + ref_h * h.double()).sum().backward()
    torch.testing.assert_close(full.grad[:, :-1].double(), xr.grad, atol=1e-6, rtol=1e-4)
    assert torch.all(full.grad[:, -1] == 0), "the dropped last position gets no gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_last_dim_stride_not_one_is_copied(backend):
    base = torch.randn(40, 6, device=DEVICE)
    logits = base.t()  # [6, 40] with stride (1, 6)
    labels = torch.arange(6, device=DEVICE)
    out = mpf.token_logprobs(logits, labels, backend=backend)
    _, ref_lp, ref_h = ref_token(logits, labels)
    torch.testing.assert_close(out.logps.double(), ref_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.entropy.double(), ref_h, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.3, 2.5])
def test_temperature(backend, temperature):
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 6, 301, generator=gen).to(DEVICE).requires_grad_(True)
    labels = random_labels((2, 6), 301, generator=gen)
    grad, ref_grad = _check_token(backend, logits, labels, temperature=temperature)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index(backend):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 50, generator=gen).to(DEVICE).requires_grad_(True)
    labels = torch.randint(0, 50, (2, 5), generator=gen).to(DEVICE)
    labels[0, 1] = 7
    grad, ref_grad = _check_token(backend, logits, labels, ignore_index=7)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=1e-4)
    assert torch.all(grad[labels == 7] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_rows_and_sequences(backend, dtype):
    logits = torch.randn(3, 4, 33, device=DEVICE).to(dtype).requires_grad_(True)
    labels = torch.full((3, 4), -100, device=DEVICE)
    labels[1, 2] = 4  # one sequence with a single token, two fully masked sequences
    seq = mpf.sequence_logprobs(logits, labels, backend=backend)
    assert torch.isfinite(seq.logps).all() and torch.isfinite(seq.entropy).all()
    assert seq.logps[0] == 0 and seq.entropy[0] == 0 and seq.logps[2] == 0 and seq.entropy[2] == 0
    assert seq.num_tokens.tolist() == [0, 1, 0]
    (seq.logps.sum() + seq.entropy.sum()).backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.all(logits.grad[0] == 0) and torch.all(logits.grad[2] == 0)
    assert torch.all(logits.grad[1, [0, 1, 3]] == 0) and logits.grad[1, 2].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_neg_inf_logits_padded_vocab(backend):
    """Padded vocab entries at -inf: finite logp/H, exact zero gradient on them, no NaN."""
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 70, generator=gen).to(DEVICE)
    logits[..., 60:] = float("-inf")
    logits[0, 1, :30] = float("-inf")
    logits.requires_grad_(True)
    labels = torch.tensor([[3, 40, 59], [0, -100, 11]], device=DEVICE)
    grad, ref_grad = _check_token(backend, logits, labels)
    assert torch.isfinite(grad).all()
    assert torch.all(grad[..., 60:] == 0)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1.0, 1e4], ids=["normal", "extreme"])
def test_shift_invariance_and_extreme_logits(backend, scale):
    gen = torch.Generator().manual_seed(5)
    logits = (torch.randn(2, 4, 500, generator=gen) * scale).to(DEVICE)
    labels = random_labels((2, 4), 500, generator=gen)
    shifted = logits + 100.0
    a = mpf.token_logprobs(logits, labels, backend=backend)
    b = mpf.token_logprobs(shifted, labels, backend=backend)
    for x, out in ((logits, a), (shifted, b)):
        _, ref_lp, ref_h = ref_token(x, labels)
        assert torch.isfinite(out.logps).all() and torch.isfinite(out.entropy).all()
        # |logp| itself may be ~1e4 here: relative tolerance on the value, absolute on the entropy.
        torch.testing.assert_close(out.logps.double(), ref_lp, atol=1e-4, rtol=1e-6)
        torch.testing.assert_close(out.entropy.double(), ref_h, atol=1e-5, rtol=1e-5)
    # The shifted input differs only by the fp32 rounding of z + 100 (ulp/2 ~ 4e-6).
    torch.testing.assert_close(a.entropy, b.entropy, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_outputs_and_grads(backend, dtype):
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(4, 11, 97, generator=gen).to(DEVICE, dtype).requires_grad_(True)
    labels = random_labels((4, 11), 97, mask_frac=0.4, generator=gen)
    labels[2] = -100
    seq = mpf.sequence_logprobs(logits, labels, backend=backend)
    xr, (ref_lp, ref_h, ref_n) = ref_sequence(logits, labels)
    torch.testing.assert_close(seq.logps.double(), ref_lp, atol=VALUE_ATOL[dtype] * 11, rtol=1e-5)
    torch.testing.assert_close(seq.entropy.double(), ref_h, atol=VALUE_ATOL[dtype], rtol=1e-5)
    assert seq.num_tokens.dtype == torch.int64 and torch.equal(seq.num_tokens.cpu(), ref_n.cpu())
    g, h = torch.randn(4, generator=gen).to(DEVICE), torch.randn(4, generator=gen).to(DEVICE)
    (seq.logps * g + seq.entropy * h).sum().backward()
    (ref_lp * g.double() + ref_h * h.double()).sum().backward()
    torch.testing.assert_close(logits.grad.double(), xr.grad, atol=GRAD_ATOL[dtype], rtol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["logps", "entropy"])
def test_gradient_of_one_output_only(backend, which):
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 5, 64, generator=gen).to(DEVICE).requires_grad_(True)
    labels = random_labels((2, 5), 64, generator=gen)
    out = mpf.token_logprobs(logits, labels, backend=backend)
    getattr(out, which).sum().backward()
    xr, ref_lp, ref_h = ref_token(logits, labels)
    (ref_lp if which == "logps" else ref_h).sum().backward()
    torch.testing.assert_close(logits.grad.double(), xr.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_matches(backend):
    gen = torch.Generator().manual_seed(8)
    base = torch.randn(2, 6, 80, generator=gen).to(DEVICE)
    labels = random_labels((2, 6), 80, generator=gen)
    weights = torch.randn(2, generator=gen).to(DEVICE)
    expected = None
    for inplace in (False, True):
        leaf = base.clone().requires_grad_(True)
        logits = leaf * 1.0  # a non-leaf whose buffer the in-place backward may overwrite
        seq = mpf.sequence_logprobs(logits, labels, backend=backend, inplace_backward=inplace)
        (seq.logps * weights + seq.entropy).sum().backward()
        if expected is None:
            expected = leaf.grad.clone()
        else:
            torch.testing.assert_close(leaf.grad, expected, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_bitwise(backend):
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(3, 7, 333, generator=gen).to(DEVICE)
    labels = random_labels((3, 7), 333, generator=gen)
    grads, outs = [], []
    for _ in range(2):
        x = logits.clone().requires_grad_(True)
        seq = mpf.sequence_logprobs(x, labels, backend=backend)
        (seq.logps.sum() + seq.entropy.sum()).backward()
        outs.append((seq.logps, seq.entropy))
        grads.append(x.grad)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_with_each_other(backend):
    gen = torch.Generator().manual_seed(10)
    logits = torch.randn(2, 9, 150, generator=gen).to(DEVICE)
    labels = random_labels((2, 9), 150, generator=gen)
    ours = mpf.sequence_logprobs(logits, labels, backend=backend)
    ref = mpf.sequence_logprobs(logits, labels, backend="reference")
    torch.testing.assert_close(ours.logps, ref.logps, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ours.entropy, ref.entropy, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    logits = torch.randn(0, 5, 10, device=DEVICE, requires_grad=True)
    labels = torch.zeros(0, 5, dtype=torch.long, device=DEVICE)
    seq = mpf.sequence_logprobs(logits, labels, backend=backend)
    assert seq.logps.shape == (0,) and seq.num_tokens.shape == (0,)
    tok = mpf.token_logprobs(logits, labels, backend=backend)
    assert tok.logps.shape == (0, 5)
    (tok.logps.sum() + tok.entropy.sum()).backward()
    assert logits.grad.shape == logits.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_of_any_rank(backend):
    logits = torch.randn(2, 3, 4, 21, device=DEVICE)
    labels = torch.randint(0, 21, (2, 3, 4), device=DEVICE)
    out = mpf.token_logprobs(logits, labels, backend=backend)
    _, ref_lp, _ = ref_token(logits, labels)
    assert out.logps.shape == (2, 3, 4)
    torch.testing.assert_close(out.logps.double(), ref_lp, atol=1e-5, rtol=1e-5)
