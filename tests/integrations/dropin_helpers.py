"""Inputs and checks shared by the drop-in tests (tests/integrations/test_dropins*.py)."""

from __future__ import annotations

import torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
LOW = (torch.bfloat16, torch.float16)
# Half a unit in the last place, relative: a result computed in fp32 (or better) and rounded once to the
# output dtype is within this of the exact value (plus the fp32 arithmetic's own error, far below).
HALF_ULP = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}
# fp32 results of fp32 arithmetic, and float64 results of float64 arithmetic, against the float64 value.
SAME_DTYPE_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}
GRAD_TOL = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-10),
            torch.bfloat16: dict(atol=2e-3, rtol=2e-2), torch.float16: dict(atol=2e-4, rtol=4e-3)}


def inputs(dtype, shape=(3, 5), vocab=257, seed=0, scale=3.0):
    """Logits [*shape, V] in ``dtype`` and labels [*shape] in [0, V)."""
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(*shape, vocab, generator=g, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=g)
    return logits, labels


def upstream(shape, seed=9):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_rounded_once(out: torch.Tensor, exact: torch.Tensor, atol: float = 0.0) -> None:
    """``out`` is the float64 value ``exact`` rounded once to out's dtype: within half an ulp of it (``atol``
    leaves room for fp32 arithmetic near 0 when ``out`` is bf16/fp16 computed in fp32)."""
    torch.testing.assert_close(out.double(), exact.double(), rtol=HALF_ULP[out.dtype] * (1 + 1e-3), atol=atol)


def assert_value(out: torch.Tensor, exact: torch.Tensor, logits_dtype: torch.dtype) -> None:
    """``out`` from logits of ``logits_dtype`` against the float64 value. The drop-ins compute in fp32 (float64
    for float64 logits): a result in that dtype carries that arithmetic's error; a result in a narrower dtype
    is that arithmetic rounded once."""
    arithmetic = torch.float64 if logits_dtype == torch.float64 else torch.float32
    if out.dtype == arithmetic:
        torch.testing.assert_close(out.double(), exact.double(), **SAME_DTYPE_TOL[arithmetic])
    else:
        assert_rounded_once(out, exact, atol=1e-6 if out.dtype in LOW else 0.0)


def check_against_reference(fn, ref, logits, *extra, expected_dtype=None, edit=None):
    """fn(non-leaf copy of logits, *extra) against ref(float64 logits, *extra): the value (rounded once to
    the expected dtype), the dtype, and the gradient of a random upstream gradient. ``edit`` is an index
    set to 0 in place in the result before the backward (the reference's upstream gradient is zeroed there).
    Returns the result."""
    leaf = logits.detach().clone().requires_grad_(True)
    out = fn(leaf * 1, *extra)  # a non-leaf: the in-place variants (division, backward) are allowed on it
    assert out.dtype == (expected_dtype or logits.dtype)
    leaf64 = logits.detach().double().clone().requires_grad_(True)
    exact = ref(leaf64, *extra)
    assert_value(out.detach(), exact.detach(), logits.dtype)
    up = upstream(out.shape).to(out.dtype)  # the reference gets the same (rounded) upstream gradient
    if edit is not None:
        out[edit] = 0.0
        up[edit] = 0.0
    (out * up).sum().backward()
    (exact * up.double()).sum().backward()
    assert leaf.grad.dtype == logits.dtype
    torch.testing.assert_close(leaf.grad.double(), leaf64.grad, **GRAD_TOL[logits.dtype])
    return out


def fp64_sensitive_inputs(vocab=5000, seed=3):
    """float64 logits on which fp32 arithmetic loses digits: large, widely spread values over a big V."""
    logits, labels = inputs(torch.float64, shape=(2, 3), vocab=vocab, seed=seed, scale=60.0)
    return logits, labels
