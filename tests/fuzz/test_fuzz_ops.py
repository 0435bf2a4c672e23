"""Fuzzed inputs of the fused log-prob / entropy op: shapes, strides, dtypes, labels, masks, ±inf, NaN.

Valid inputs must match the float64 reference (values and gradients, per-dtype tolerances) on the torch
and reference backends, and on the Triton backend under the interpreter for a few small examples.
Invalid ones must raise ValueError/TypeError naming the argument or the position.

Non-finite logits (the op contract): −inf logits are supported (a padded vocabulary); a token whose
unmasked row holds NaN or +inf gets a NaN entropy and a log-prob that is NaN or −inf, never a finite
number, and its gradient row is not finite; every other token is unaffected; masked rows are never read.
"""

from __future__ import annotations

import math

import torch
from fuzz_helpers import CLEAR_ERRORS, fuzz_pair
from hypothesis import strategies as st

from mallowspo_fast.ops.logprobs import sequence_logprobs, token_logprobs
from mallowspo_fast.ops.naive import naive_sequence_logprobs, naive_token_logprobs

VALUE_ATOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1e-4, torch.float16: 1e-4}
GRAD_ATOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 8e-3, torch.float16: 1e-3}
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LAYOUTS = ["contiguous", "transposed", "shifted", "expanded", "strided_vocab"]


def _layout(values: torch.Tensor, layout: str) -> torch.Tensor:
    """A view with ``values``' content in the given memory layout (values is [B, T, V])."""
    b, t, v = values.shape
    if layout == "transposed":
        return values.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "shifted":
        big = torch.zeros(b, t + 1, v, dtype=values.dtype)
        big[:, :-1] = values
        return big[:, :-1]
    if layout == "expanded" and b > 0:
        return values[:1].expand(b, t, v)
    if layout == "strided_vocab":
        big = torch.zeros(b, t, 2 * v, dtype=values.dtype)
        big[..., ::2] = values
        return big[..., ::2]
    return values.contiguous()


@st.composite
def op_case(draw, backends=("torch", "reference"), max_v=40, nonfinite=False):
    b, t, v = draw(st.integers(0, 3)), draw(st.integers(0, 4)), draw(st.integers(1, max_v))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.1, 1.0, 8.0]))
    values = (torch.randn(b, t, v, generator=g) * scale).to(dtype)
    ignore_index = draw(st.sampled_from([-100, -1, 0, v - 1]))
    labels = torch.randint(0, v, (b, t), generator=g)
    mask_mode = draw(st.sampled_from(["some", "none", "all"]))
    if mask_mode == "all":
        labels.fill_(ignore_index)
    elif mask_mode == "some":
        labels = labels.masked_fill(torch.rand(b, t, generator=g) < 0.3, ignore_index)
    if values.numel() and draw(st.booleans()):  # -inf logits: a padded vocabulary
        values.view(-1, v)[:, torch.rand(v, generator=g) < 0.3] = float("-inf")
        values.view(-1, v)[:, 0] = torch.randn(1).to(dtype)  # keep one finite logit per row
    poisoned = []
    if nonfinite and values.numel():
        for _ in range(draw(st.integers(1, 3))):
            i, j, k = draw(st.integers(0, b - 1)), draw(st.integers(0, t - 1)), draw(st.integers(0, v - 1))
            values[i, j, k] = draw(st.sampled_from([float("nan"), float("inf")]))
            poisoned.append((i, j))
    layout = draw(st.sampled_from(LAYOUTS))
    return {
        "values": values, "labels": labels, "layout": layout, "ignore_index": ignore_index,
        "rank": draw(st.sampled_from([3, 3, 4, 2])),
        "temperature": draw(st.sampled_from([1.0, 0.3, 2.5])), "backend": draw(st.sampled_from(backends)),
        "sequence": draw(st.booleans()), "inplace": layout != "expanded" and draw(st.booleans()),
        "poisoned": poisoned, "seed": seed,
    }


def _run(case):
    """(outputs, logits grad, reference outputs, reference grad) with random upstream gradients."""
    base = case["values"].clone().requires_grad_(True)
    logits = _layout(base, case["layout"])
    if case["inplace"]:
        logits = logits * 1  # a non-leaf buffer the backward may overwrite
    kwargs = {"ignore_index": case["ignore_index"], "temperature": case["temperature"], "backend": case["backend"]}
    labels = case["labels"]
    x = case["values"].detach().double().requires_grad_(True)
    xv = _layout(x, case["layout"])  # the same view of the float64 values (expanded: row 0 everywhere)
    if not case["sequence"] and case["rank"] != 3:  # [1, B, T, V] or [B*T, V] inputs of token_logprobs
        reshape = (lambda t: t.unsqueeze(0)) if case["rank"] == 4 else (lambda t: t.flatten(0, 1))
        logits, xv, labels = reshape(logits), reshape(xv), reshape(labels)
    if case["sequence"]:
        out = sequence_logprobs(logits, labels, inplace_backward=case["inplace"], **kwargs)
        ref = naive_sequence_logprobs(xv, labels, case["ignore_index"], case["temperature"], torch.float64)
        outs, refs = (out.logps, out.entropy), ref[:2]
        assert torch.equal(out.num_tokens, ref[2])
    else:
        out = token_logprobs(logits, labels, inplace_backward=case["inplace"], **kwargs)
        outs = (out.logps, out.entropy)
        refs = naive_token_logprobs(xv, labels, case["ignore_index"], case["temperature"], torch.float64)
    if not case["sequence"]:
        outs, refs = [o.reshape(case["labels"].shape) for o in outs], [r.reshape(case["labels"].shape) for r in refs]
    g = torch.Generator().manual_seed(case["seed"] + 1)
    ups = [torch.randn(o.shape, generator=g) for o in outs]
    if outs[0].numel():
        torch.autograd.backward(list(outs), ups)
        torch.autograd.backward(list(refs), [u.double() for u in ups])
    grad = base.grad if base.grad is not None else torch.zeros_like(base)
    rgrad = x.grad if x.grad is not None else torch.zeros_like(x)
    return outs, grad, refs, rgrad


def check_valid(case):
    outs, grad, refs, rgrad = _run(case)
    dtype = case["values"].dtype
    for o, r in zip(outs, refs):
        # float64 logits are computed and returned in float64, every other dtype in fp32
        assert o.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and o.shape == r.shape
        torch.testing.assert_close(o.double(), r, atol=VALUE_ATOL[dtype], rtol=1e-5)
    scale = max(1.0, float(rgrad.abs().max())) if rgrad.numel() else 1.0
    # fp32 log-probs carry an absolute error of about eps * |z| (z = logits / temperature, up to ~80 here):
    # the entropy gradient p * (log p + H) inherits it, so the tolerance grows with |z| beyond 10.
    finite = case["values"][torch.isfinite(case["values"])].double()
    zscale = max(1.0, float(finite.abs().max()) / case["temperature"] / 10) if finite.numel() else 1.0
    torch.testing.assert_close(grad.double(), rgrad, atol=GRAD_ATOL[dtype] * scale * zscale, rtol=1e-3)
    masked = case["labels"] == case["ignore_index"]
    if masked.any() and not case["sequence"] and case["layout"] != "expanded":
        assert bool((outs[0][masked] == 0).all() and (outs[1][masked] == 0).all())
        assert bool((grad[masked] == 0).all())


test_valid_inputs, test_valid_inputs_slow = fuzz_pair(case=op_case())(check_valid)
test_valid_inputs_triton, test_valid_inputs_triton_slow = fuzz_pair(
    case=op_case(("triton",), max_v=12), scale=0.3
)(check_valid)


def check_nonfinite(case):
    case = {**case, "sequence": False}
    outs, grad, refs, _ = _run(case)
    labels, ii = case["labels"], case["ignore_index"]
    poisoned = torch.zeros(labels.shape, dtype=torch.bool)
    for i, j in case["poisoned"]:
        poisoned[i, j] = True
    if case["layout"] == "expanded":  # every batch row shows row 0's values
        poisoned = poisoned[:1].expand_as(poisoned)
    bad = poisoned & (labels != ii)
    logps, entropy = outs
    assert bool(torch.isnan(entropy[bad]).all()), entropy
    assert bool((torch.isnan(logps[bad]) | (logps[bad] == -math.inf)).all()), logps
    # expanded: every row's gradient lands in row 0 of the base tensor
    grad_bad = bad.any(0, keepdim=True) if case["layout"] == "expanded" else bad
    grad_rows = grad[:1] if case["layout"] == "expanded" else grad
    assert not bad.any() or not bool(torch.isfinite(grad_rows[grad_bad]).all())
    good = ~bad
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o[good].double(), r[good], atol=VALUE_ATOL[case["values"].dtype], rtol=1e-5)


test_nonfinite_logits, test_nonfinite_logits_slow = fuzz_pair(
    case=op_case(("torch", "reference", "triton"), max_v=12, nonfinite=True)
)(check_nonfinite)


# ------------------------------------------------------------------------------------------------------
# invalid inputs
BAD_KINDS = ["int_logits", "float_labels", "bool_labels", "int16_labels", "shape", "label_high", "label_low",
             "temperature", "empty_vocab", "inplace_expanded", "backend", "scalar_logits", "not_tensor"]


@st.composite
def bad_case(draw):
    kind = draw(st.sampled_from(BAD_KINDS))
    b, t, v = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 20))
    logits, labels = torch.randn(b, t, v), torch.randint(0, v, (b, t))
    kwargs = {"backend": draw(st.sampled_from(["torch", "reference", "triton"]))}
    words = []
    if kind == "int_logits":
        logits, words = logits.long(), ["logits"]
    elif kind == "float_labels":
        labels, words = labels.float(), ["labels"]
    elif kind == "bool_labels":
        labels, words = labels.bool(), ["labels"]
    elif kind == "int16_labels":
        labels, words = labels.short(), ["labels"]
    elif kind == "shape":
        labels, words = torch.randint(0, v, (b, t + draw(st.integers(1, 3)))), ["labels"]
    elif kind in ("label_high", "label_low"):
        i, j = draw(st.integers(0, b - 1)), draw(st.integers(0, t - 1))
        labels[i, j] = v + draw(st.integers(0, 5)) if kind == "label_high" else -draw(st.integers(1, 99))
        words = [f"({i}, {j})", "position"]
    elif kind == "temperature":
        kwargs["temperature"] = draw(st.sampled_from([0, 0.0, -1.0, math.nan, math.inf, -math.inf, True, "1", None]))
        words = ["temperature"]
    elif kind == "empty_vocab":
        logits, labels, words = torch.randn(b, t, 0), torch.full((b, t), -100), ["V = 0", "V >= 1", "vocabulary"]
    elif kind == "inplace_expanded":
        logits, labels = torch.randn(1, t, v).expand(b + 1, t, v), torch.randint(0, v, (b + 1, t))
        kwargs["inplace_backward"], words = True, ["inplace_backward"]
    elif kind == "backend":
        kwargs["backend"], words = draw(st.text(max_size=6).filter(lambda s: s not in ("torch", "triton",
                                                                                         "reference"))), ["backend"]
    elif kind == "scalar_logits":
        logits, labels, words = torch.tensor(1.0), torch.tensor(0), ["logits"]
    else:
        logits, words = logits.tolist(), ["tensor"]
    return kind, logits, labels, kwargs, words, draw(st.booleans())


def check_invalid(case):
    kind, logits, labels, kwargs, words, sequence = case
    op = sequence_logprobs if sequence else token_logprobs
    try:
        op(logits, labels, **kwargs)
    except CLEAR_ERRORS as err:
        assert any(w in str(err) for w in words), (kind, str(err))
        return
    raise AssertionError(f"{kind}: accepted")


test_invalid_inputs, test_invalid_inputs_slow = fuzz_pair(case=bad_case(), scale=2)(check_invalid)
