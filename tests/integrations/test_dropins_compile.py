"""``torch.compile(fullgraph=True)`` of every drop-in on CPU: no graph break, and values and gradients equal
to eager (users compile the loss functions that call them)."""

from __future__ import annotations

import pytest
import torch
from dropin_helpers import inputs

from mallowspo_fast.integrations import _common, openrlhf, trl_utils, verl
from mallowspo_fast.ops import torch_path

ROW_MASK = (torch.arange(15).view(3, 5) % 4 != 0).long()
TOPK = torch.tensor([[0, 7, 3]]).expand(3, 5, 3)


def _trl_chunked(x, lab):
    hidden, weight = x[..., :24], x[0, :, :24].repeat(5, 1)  # [3, 5, 24] and a [25, 24] weight built from x
    bias = x[1, 0, :25]
    out = trl_utils.ChunkedLogProbFunction.apply(hidden.reshape(15, 24), weight, bias, lab.reshape(15) % 25, 0.8,
                                                 16, 3.0, 0.5)
    return out[0], out[1], out[2], out[3], out[4]


# Each case: the drop-in called as a user's loss code would, returning its result tensors.
CASES = {
    "trl.selective_log_softmax": lambda x, lab: (trl_utils.selective_log_softmax(x, lab, 0.7, ROW_MASK),),
    "trl.selective_log_softmax-topk": lambda x, lab: (trl_utils.selective_log_softmax(x, TOPK, 1.3),),
    "trl.entropy_from_logits": lambda x, lab: (trl_utils.entropy_from_logits(x),),
    "trl.selective_log_softmax_and_entropy": lambda x, lab: trl_utils.selective_log_softmax_and_entropy(
        x, lab, True, 0.9, ROW_MASK),
    "trl.ChunkedLogProbFunction": _trl_chunked,
    "openrlhf.log_probs_from_logits": lambda x, lab: (openrlhf.log_probs_from_logits(x * 1, lab, 0.7),),
    "openrlhf.compute_entropy": lambda x, lab: (openrlhf.compute_entropy(x),),
    "openrlhf.masked_mean": lambda x, lab: (openrlhf.masked_mean(x[..., 0], ROW_MASK, -1),
                                            openrlhf.masked_mean(x[..., 1], None)),
    "verl.logprobs_from_logits": lambda x, lab: (verl.logprobs_from_logits(x * 1, lab),
                                                 verl.logprobs_from_logits(x, lab, inplace_backward=False)),
    "verl.entropy_from_logits": lambda x, lab: (verl.entropy_from_logits(x),),
    "verl.masked_sum": lambda x, lab: (verl.masked_sum(x[..., 0], ROW_MASK, -1), verl.masked_sum(x[..., 1], ROW_MASK)),
    "verl.masked_mean": lambda x, lab: (verl.masked_mean(x[..., 0], ROW_MASK.bool(), (0, 1)),
                                        verl.masked_mean(x[..., 1], ROW_MASK * 0, -1)),
}


def _loss(case):
    def loss(x, lab):
        outs = CASES[case](x, lab)
        total = sum((o.float() * (k + 1)).sum() for k, o in enumerate(outs) if o.is_floating_point())
        return total, outs
    return loss


@pytest.fixture
def fresh_dynamo(monkeypatch):
    monkeypatch.setattr(torch_path._CompileState, "failed", None)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# Every case on the peers' torch paths; verl's and OpenRLHF's log-prob functions also as they behave when
# flash-attn is installed (fp32 results; verl's in-place backward).
PARAMS = [(case, False) for case in CASES] + [("verl.logprobs_from_logits", True),
                                              ("openrlhf.log_probs_from_logits", True)]


@pytest.mark.parametrize(("case", "flash"), PARAMS, ids=[c + ("-flash-attn" if f else "") for c, f in PARAMS])
def test_compiles_fullgraph_and_matches_eager(case, flash, fresh_dynamo, monkeypatch):
    monkeypatch.setattr(_common, "FLASH_ATTN_INSTALLED", flash)
    logits, labels = inputs(torch.float32, vocab=40)
    loss = _loss(case)
    compiled = torch.compile(loss, fullgraph=True)
    xs = [logits.clone().requires_grad_(True) for _ in range(2)]
    (got, got_outs), (want, want_outs) = compiled(xs[0], labels), loss(xs[1], labels)
    for a, b in zip(got_outs, want_outs):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    got.backward()
    want.backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, atol=1e-6, rtol=1e-5)


def test_compiled_openrlhf_still_divides_the_callers_logits_in_place(fresh_dynamo):
    logits, labels = inputs(torch.bfloat16, vocab=40)
    x = logits.clone()
    compiled = torch.compile(lambda t, lab: openrlhf.log_probs_from_logits(t, lab, 0.7), fullgraph=True)
    out = compiled(x, labels)
    assert out.dtype == torch.bfloat16
    assert torch.equal(x, logits / 0.7)
    # Inductor may keep the divided logits in fp32 inside the fused graph: one bf16 ulp apart at most.
    torch.testing.assert_close(out, openrlhf.log_probs_from_logits(logits.clone(), labels, 0.7), atol=0,
                               rtol=2.0 ** -7)
