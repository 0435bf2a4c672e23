"""The compiled (Inductor) route of the torch path (CPU) against the float64 reference, its fallback and its cache.

The route is forced on small shapes (``MALLOWSPO_FAST_TORCH_COMPILE=1``) so that the compilation stays
short; one vocabulary size per dtype keeps it to a few graphs for the whole file.
"""

from __future__ import annotations

import pytest
import torch

import mallowspo_fast as mpf
from mallowspo_fast.ops import cpu_native
from mallowspo_fast.ops import torch_path as tp
from mallowspo_fast.testing import GRAD_ATOL, VALUE_ATOL, ref_token

VOCAB = 300
pytestmark = pytest.mark.skipif(not tp._compiler_available(), reason="the compiled route needs a C++ compiler")


@pytest.fixture
def compiled(monkeypatch):
    monkeypatch.setenv(tp.COMPILE_ENV, "1")
    monkeypatch.setenv(cpu_native.NATIVE_ENV, "0")  # the Inductor loops, not the native ones (own tests)
    monkeypatch.setattr(tp._CompileState, "failed", None)
    return tp


def _inputs(dtype, batch=3, seq=9, seed=0, vocab=VOCAB):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, seq, vocab, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[:, ::4] = -100
    g, h = torch.randn(batch, seq, generator=gen), torch.randn(batch, seq, generator=gen)
    return logits, labels, g, h


def _check(out, grad, src, labels, g, h, temperature=1.0, grad_of=("logps", "entropy")):
    xr, ref_lp, ref_h = ref_token(src, labels, -100, temperature)
    dtype = src.dtype
    torch.testing.assert_close(out.logps.double(), ref_lp, atol=VALUE_ATOL[dtype], rtol=1e-5)
    torch.testing.assert_close(out.entropy.double(), ref_h, atol=VALUE_ATOL[dtype], rtol=1e-5)
    loss = sum((ref_lp if k == "logps" else ref_h) * (g if k == "logps" else h).double() for k in grad_of)
    loss.sum().backward()
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), xr.grad, atol=GRAD_ATOL[dtype], rtol=1e-2)


def _run(x, labels, g, h, temperature=1.0, inplace=False, grad_of=("logps", "entropy")):
    out = mpf.token_logprobs(x, labels, temperature=temperature, backend="torch", inplace_backward=inplace)
    loss = sum(getattr(out, k) * (g if k == "logps" else h) for k in grad_of)
    loss.sum().backward()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_values_and_grads_match_float64(compiled, dtype, monkeypatch):
    logits, labels, g, h = _inputs(dtype)
    logits[..., 250:] = float("-inf")  # padded vocabulary
    logits[0, 1] = float("-inf")  # a masked row of nothing but -inf
    labels[0, 1] = -100
    labels[labels >= 250] = 7
    x = logits.clone().requires_grad_(True)
    calls = []
    real = tp._call_compiled
    monkeypatch.setattr(tp, "_call_compiled", lambda name, *a, **kw: calls.append(name) or real(name, *a, **kw))
    out = _run(x, labels, g, h)
    assert calls == ["fwd", "bwd"], "the compiled route did not serve both passes"
    assert tp._CompileState.failed is None
    assert (x.grad[0, 1] == 0).all() and (x.grad[..., 250:] == 0).all()
    src = logits.clone()
    src[0, 1] = 0.0  # the float64 reference gives nan on an all -inf row, even masked; ours gives 0
    _check(out, x.grad, src, labels, g, h)


def test_temperature_strided_view_and_one_upstream_grad(compiled):
    logits, labels, g, h = _inputs(torch.float32)
    x = logits.clone().requires_grad_(True)
    view, lab = x[:, :-1], labels[:, 1:]  # rows of a batch element are not mergeable with the next one
    assert len(tp._row_blocks(view)) == 3
    out = _run(view, lab, g[:, 1:], h[:, 1:], temperature=0.7, grad_of=("entropy",))
    assert (x.grad[:, -1] == 0).all()
    _check(out, x.grad[:, :-1], logits[:, :-1], lab, g[:, 1:], h[:, 1:], temperature=0.7, grad_of=("entropy",))


def test_inplace_backward_writes_the_gradient_over_the_logits(compiled):
    logits, labels, g, h = _inputs(torch.float32)
    leaf = logits.clone().requires_grad_(True)
    y = leaf * 1.0
    out = _run(y, labels, g, h, inplace=True)
    _check(out, leaf.grad, logits, labels, g, h)


def test_new_row_counts_and_vocabularies_reuse_the_compiled_graphs(compiled):
    for seq in (5, 11):  # the first call may compile; then the row count and V are symbolic
        logits, labels, g, h = _inputs(torch.float32, batch=1, seq=seq, seed=seq)
        _run(logits.requires_grad_(True), labels, g, h)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for seq, vocab in ((6, VOCAB), (17, 777), (40, 4099), (1, 301)):  # seq = 1: one row, run as two
        logits, labels, g, h = _inputs(torch.float32, batch=1, seq=seq, seed=seq, vocab=vocab)
        x = logits.clone().requires_grad_(True)
        _check(_run(x, labels, g, h), x.grad, logits, labels, g, h)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == before


def test_compile_failure_falls_back_to_the_eager_chunks_with_one_warning(compiled, monkeypatch):
    def broken(name):
        raise RuntimeError("no working C++ toolchain")


    monkeypatch.setattr(tp, "_kernel", broken)
    logits, labels, g, h = _inputs(torch.float32)
    x = logits.clone().requires_grad_(True)
    with pytest.warns(RuntimeWarning, match="no working C.. toolchain"):
        out = _run(x, labels, g, h)
    assert tp._CompileState.failed is not None and not tp.use_compiled(logits)
    _check(out, x.grad, logits, labels, g, h)


def test_route_selection(monkeypatch):
    monkeypatch.setattr(tp._CompileState, "failed", None)
    small, big = torch.empty(1, 2, 8), torch.empty(1, 1, tp.COMPILE_MIN_VOCAB)
    monkeypatch.setenv(tp.COMPILE_ENV, "auto")
    assert not tp.use_compiled(small) and tp.use_compiled(big)
    # The route depends on V, never on the number of rows (batch invariance).
    assert tp.use_compiled(torch.empty(64, 9, tp.COMPILE_MIN_VOCAB)) and not tp.use_compiled(torch.empty(999, 99, 8))
    assert not tp.use_compiled(big.double()), "fp64 stays on the eager chunks"
    monkeypatch.setenv(tp.COMPILE_ENV, "0")
    assert not tp.use_compiled(big)
    monkeypatch.setenv(tp.COMPILE_ENV, "1")
    assert tp.use_compiled(small)
    monkeypatch.setattr(tp, "_compiler_available", lambda: False)
    assert not tp.use_compiled(small)
    monkeypatch.setenv(tp.COMPILE_ENV, "yes")
    with pytest.raises(ValueError, match="MALLOWSPO_FAST_TORCH_COMPILE must be one of .* got 'yes'"):
        tp.use_compiled(small)
