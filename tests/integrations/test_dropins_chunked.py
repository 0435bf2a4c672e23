"""The drop-in for TRL 1.16.0's ``trl.kernels.ChunkedLogProbFunction`` (``trl_utils.ChunkedLogProbFunction``)
against the real installed TRL class and against its definition written out below in float64: values,
gradients in hidden / weight / bias, soft cap, logit scale, temperature, the requested outputs, fp32 results
(float64 inputs computed in float64), is_top1 on ties, results edited in place."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from dropin_helpers import DTYPES, assert_rounded_once, upstream
from trl.kernels import ChunkedLogProbFunction as TRLChunked

from mallowspo_fast.integrations import trl_utils
from mallowspo_fast.integrations.trl_utils import OPTIONAL_OUTPUTS, ChunkedLogProbFunction

TRANSFORMS = [dict(temperature=1.0), dict(temperature=0.7, logit_scale=0.5),
              dict(temperature=1.3, softcap=4.0), dict(temperature=0.9, softcap=2.0, logit_scale=3.0)]


# --- TRL 1.16.0 trl/kernels/chunked_logprob.py::ChunkedLogProbFunction, in our words -------------------------
def chunked_definition(hidden, weight, bias, targets, temperature=1.0, softcap=None, logit_scale=1.0):
    """y = hidden @ weight.T + bias; z = softcap·tanh(logit_scale·y / softcap) / T (logit_scale·y / T without a
    soft cap). Per target t: log p_t = z_t − logsumexp z; entropy −Σ p log p; log Σ p²; the mean of z over
    V; is_top1 = (t == argmax z), the first index winning ties."""
    y = F.linear(hidden, weight, bias)
    z = softcap * torch.tanh(logit_scale * y / softcap) if softcap is not None else logit_scale * y
    z = z / temperature
    logp = z.log_softmax(-1)
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    log_sum_sq = torch.logsumexp(2 * logp, -1)
    return picked, entropy, log_sum_sq.detach(), z.mean(-1).detach(), z.argmax(-1) == targets


def head(dtype, n=11, dim=24, vocab=97, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = (scale * torch.randn(n, dim, generator=g, dtype=torch.float64)).to(dtype)
    weight = (torch.randn(vocab, dim, generator=g, dtype=torch.float64) / dim ** 0.5).to(dtype)
    bias = torch.randn(vocab, generator=g, dtype=torch.float64).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=g)
    return hidden, weight, bias, targets


def run(fn, hidden, weight, bias, targets, kw, outputs=OPTIONAL_OUTPUTS, edit=None):
    """fn.apply on leaf copies; backward of Σ u·logps + Σ v·entropy. Returns (outputs, grads)."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (hidden, weight, bias)]
    outs = fn.apply(*leaves, targets, kw.get("temperature", 1.0), 32, kw.get("softcap"),
                    kw.get("logit_scale", 1.0), outputs)
    logps, entropy = outs[0], outs[1]
    if edit is not None:  # results are ordinary tensors: edit them before the backward
        logps[edit] = 0.0
        entropy.mul_(2.0)
    loss = (logps * upstream(logps.shape).to(logps.dtype)).sum()
    if entropy is not None:
        loss = loss + (entropy * upstream(entropy.shape, seed=5).to(entropy.dtype)).sum()
    loss.backward()
    return outs, [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("kw", TRANSFORMS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("with_bias", (True, False))
def test_matches_trls_own_class_values_and_gradients(kw, dtype, with_bias):
    hidden, weight, bias, targets = head(dtype)
    bias = bias if with_bias else None
    ours, our_grads = run(ChunkedLogProbFunction, hidden, weight, bias, targets, kw)
    theirs, their_grads = run(TRLChunked, hidden, weight, bias, targets, kw)
    for name, a, b in zip(("log_probs",) + OPTIONAL_OUTPUTS, ours, theirs):
        assert a.dtype == b.dtype, name  # fp32 (bool for is_top1), whatever the inputs
        if name == "is_top1":
            assert torch.equal(a, b)
        else:  # TRL does its softmax arithmetic in fp32 even for float64 inputs
            torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=name)
    for a, b in zip(our_grads, their_grads):
        if b is not None:
            assert a.dtype == b.dtype == dtype
            torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_against_the_definition_in_float64(dtype):
    hidden, weight, bias, targets = head(dtype)
    kw = TRANSFORMS[3]
    outs, grads = run(ChunkedLogProbFunction, hidden, weight, bias, targets, kw)
    assert [t.dtype for t in outs] == [torch.float32] * 4 + [torch.bool]
    assert [g.dtype for g in grads] == [dtype] * 3
    # the definition on the same (rounded) inputs; bf16/fp16 products round the logits to the input dtype
    leaves = [t.detach().double().requires_grad_(True) for t in (hidden, weight, bias)]
    want = chunked_definition(*leaves, targets, **kw)
    # the upstream gradients as the drop-in received them (rounded to its fp32 results)
    (want[0] * upstream(want[0].shape).float()).sum().backward(retain_graph=True)
    (want[1] * upstream(want[1].shape, seed=5).float()).sum().backward()
    tol = dict(atol=2e-5, rtol=2e-5) if dtype in (torch.float32, torch.float64) else dict(atol=0.06, rtol=0.02)
    for got, exact in zip(outs[:4], want[:4]):
        if dtype == torch.float64:
            assert_rounded_once(got, exact)  # computed in float64, rounded to fp32 once
        else:
            torch.testing.assert_close(got.double(), exact, **tol)
    if dtype in (torch.float32, torch.float64):
        assert torch.equal(outs[4], want[4])
    # float64 inputs: every gradient (hidden, weight, bias) computed and accumulated in float64
    gtol = dict(atol=1e-10, rtol=1e-9) if dtype == torch.float64 else dict(tol, atol=3 * tol["atol"])
    for got, exact in zip(grads, leaves):
        torch.testing.assert_close(got.double(), exact.grad, **gtol)


def test_float64_inputs_are_computed_in_float64():
    """Logits far apart over a large vocabulary: fp32 arithmetic (TRL's, even for float64 inputs) is off by
    more than one fp32 rounding of the exact value; the drop-in is within it."""
    hidden, weight, bias, targets = head(torch.float64, n=6, vocab=5000, scale=5.0)
    exact = chunked_definition(hidden, weight, bias, targets, temperature=0.9)
    ours = ChunkedLogProbFunction.apply(hidden, weight, bias, targets, 0.9, 64)
    theirs = TRLChunked.apply(hidden, weight, bias, targets, 0.9, 64)
    for k in range(4):  # log-probs, entropy, log Σp², mean logit
        assert ours[k].dtype == theirs[k].dtype == torch.float32
        assert_rounded_once(ours[k], exact[k])
    for k in range(1, 4):
        with pytest.raises(AssertionError):
            assert_rounded_once(theirs[k], exact[k])


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("softcap", (None, 0.5))
def test_is_top1_counts_ties_as_argmax_does(dtype, softcap):
    """Rows 2, 5 and 9 of the weight are equal and give the largest logit: only the first (2) is the top-1,
    as argmax. With a small soft cap, tanh saturates and the capped logits tie exactly as well."""
    hidden, weight, bias, targets = head(torch.float64, n=8, vocab=16)
    top = hidden[0] / hidden[0].norm() * 10.0
    weight = weight.clone()
    weight[[2, 5, 9]] = top
    hidden = hidden.clone()
    hidden[:] = hidden[0]
    targets = torch.tensor([2, 5, 9, 0, 3, 2, 15, 9])
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    kw = dict(temperature=0.8, softcap=softcap)
    ours = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 0.8, 8, softcap)[4]
    theirs = TRLChunked.apply(hidden, weight, None, targets, 0.8, 8, softcap)[4]
    want = chunked_definition(hidden.double(), weight.double(), None, targets, **kw)[4]
    assert want.tolist()[:3] == [True, False, False]
    assert torch.equal(ours, want) and torch.equal(ours, theirs)


def test_outputs_not_requested_are_none_and_statistics_cost_nothing_unasked():
    hidden, weight, bias, targets = head(torch.float32)
    for outputs in [("log_probs",), ("entropy",), ("log_probs", "entropy", "is_top1"), ("mean_logits",), ()]:
        ours = ChunkedLogProbFunction.apply(hidden, weight, bias, targets, 1.0, 16, None, 1.0, outputs)
        theirs = TRLChunked.apply(hidden, weight, bias, targets, 1.0, 16, None, 1.0, outputs)
        assert [t is None for t in ours] == [t is None for t in theirs]
        torch.testing.assert_close(ours[0], theirs[0], atol=1e-5, rtol=1e-5)
    with mock.patch.object(trl_utils, "linear_token_logprobs", wraps=trl_utils.linear_token_logprobs) as op:
        ChunkedLogProbFunction.apply(hidden, weight, bias, targets, 1.0, 16, None, 1.0, ("entropy",))
        ChunkedLogProbFunction.apply(hidden, weight, bias, targets, 1.0, 16, None, 1.0, ("is_top1",))
    assert [c.kwargs["return_stats"] for c in op.call_args_list] == [False, True]


def test_results_can_be_edited_in_place_before_the_backward():
    hidden, weight, bias, targets = head(torch.float32)
    kw = TRANSFORMS[2]
    outs, grads = run(ChunkedLogProbFunction, hidden, weight, bias, targets, kw, edit=3)
    leaves = [t.detach().double().requires_grad_(True) for t in (hidden, weight, bias)]
    want = chunked_definition(*leaves, targets, **kw)
    up = upstream(want[0].shape)
    up[3] = 0.0
    ((want[0] * up).sum() + 2 * (want[1] * upstream(want[1].shape, seed=5)).sum()).backward()
    for got, exact in zip(grads, leaves):
        torch.testing.assert_close(got.double(), exact.grad, atol=5e-5, rtol=5e-5)


def test_ignored_targets_give_zero_and_bad_arguments_raise():
    hidden, weight, bias, targets = head(torch.float32)
    targets = targets.clone()
    targets[4] = -100
    outs = ChunkedLogProbFunction.apply(hidden, weight, bias, targets, 1.0, 16)
    assert outs[0][4] == 0 and outs[1][4] == 0 and not outs[4][4]
    with pytest.raises(ValueError, match=r"outputs must be among .*found \['entropies'\]"):
        ChunkedLogProbFunction.apply(hidden, weight, bias, targets, 1.0, 16, None, 1.0, ("entropies",))
    with pytest.raises(ValueError, match="expected a positive int chunk_size, found 0"):
        ChunkedLogProbFunction.apply(hidden, weight, bias, targets, 1.0, 0)
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        ChunkedLogProbFunction.apply(hidden, weight, bias, targets, -1.0, 16)
    targets[5] = 97
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 97\)"):
        ChunkedLogProbFunction.apply(hidden, weight, bias, targets, 1.0, 16)


def test_under_autocast_the_products_run_in_the_autocast_dtype_as_trls():
    hidden, weight, _, targets = head(torch.float32)
    results = []
    for fn in (ChunkedLogProbFunction, TRLChunked):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs, grads = run(fn, hidden, weight, None, targets, TRANSFORMS[1])
        results.append((outs, grads))
    (ours, our_grads), (theirs, their_grads) = results
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    exact = chunked_definition(hidden.double(), weight.double(), None, targets, **TRANSFORMS[1])[0]
    assert (ours[0].double() - exact).abs().max() > 1e-3  # bf16 products: not the fp32 result
    for a, b in zip(our_grads[:2], their_grads[:2]):
        assert a.dtype == b.dtype == torch.float32
        # the op rounds each chunk's hidden-state gradient to bf16 where TRL accumulates it in fp32
        torch.testing.assert_close(a, b, atol=5e-3, rtol=1e-2)
