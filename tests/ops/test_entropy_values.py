"""The op without labels (``token_logprobs(logits, None)`` / ``token_entropy``): entropy and logsumexp of
every position against a float64 reference, values and gradients, on all three backends."""

from __future__ import annotations

import pytest
import torch

import mallowspo_fast as mpf
from mallowspo_fast.ops.naive import naive_token_entropy
from mallowspo_fast.testing import BACKENDS, DEVICE, DTYPE_NAMES, DTYPES, GRAD_ATOL, NO_LABELS_GRAD_FACTOR, VALUE_ATOL

ALL_BACKENDS = [*BACKENDS, "reference"]


def _ref(logits: torch.Tensor, temperature: float = 1.0):
    """float64 written out from the definition (not the code under test): H = -Σ p log p, lse."""
    x = logits.detach().double().requires_grad_(True)
    z = x / temperature
    lse = torch.logsumexp(z, -1)
    logp = z - lse.unsqueeze(-1)
    p = logp.exp()
    return x, -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1), lse


def _check(backend, logits, *, temperature=1.0, seed=0, upstream=("entropy", "lse"), inplace=False):
    """Values against the reference; gradients for random upstream grads on the chosen outputs."""
    dtype = logits.dtype
    gen = torch.Generator().manual_seed(seed)
    lead = logits.shape[:-1]
    h = torch.randn(lead, generator=gen).to(DEVICE)
    g = torch.randn(lead, generator=gen).to(DEVICE)
    x = logits.detach().clone().requires_grad_(True)
    inp = x.clone() if inplace else x  # in place: the op's input must be a buffer nothing else needs
    out = mpf.token_logprobs(inp, None, temperature=temperature, backend=backend, inplace_backward=inplace)
    assert isinstance(out, mpf.TokenEntropy)
    assert out.entropy.dtype == torch.float32 and out.lse.dtype == torch.float32
    assert out.entropy.shape == lead and out.lse.shape == lead
    xr, ref_h, ref_lse = _ref(logits, temperature)
    atol = VALUE_ATOL[dtype]
    torch.testing.assert_close(out.entropy.double(), ref_h, atol=atol, rtol=1e-5)
    torch.testing.assert_close(out.lse.double(), ref_lse, atol=atol, rtol=1e-5)
    loss = sum({"entropy": (out.entropy * h).sum(), "lse": (out.lse * g).sum()}[k] for k in upstream)
    ref_loss = sum({"entropy": (ref_h * h.double()).sum(), "lse": (ref_lse * g.double()).sum()}[k] for k in upstream)
    loss.backward()
    ref_loss.backward()
    return x.grad, xr.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("shape", [(7,), (1, 1, 7), (3, 5, 37), (2, 9, 257), (4, 3, 1000), (2, 2, 3, 33)], ids=str)
def test_values_and_grads(backend, dtype, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    logits = (torch.randn(shape, generator=gen) * 3).to(DEVICE, dtype)
    grad, ref_grad = _check(backend, logits)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), ref_grad, atol=GRAD_ATOL[dtype] * NO_LABELS_GRAD_FACTOR, rtol=1e-2)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("upstream", [("entropy",), ("lse",)], ids=lambda u: u[0] + "_only")
def test_single_output_gradients(backend, upstream):
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 4, 101, generator=gen).to(DEVICE)
    grad, ref_grad = _check(backend, logits, upstream=upstream)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("vocab", [32000, 128256])
def test_large_vocab_few_rows(backend, vocab):
    gen = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(1, 2, vocab, generator=gen) * 2).to(DEVICE, torch.bfloat16)
    grad, ref_grad = _check(backend, logits)
    torch.testing.assert_close(grad.double(), ref_grad, atol=GRAD_ATOL[torch.bfloat16], rtol=1e-2)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("temperature", [0.3, 2.5])
def test_temperature(backend, temperature):
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 6, 301, generator=gen).to(DEVICE)
    grad, ref_grad = _check(backend, logits, temperature=temperature)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_writes_the_gradient_into_the_logits(backend):
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 77, generator=gen).to(DEVICE)
    grad, ref_grad = _check(backend, logits, inplace=True)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_shifted_view_without_copy_and_token_entropy_alias(backend):
    gen = torch.Generator().manual_seed(1)
    full = torch.randn(3, 8, 129, generator=gen).to(DEVICE).requires_grad_(True)
    view = full[:, :-1]
    assert not view.is_contiguous()
    out = mpf.token_entropy(view, backend=backend)
    same = mpf.token_logprobs(view, None, backend=backend)
    assert torch.equal(out.entropy, same.entropy) and torch.equal(out.lse, same.lse)
    xr, ref_h, ref_lse = _ref(view)
    torch.testing.assert_close(out.entropy.double(), ref_h, atol=1e-5, rtol=1e-5)
    h = torch.randn(3, 7, generator=gen).to(DEVICE)
    (out.entropy * h).sum().backward()
    (ref_h * h.double()).sum().backward()
    torch.testing.assert_close(full.grad[:, :-1].double(), xr.grad, atol=1e-6, rtol=1e-4)
    assert torch.all(full.grad[:, -1] == 0)


@pytest.mark.parametrize("backend", BACKENDS)  # the naive fp32 reference loses digits at |z| ~ 1e4
def test_shift_invariance_and_large_logits(backend):
    gen = torch.Generator().manual_seed(6)
    base = torch.randn(4, 300, generator=gen, dtype=torch.float64)
    a = mpf.token_entropy(base.float().to(DEVICE), backend=backend)
    b = mpf.token_entropy((base + 1e4).float().to(DEVICE), backend=backend)
    # 1e4 + z in fp32 rounds z to ~1e-3: compare with the float64 entropy of the rounded inputs.
    _, ref_b, ref_lse_b = _ref((base + 1e4).float())
    torch.testing.assert_close(b.entropy.double().cpu(), ref_b, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(b.lse.double().cpu(), ref_lse_b, atol=2e-3, rtol=1e-6)
    torch.testing.assert_close(a.entropy.cpu(), b.entropy.cpu(), atol=2e-2, rtol=0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_minus_inf_logits(backend):
    """Padded-vocab columns at -inf: finite entropy, lse and gradient, exactly zero gradient there."""
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 3, 40, generator=gen)
    logits[..., 30:] = float("-inf")
    logits = logits.to(DEVICE)
    grad, _ = _check(backend, logits[..., :30].contiguous())
    x = logits.clone().requires_grad_(True)
    out = mpf.token_entropy(x, backend=backend)
    assert torch.isfinite(out.entropy).all() and torch.isfinite(out.lse).all()
    (out.entropy.sum() + out.lse.sum()).backward()
    assert torch.isfinite(x.grad).all()
    assert torch.all(x.grad[..., 30:] == 0)
    ref = mpf.token_entropy(logits[..., :30].contiguous(), backend=backend)
    torch.testing.assert_close(out.entropy, ref.entropy, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_empty_batch_and_determinism(backend):
    empty = mpf.token_entropy(torch.zeros(0, 5, 11, device=DEVICE, requires_grad=True), backend=backend)
    assert empty.entropy.shape == (0, 5) and empty.lse.shape == (0, 5)
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(3, 4, 300, generator=gen).to(DEVICE)
    a, b = mpf.token_entropy(logits, backend=backend), mpf.token_entropy(logits, backend=backend)
    assert torch.equal(a.entropy, b.entropy) and torch.equal(a.lse, b.lse)


def test_reference_helper_matches_the_definition():
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(3, 50, generator=gen, dtype=torch.float64)
    ent, lse = naive_token_entropy(logits, 0.8, compute_dtype=torch.float64)
    _, ref_h, ref_lse = _ref(logits, 0.8)
    torch.testing.assert_close(ent, ref_h.detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, ref_lse.detach(), atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "call, err, match",
    [
        (lambda: mpf.token_entropy(torch.zeros(3, 4, dtype=torch.int64)), TypeError, "float32/bfloat16"),
        (lambda: mpf.token_entropy(torch.tensor(1.0)), ValueError,
         r"expected logits \[..., V\] with V >= 1, got shape \(\)"),
        (lambda: mpf.token_entropy(torch.zeros(3, 4), temperature=0.0), ValueError, "temperature"),
        (lambda: mpf.token_entropy(torch.zeros(3, 4), backend="cuda"), ValueError, "backend"),
        (lambda: mpf.token_entropy([1.0, 2.0]), TypeError, "must be a tensor"),
        (lambda: mpf.sequence_logprobs(torch.zeros(2, 3, 4), None), ValueError, "labels are required"),
    ],
    ids=["int_logits", "zero_dim", "temperature", "backend", "not_tensor", "sequence_needs_labels"],
)
def test_errors(call, err, match):
    with pytest.raises(err, match=match):
        call()
