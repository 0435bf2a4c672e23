"""Fuzzed inputs of the memory-mode op (log-probs from hidden states and the output layer).

Valid inputs must match the float64 reference ``naive_token_logprobs(F.linear(hidden, weight, bias))``
in values and in the gradients of hidden, weight and bias; invalid ones must raise ValueError/TypeError
naming the argument or the position.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from fuzz_helpers import CLEAR_ERRORS, fuzz_pair
from hypothesis import strategies as st

from mallowspo_fast.ops.linear import linear_sequence_logprobs, linear_token_logprobs
from mallowspo_fast.ops.naive import naive_token_logprobs

VALUE_ATOL = {torch.float32: 2e-5, torch.float64: 1e-10, torch.bfloat16: 1e-4, torch.float16: 1e-4}
def _absmax(t: torch.Tensor) -> float:
    return float(t.detach().abs().max()) if t.numel() else 0.0


GRAD_ATOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 3e-2, torch.float16: 5e-3}


@st.composite
def linear_case(draw):
    b, t, h, v = draw(st.integers(0, 3)), draw(st.integers(0, 4)), draw(st.integers(1, 9)), draw(st.integers(1, 33))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    hidden = torch.randn(b, t + 1, h, generator=g).to(dtype)[:, :-1]  # the shifted view
    weight = (torch.randn(v, h, generator=g) / math.sqrt(h)).to(dtype)
    bias = torch.randn(v, generator=g).to(dtype) if draw(st.booleans()) else None
    labels = torch.randint(0, v, (b, t), generator=g)
    labels = labels.masked_fill(torch.rand(b, t, generator=g) < draw(st.sampled_from([0.0, 0.3, 1.0])), -100)
    return {"hidden": hidden, "weight": weight, "bias": bias, "labels": labels,
            "temperature": draw(st.sampled_from([1.0, 0.5, 3.0])), "chunk_size": draw(st.none() | st.integers(1, 5)),
            "backend": draw(st.sampled_from(["torch", "reference"])), "sequence": draw(st.booleans())}


def check_linear(case):
    leaves = [case["hidden"].detach().clone().requires_grad_(True), case["weight"].clone().requires_grad_(True)]
    bias = None if case["bias"] is None else case["bias"].clone().requires_grad_(True)
    ref_leaves = [x.detach().double().requires_grad_(True) for x in leaves]
    ref_bias = None if bias is None else bias.detach().double().requires_grad_(True)
    kw = {"bias": bias, "temperature": case["temperature"], "chunk_size": case["chunk_size"],
          "backend": case["backend"]}
    op = linear_sequence_logprobs if case["sequence"] else linear_token_logprobs
    out = op(*leaves, case["labels"], **kw)
    # float64 on the logits the op sees (rounded to the input dtype by the matmul), with the gradient flowing
    # on through hidden / weight / bias in float64 (straight through).
    exact = F.linear(ref_leaves[0], ref_leaves[1], ref_bias)
    rounded = F.linear(case["hidden"], case["weight"], case["bias"]).double()
    logits = exact + (rounded - exact).detach()
    logps, ent = naive_token_logprobs(logits, case["labels"], -100, case["temperature"], torch.float64)
    if case["sequence"]:
        n = (case["labels"] != -100).sum(-1)
        logps, ent = logps.sum(-1), ent.sum(-1) / n.clamp(min=1)
        assert torch.equal(out.num_tokens, n)
    dtype = case["hidden"].dtype
    # In fp16/bf16 the op may round the logits differently from F.linear (bias added after the matmul's
    # rounding, or fused): allow two units of the dtype's rounding of the largest logit.
    half = 2 * torch.finfo(dtype).eps * max(1.0, _absmax(rounded)) if dtype in (torch.float16, torch.bfloat16) else 0
    for o, r in zip((out.logps, out.entropy), (logps, ent)):
        assert o.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(o.double(), r, atol=VALUE_ATOL[dtype] * max(1.0, _absmax(r)) + half, rtol=1e-4)
    if out.logps.numel():
        g = torch.Generator().manual_seed(7)
        ups = [torch.randn(out.logps.shape, generator=g), torch.randn(out.logps.shape, generator=g)]
        torch.autograd.backward([out.logps, out.entropy], ups)
        torch.autograd.backward([logps, ent], [u.double() for u in ups])
        pairs = list(zip(leaves, ref_leaves)) + ([(bias, ref_bias)] if bias is not None else [])
        for mine, ref in pairs:
            got = mine.grad if mine.grad is not None else torch.zeros_like(mine)
            want = ref.grad if ref.grad is not None else torch.zeros_like(ref)
            scale = max(1.0, _absmax(want))
            torch.testing.assert_close(got.double(), want, atol=GRAD_ATOL[dtype] * scale, rtol=1e-3)


test_linear_valid, test_linear_valid_slow = fuzz_pair(case=linear_case())(check_linear)


@st.composite
def bad_linear(draw):
    kind = draw(st.sampled_from(["hidden_int", "weight_dtype", "weight_h", "labels_float", "labels_shape", "bias_shape",
                                 "label_range", "temperature", "chunk_size", "empty_vocab", "not_tensor"]))
    n, h, v = draw(st.integers(1, 4)), draw(st.integers(1, 6)), draw(st.integers(1, 10))
    hidden, weight, labels = torch.randn(n, h), torch.randn(v, h), torch.randint(0, v, (n,))
    kw = {"backend": draw(st.sampled_from(["torch", "reference"]))}
    if kind == "hidden_int":
        hidden, words = hidden.long(), ["hidden"]
    elif kind == "weight_dtype":
        weight, words = weight.double(), ["weight"]
    elif kind == "weight_h":
        weight, words = torch.randn(v, h + 1), ["weight"]
    elif kind == "labels_float":
        labels, words = labels.float(), ["labels"]
    elif kind == "labels_shape":
        labels, words = torch.randint(0, v, (n + 1,)), ["labels"]
    elif kind == "bias_shape":
        kw["bias"], words = torch.randn(v + 1), ["bias"]
    elif kind == "label_range":
        i = draw(st.integers(0, n - 1))
        labels[i], words = draw(st.sampled_from([v, v + 3, -1, -7])), [f"({i},)", "position"]
    elif kind == "temperature":
        kw["temperature"], words = draw(st.sampled_from([0.0, -2.0, math.nan, math.inf, True, "1"])), ["temperature"]
    elif kind == "chunk_size":
        kw["chunk_size"], words = draw(st.sampled_from([0, -1, 1.5, True, "4"])), ["chunk_size"]
    elif kind == "empty_vocab":
        weight, labels, words = torch.randn(0, h), torch.full((n,), -100), ["V = 0"]
    else:
        hidden, words = hidden.tolist(), ["hidden"]
    return kind, hidden, weight, labels, kw, words


def check_bad_linear(case):
    kind, hidden, weight, labels, kw, words = case
    try:
        linear_token_logprobs(hidden, weight, labels, **kw)
    except CLEAR_ERRORS as err:
        assert any(w in str(err) for w in words), (kind, str(err))
        return
    raise AssertionError(f"{kind}: accepted")


test_linear_invalid, test_linear_invalid_slow = fuzz_pair(case=bad_linear(), scale=2)(check_bad_linear)
