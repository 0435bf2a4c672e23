"""Shared helpers of the op tests: float64 references and per-dtype tolerances."""

from __future__ import annotations

import torch

from mallowspo_fast.ops.naive import naive_sequence_logprobs, naive_token_logprobs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Values (logp, H) are fp32 whatever the input; the reference sees the same rounded inputs in float64.
VALUE_ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}
# Gradients are written in the logits dtype: the tolerance is that dtype's rounding of values <= ~1.
GRAD_ATOL = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def ref_token(logits, labels, ignore_index=-100, temperature=1.0):
    """float64 reference on the same (rounded) input values, with float64 gradients."""
    x = logits.detach().double().requires_grad_(True)
    logps, ent = naive_token_logprobs(x, labels, ignore_index, temperature, compute_dtype=torch.float64)
    return x, logps, ent


def ref_sequence(logits, labels, ignore_index=-100, temperature=1.0):
    x = logits.detach().double().requires_grad_(True)
    out = naive_sequence_logprobs(x, labels, ignore_index, temperature, compute_dtype=torch.float64)
    return x, out


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor full of NaN: any element a kernel forgets to write shows up in the comparison."""
    return torch.full_like(t, float("nan"))


def random_labels(shape, vocab, mask_frac=0.25, ignore_index=-100, generator=None, device=DEVICE):
    labels = torch.randint(0, vocab, shape, generator=generator).to(device)
    drop = torch.rand(shape, generator=generator).to(device) < mask_frac
    return labels.masked_fill(drop, ignore_index)
