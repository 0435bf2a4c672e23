"""mallowspo_fast.testing, the one copy of the references, input makers and tolerances that the op tests and
the GPU check share: each helper does what its docstring says."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mallowspo_fast as mpf
from mallowspo_fast import testing
from mallowspo_fast.ops.transform import IDENTITY, LogitTransform


def test_not_part_of_the_public_api():
    assert "testing" not in mpf.__all__


@pytest.mark.parametrize("dtype", testing.ALL_DTYPES, ids=testing.DTYPE_NAMES.get)
def test_tolerances_by_dtype_and_by_name(dtype):
    tol = testing.tolerances(dtype)
    assert testing.tolerances(testing.DTYPE_NAMES[dtype]) == tol
    assert tol == (testing.VALUE_ATOL[dtype], testing.VALUE_RTOL[dtype], testing.GRAD_ATOL[dtype],
                   testing.GRAD_RTOL[dtype], testing.LINEAR_GRAD_REL[dtype], testing.UNIT_ROUNDOFF[dtype])
    assert tol.unit_roundoff == (2.0**-53 if dtype == torch.float64 else 2.0**-24)


def test_float64_tolerances_and_an_unknown_dtype():
    assert testing.tolerances("fp64")[:4] == (1e-10, 1e-10, 1e-12, 1e-8)
    for bad in ("int8", torch.int32):
        with pytest.raises(ValueError, match=r"expected one of \['fp32', 'bf16', 'fp16', 'fp64'\].*got"):
            testing.tolerances(bad)


def test_scaled_tolerances():
    capped = LogitTransform(temperature=0.7, softcap=30.0, logit_scale=2.0)
    y = torch.tensor([[-50.0, 3.0]])
    vscale, gscale = testing.transform_scales(y, capped)
    tol, scaled = testing.tolerances("bf16"), testing.scaled_tolerances(torch.bfloat16, y, capped)
    assert scaled == tol._replace(value_atol=tol.value_atol * vscale, grad_atol=tol.grad_atol * vscale * gscale)
    assert testing.scaled_tolerances("fp32", y / 10, IDENTITY) == testing.tolerances("fp32")


def test_transform_scales():
    y = torch.tensor([[-50.0, 3.0, float("-inf")]])
    assert testing.transform_scales(y, IDENTITY) == (5.0, 1.0)
    assert testing.transform_scales(y / 10, IDENTITY) == (1.0, 1.0)  # at least 1 each
    capped = LogitTransform(temperature=0.7, softcap=30.0, logit_scale=2.0)
    vscale, gscale = testing.transform_scales(y, capped)
    assert vscale == pytest.approx(30 / 0.7 / 10)  # the cap maps -inf to the finite -cap/T
    assert gscale == pytest.approx(2 / 0.7)  # dz/dy = scale / T at y = 0


def test_token_reference_on_the_rounded_values_with_float64_gradients():
    gen = torch.Generator().manual_seed(0)
    logits = testing.shifted_logits(2, 3, 11, torch.bfloat16, gen)[:, :-1]
    labels = testing.sequence_labels(2, 3, 11, gen, mask_last_sequence=True)
    x, logps, entropy = testing.ref_token(logits, labels)
    assert x.is_leaf and x.dtype == logps.dtype == entropy.dtype == torch.float64
    assert torch.equal(x, logits.double())
    logp_all = torch.log_softmax(x.detach(), -1)
    mask = labels != -100
    want = logp_all.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    torch.testing.assert_close(logps, want, atol=1e-14, rtol=0)
    assert (entropy[~mask] == 0).all() and (entropy[mask] > 0).all()
    logps.sum().backward()
    onehot = F.one_hot(labels.clamp(min=0), 11).double()
    torch.testing.assert_close(x.grad, (onehot - logp_all.exp()) * mask.unsqueeze(-1), atol=1e-14, rtol=0)


def test_sequence_entropy_and_stats_references_agree_with_the_token_one():
    gen = torch.Generator().manual_seed(1)
    logits = testing.shifted_logits(3, 4, 17, torch.float32, gen)[:, :-1]
    labels = testing.sequence_labels(3, 4, 17, gen, mask_last_sequence=True)
    transform = LogitTransform(temperature=0.7, softcap=5.0)
    _, logps, entropy = testing.ref_token(logits, labels, transform=transform)
    _, (seq_logps, seq_entropy, count) = testing.ref_sequence(logits, labels, transform=transform)
    assert count.tolist() == (labels != -100).sum(-1).tolist() and count[-1] == 0
    torch.testing.assert_close(seq_logps, logps.sum(-1), atol=1e-14, rtol=0)
    torch.testing.assert_close(seq_entropy, entropy.sum(-1) / count.clamp(min=1), atol=1e-14, rtol=0)
    x, all_entropy, lse = testing.ref_entropy(logits, transform=transform)
    z = transform.apply(x.detach())
    torch.testing.assert_close(lse, torch.logsumexp(z, -1), atol=1e-14, rtol=0)
    mask = labels != -100
    torch.testing.assert_close(all_entropy[mask], entropy[mask], atol=1e-14, rtol=0)
    log_sum_sq, mean, top1 = testing.ref_stats(logits, labels, transform=transform)
    assert log_sum_sq.dtype == torch.float64 and not log_sum_sq.requires_grad
    torch.testing.assert_close(mean, z.mean(-1) * mask, atol=1e-14, rtol=0)
    assert torch.equal(top1, (z.argmax(-1) == labels) & mask)
    assert testing.ref_stats(logits, None, transform=transform)[2] is None


def test_linear_reference_sees_the_rounded_logits_and_passes_the_gradient_straight_through():
    gen = torch.Generator().manual_seed(2)
    hidden, weight, bias = testing.linear_inputs(2, 3, 8, 20, torch.bfloat16, gen, bias=True)
    labels = testing.random_labels((2, 3), 20, generator=gen)
    r = testing.ref_linear(hidden, weight, bias, labels, sequence=False)
    assert torch.equal(r.logits.detach(), F.linear(hidden, weight, bias).double())
    _, logps, _ = testing.ref_token(F.linear(hidden, weight, bias), labels)
    torch.testing.assert_close(r.outputs[0], logps, atol=1e-14, rtol=0)
    r.outputs[0].sum().backward()
    # Straight through: d/dhidden of the exact float64 product, at the rounded logits' gradient.
    torch.testing.assert_close(r.hidden.grad, r.logits.grad @ weight.double(), atol=1e-14, rtol=0)
    torch.testing.assert_close(r.weight.grad, r.logits.grad.reshape(-1, 20).t() @ hidden.double().reshape(-1, 8),
                               atol=1e-14, rtol=0)
    torch.testing.assert_close(r.bias.grad, r.logits.grad.sum((0, 1)), atol=1e-14, rtol=0)
    given = torch.zeros(2, 3, 20)
    seq = testing.ref_linear(hidden, weight, None, labels, sequence=True, rounded_logits=given)
    assert seq.bias is None and len(seq.outputs) == 3 and torch.equal(seq.logits.detach(), given.double())


def test_input_makers():
    gen = torch.Generator().manual_seed(3)
    labels = testing.random_labels((4, 500), 7, mask_frac=0.5, generator=gen)
    assert labels.device.type == torch.device(testing.DEVICE).type and labels.dtype == torch.int64
    kept = labels[labels != -100]
    assert 0.4 < kept.numel() / labels.numel() < 0.6 and kept.min() >= 0 and kept.max() < 7
    same = testing.sequence_labels(4, 500, 7, torch.Generator().manual_seed(3), mask_frac=0.5)
    assert torch.equal(same[:, 1:], labels[:, 1:]) and same[0, 0] == 0  # the same draws, the first pinned
    seq = testing.sequence_labels(3, 5, 100, gen, high=10, first_label=99, mask_last_sequence=True, mask_frac=0.0)
    assert seq[0, 0] == 99 and (seq[-1] == -100).all() and (seq[1] < 10).all()
    logits = testing.shifted_logits(2, 3, 9, torch.float16, gen, scale=4.0)
    assert logits.shape == (2, 4, 9) and logits.dtype == torch.float16 and logits.is_leaf
    hidden, weight, bias = testing.linear_inputs(2, 3, 16, 40, torch.float32, gen)
    assert hidden.shape == (2, 3, 16) and weight.shape == (40, 16) and bias is None
    g, h = testing.random_grads((2, 3), gen)
    assert g.shape == h.shape == (2, 3) and not torch.equal(g, h)
    assert torch.isnan(testing.poisoned_like(logits)).all() and testing.poisoned_like(logits).dtype == torch.float16
