"""What callers of the op rely on beyond its values: results that are ordinary tensors (editable in place),
the output dtypes (float64 computed in float64), and ``torch.compile(fullgraph=True)`` of every entry point."""

from __future__ import annotations

import pytest
import torch

import mallowspo_fast as mpf
from mallowspo_fast.ops import torch_path as tp
from mallowspo_fast.testing import ref_token

ENTRY_POINTS = {
    "token_logprobs": lambda x, lab, **kw: mpf.token_logprobs(x, lab, **kw),
    "token_logprobs-stats": lambda x, lab, **kw: mpf.token_logprobs(x, lab, return_stats=True, **kw)[:2],
    "token_entropy": lambda x, lab, **kw: mpf.token_entropy(x, **kw),
    "sequence_logprobs": lambda x, lab, **kw: mpf.sequence_logprobs(x, lab, **kw)[:2],
    "linear_token_logprobs": lambda x, lab, **kw: mpf.linear_token_logprobs(
        x[..., :16], torch.eye(x.shape[-1], 16), lab, **kw),
}


def _inputs(vocab=40, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 5, vocab, generator=gen) * 2).to(dtype)
    labels = torch.randint(0, vocab, (2, 5), generator=gen)
    labels[0, 0] = -100
    return logits, labels


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_results_can_be_edited_in_place_and_still_backpropagate(name, backend):
    logits, labels = _inputs()
    x = logits.clone().requires_grad_(True)
    outs = ENTRY_POINTS[name](x, labels, backend=backend)
    first, second = outs[0], outs[1]
    assert first.data_ptr() != second.data_ptr()
    first[0] = 0.0  # the edit autograd refused on views of one shared buffer
    second.mul_(2.0)
    (first.sum() + second.sum()).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_dtypes_fp32_out_for_low_precision_and_float64_in_float64(backend):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        logits, labels = _inputs(dtype=dtype)
        assert mpf.token_logprobs(logits, labels, backend=backend).logps.dtype == torch.float32
    logits, labels = _inputs(vocab=5000, dtype=torch.float64)
    logits = logits * 20  # rows where fp32 arithmetic would lose digits
    x = logits.clone().requires_grad_(True)
    out = mpf.token_logprobs(x, labels, backend=backend, temperature=0.3)
    seq = mpf.sequence_logprobs(logits, labels, backend=backend)
    ent = mpf.token_entropy(logits, backend=backend)
    assert {out.logps.dtype, out.entropy.dtype, seq.logps.dtype, ent.entropy.dtype, ent.lse.dtype} == {torch.float64}
    xr, ref_lp, ref_h = ref_token(logits, labels, temperature=0.3)
    torch.testing.assert_close(out.logps, ref_lp, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out.entropy, ref_h, atol=1e-12, rtol=1e-12)
    (out.logps.sum() + out.entropy.sum()).backward()
    (ref_lp.sum() + ref_h.sum()).backward()
    assert x.grad.dtype == torch.float64
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-13, rtol=1e-12)


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_torch_compile_fullgraph_matches_eager(name, monkeypatch):
    monkeypatch.setattr(tp._CompileState, "failed", None)
    logits, labels = _inputs()
    torch._dynamo.reset()

    def loss(x, lab):
        outs = ENTRY_POINTS[name](x, lab)
        return outs[0].sum() + 0.5 * outs[1].sum()

    compiled = torch.compile(loss, fullgraph=True)
    xs = [logits.clone().requires_grad_(True) for _ in range(2)]
    got, want = compiled(xs[0], labels), loss(xs[1], labels)
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, atol=1e-6, rtol=1e-5)


def test_torch_compile_reports_out_of_range_labels_without_a_graph_break():
    logits, labels = _inputs()
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, lab: mpf.sequence_logprobs(x, lab).logps.sum(), fullgraph=True)
    compiled(logits, labels)
    labels[1, 3] = 40
    with pytest.raises(RuntimeError, match=r"labels must lie in \[0, 40\) or equal ignore_index"):
        compiled(logits, labels)
