"""Memory mode (hidden states + output layer -> log-probs) against float64 references and the
logits-level op: values and gradients of hidden, weight and bias."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mallowspo_fast as mpf
from mallowspo_fast.ops.linear import default_chunk_size
from mallowspo_fast.testing import (
    BACKENDS,
    DEVICE,
    DTYPE_NAMES,
    LINEAR_GRAD_REL,
    VALUE_ATOL,
    linear_inputs,
    random_labels,
    ref_linear,
)

DTYPES = [torch.float32, torch.bfloat16]


def _inputs(batch, seq, dim, vocab, dtype, *, bias=False, mask_frac=0.25, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden, weight, b = linear_inputs(batch, seq, dim, vocab, dtype, gen, bias=bias)
    labels = random_labels((batch, seq), vocab, mask_frac=mask_frac, generator=gen)
    return hidden, weight, b, labels


def _leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in ts]


def _assert_rel(actual, ref, rel, what):
    scale = ref.abs().max().clamp(min=1e-3)
    err = (actual.double() - ref).abs().max()
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel} x {scale:.3g}"


def _run_and_compare(backend, dtype, hidden, weight, bias, labels, *, sequence, temperature=1.0,
                     chunk_size=None, seed=1):
    h, w, b = _leaves(hidden, weight, bias)
    fn = mpf.linear_sequence_logprobs if sequence else mpf.linear_token_logprobs
    out = fn(h, w, labels, bias=b, temperature=temperature, chunk_size=chunk_size, backend=backend)
    rh, rw, rb, _, ref = ref_linear(hidden, weight, bias, labels, sequence=sequence, temperature=temperature)
    atol = VALUE_ATOL[dtype]
    torch.testing.assert_close(out.logps.double(), ref[0], atol=atol, rtol=1e-5)
    torch.testing.assert_close(out.entropy.double(), ref[1], atol=atol, rtol=1e-5)
    if sequence:
        assert torch.equal(out.num_tokens, ref[2])
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(out.logps.shape, generator=gen).to(DEVICE)
    e = torch.randn(out.logps.shape, generator=gen).to(DEVICE)
    (out.logps * g + out.entropy * e).sum().backward()
    (ref[0] * g.double() + ref[1] * e.double()).sum().backward()
    for name, got, want in (("hidden", h, rh), ("weight", w, rw), ("bias", b, rb)):
        if got is None:
            continue
        assert got.grad.dtype == dtype and got.grad.shape == got.shape
        _assert_rel(got.grad, want.grad, LINEAR_GRAD_REL[dtype], f"grad of {name}")
    return out, (h, w, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "batch,seq,dim,vocab,chunk_size",
    [(1, 1, 8, 7, None), (3, 5, 16, 37, 4), (2, 9, 24, 257, 5), (2, 3, 8, 1000, 1), (4, 7, 12, 130, None)],
    ids=lambda v: str(v),
)
def test_sequence_values_and_grads(backend, dtype, batch, seq, dim, vocab, chunk_size):
    hidden, weight, _, labels = _inputs(batch, seq, dim, vocab, dtype, seed=vocab)
    _run_and_compare(backend, dtype, hidden, weight, None, labels, sequence=True, chunk_size=chunk_size)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("backend", BACKENDS)
def test_token_2d_with_bias_and_temperature(backend, dtype):
    hidden, weight, bias, labels = _inputs(1, 23, 16, 61, dtype, bias=True, seed=3)
    _run_and_compare(backend, dtype, hidden[0], weight, bias, labels[0], sequence=False, temperature=0.7,
                     chunk_size=6)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_logits_level_op(backend, dtype):
    """Same numbers as the logits-level op of the same backend fed with F.linear's logits."""
    hidden, weight, bias, labels = _inputs(3, 6, 16, 300, dtype, bias=True, seed=7)
    h1, w1, b1 = _leaves(hidden, weight, bias)
    h2, w2, b2 = _leaves(hidden, weight, bias)
    ours = mpf.linear_sequence_logprobs(h1, w1, labels, bias=b1, temperature=1.3, chunk_size=4, backend=backend)
    theirs = mpf.sequence_logprobs(F.linear(h2, w2, b2), labels, temperature=1.3, backend=backend)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=VALUE_ATOL[dtype], rtol=1e-5)
    (ours.logps.sum() - 0.5 * ours.entropy.sum()).backward()
    (theirs.logps.sum() - 0.5 * theirs.entropy.sum()).backward()
    for got, want in ((h1, h2), (w1, w2), (b1, b2)):
        _assert_rel(got.grad, want.grad.double(), LINEAR_GRAD_REL[dtype], "grad vs logits-level op")


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_rows_enter_no_matmul(backend):
    """Masked rows of hidden are NaN: any read of them would poison the outputs or the gradients."""
    hidden, weight, _, labels = _inputs(2, 8, 16, 50, torch.float32, seed=11)
    masked = labels == -100
    assert masked.any() and not masked.all()
    poisoned = hidden.masked_fill(masked.unsqueeze(-1), float("nan"))
    h, w = _leaves(poisoned, weight)
    out = mpf.linear_sequence_logprobs(h, w, labels, chunk_size=3, backend=backend)
    assert torch.isfinite(out.logps).all() and torch.isfinite(out.entropy).all()
    (out.logps.sum() + out.entropy.sum()).backward()
    assert torch.isfinite(w.grad).all()
    assert torch.equal(h.grad[masked], torch.zeros_like(h.grad[masked]))
    # And the unmasked rows give what the clean input gives.
    h2, w2 = _leaves(hidden, weight)
    ref = mpf.linear_sequence_logprobs(h2, w2, labels, chunk_size=3, backend=backend)
    (ref.logps.sum() + ref.entropy.sum()).backward()
    torch.testing.assert_close(out.logps, ref.logps, atol=0, rtol=0)
    torch.testing.assert_close(w.grad, w2.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_and_empty(backend):
    hidden, weight, bias, labels = _inputs(2, 4, 8, 30, torch.float32, bias=True)
    h, w, b = _leaves(hidden, weight, bias)
    out = mpf.linear_sequence_logprobs(h, w, torch.full_like(labels, -100), bias=b, backend=backend)
    assert torch.equal(out.logps, torch.zeros(2)) and torch.equal(out.entropy, torch.zeros(2))
    assert torch.equal(out.num_tokens, torch.zeros(2, dtype=torch.int64))
    (out.logps.sum() + out.entropy.sum()).backward()
    for t in (h, w, b):
        assert torch.equal(t.grad, torch.zeros_like(t))
    h, w = _leaves(hidden[:0], weight)
    empty = mpf.linear_sequence_logprobs(h, w, labels[:0], backend=backend)
    assert empty.logps.shape == (0,) and empty.num_tokens.shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("used", ["logps", "entropy"])
def test_one_output_used(backend, used):
    hidden, weight, _, labels = _inputs(2, 5, 8, 40, torch.float32, seed=5)
    h1, w1 = _leaves(hidden, weight)
    h2, w2 = _leaves(hidden, weight)
    getattr(mpf.linear_sequence_logprobs(h1, w1, labels, chunk_size=3, backend=backend), used).sum().backward()
    getattr(mpf.sequence_logprobs(F.linear(h2, w2), labels, backend="reference"), used).sum().backward()
    _assert_rel(h1.grad, h2.grad.double(), LINEAR_GRAD_REL[torch.float32], "grad of hidden")
    _assert_rel(w1.grad, w2.grad.double(), LINEAR_GRAD_REL[torch.float32], "grad of weight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_and_shifted_view(backend):
    """A frozen output layer gets no gradient (its products are skipped); the shifted view
    hidden[:, :-1] works without a copy and its gradient lands in the base tensor."""
    hidden, weight, _, labels = _inputs(2, 7, 8, 40, torch.float32, seed=9)
    base = hidden.clone().requires_grad_(True)
    out = mpf.linear_sequence_logprobs(base[:, :-1], weight, labels[:, 1:], chunk_size=4, backend=backend)
    out.logps.sum().backward()
    assert weight.grad is None
    ref = base.detach().clone().requires_grad_(True)
    mpf.sequence_logprobs(F.linear(ref[:, :-1], weight), labels[:, 1:], backend="reference").logps.sum().backward()
    assert torch.equal(base.grad[:, -1], torch.zeros_like(base.grad[:, -1]))
    _assert_rel(base.grad, ref.grad.double(), LINEAR_GRAD_REL[torch.float32], "grad of hidden")


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_grad_accumulates_in_fp32(backend):
    """bf16: one row per chunk (23 partial products) and one chunk give the same weight gradient up to
    one bf16 rounding of the result; a bf16 running sum would drift by several units in the last place."""
    hidden, weight, _, labels = _inputs(1, 23, 16, 64, torch.bfloat16, mask_frac=0.0, seed=13)
    labels = torch.randint(0, 4, labels.shape, generator=torch.Generator().manual_seed(0))  # overlapping rows
    grads = []
    for chunk in (1, 23):
        h, w = _leaves(hidden, weight)
        out = mpf.linear_sequence_logprobs(h, w, labels, chunk_size=chunk, backend=backend)
        (out.logps.sum() + out.entropy.sum()).backward()
        grads.append(w.grad.float())
    ulp = torch.finfo(torch.bfloat16).eps * grads[1].abs()
    assert ((grads[0] - grads[1]).abs() <= ulp + 1e-30).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    hidden, weight, _, labels = _inputs(2, 6, 8, 70, torch.float32, seed=17)
    runs = []
    for _ in range(2):
        h, w = _leaves(hidden, weight)
        out = mpf.linear_sequence_logprobs(h, w, labels, chunk_size=5, backend=backend)
        (out.logps.sum() + out.entropy.sum()).backward()
        runs.append((out.logps, out.entropy, h.grad, w.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_reference_backend_matches_torch():
    hidden, weight, bias, labels = _inputs(2, 5, 8, 40, torch.float32, bias=True, seed=19)
    ref = mpf.linear_token_logprobs(hidden, weight, labels, bias=bias, backend="reference")
    ours = mpf.linear_token_logprobs(hidden, weight, labels, bias=bias, backend="torch")
    torch.testing.assert_close(ours.logps, ref.logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.entropy, ref.entropy, atol=1e-5, rtol=1e-5)


def test_default_chunk_size():
    # ~48 MiB of fp32 logits per chunk on CPU, ~256 MiB in multiples of 64 rows on accelerators.
    assert default_chunk_size(128256, "cpu") == 98
    assert default_chunk_size(32000, "cpu") == 393
    assert default_chunk_size(128256, "cuda") == 512
    assert default_chunk_size(10**7, "cuda") == 64
    assert default_chunk_size(7, "cpu") * 7 * 4 <= 48 * 2**20
