"""Drop-in functions against their peers' definitions, written out here in float64 with the source cited, and
against the real installed TRL functions. OpenRLHF and verl are not installed: their formulas are below."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import trl.trainer.utils as trl_utils_real

from mallowspo_fast.integrations import _common, openrlhf, trl_utils, verl

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-4, rtol=1e-4)}
GRAD_TOL = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.bfloat16: dict(atol=1e-3, rtol=1e-2)}
DTYPES = (torch.float32, torch.bfloat16)


# --- the peers' definitions, float64 ------------------------------------------------------------------------
def ref_selective_log_softmax(logits, index, temperature=1.0, row_mask=None):
    # TRL 1.16.0 trl/trainer/utils.py::selective_log_softmax: gather(log_softmax(logits / T), index)
    logp = torch.log_softmax(logits.double() / temperature, -1)
    squeeze = index.dim() == logits.dim() - 1
    out = logp.gather(-1, index.unsqueeze(-1) if squeeze else index)
    out = out.squeeze(-1) if squeeze else out
    return out if row_mask is None else out.masked_fill(row_mask == 0, 0.0)


def ref_entropy_trl(logits):
    # TRL 1.16.0 trl/trainer/utils.py::entropy_from_logits: -(exp(logp) * logp).sum(-1), logp = log_softmax
    logp = torch.log_softmax(logits.double(), -1)
    return -(logp.exp() * logp).sum(-1)


def ref_log_probs_openrlhf(logits, labels, temperature=1.0):
    # OpenRLHF openrlhf/models/utils.py::log_probs_from_logits: logits / T, then z[y] - logsumexp(z)
    z = logits.double() / temperature
    return z.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, -1)


def ref_entropy_logsumexp(logits):
    # verl verl/utils/torch_functional.py::entropy_from_logits and OpenRLHF compute_entropy:
    # logsumexp(z) - sum(softmax(z) * z)
    z = logits.double()
    return torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)


def ref_logprobs_verl(logits, labels):
    # verl verl/utils/torch_functional.py::logprobs_from_logits_naive: gather(log_softmax(logits), labels)
    return torch.log_softmax(logits.double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def ref_masked_mean(values, mask, axis=None):
    # verl masked_mean(values, mask, axis=None) and OpenRLHF masked_mean(tensor, mask, dim=None):
    # (values * mask).sum(axis) / mask.sum(axis)
    return (values * mask).sum(axis) / mask.sum(axis)


# -------------------------------------------------------------------------------------------------------------
def inputs(dtype, shape=(3, 5), vocab=257, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(*shape, vocab, generator=g)).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=g)
    return logits, labels


def check_value_and_grad(fn, ref, logits, dtype, *extra):
    """fn(logits, *extra) against ref(logits as float64, *extra): values and gradients of a random
    upstream gradient (the reference works on the same rounded logits)."""
    leaf = logits.clone().requires_grad_(True)
    out = fn(leaf * 1, *extra)  # a non-leaf input, so in-place backward variants are allowed
    assert out.dtype == torch.float32
    leaf64 = logits.double().requires_grad_(True)
    expected = ref(leaf64, *extra)
    torch.testing.assert_close(out.double(), expected, **TOL[dtype])
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    (out * up).sum().backward()
    (expected * up.double()).sum().backward()
    torch.testing.assert_close(leaf.grad.double(), leaf64.grad, **GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_trl_selective_log_softmax(dtype):
    logits, labels = inputs(dtype)
    check_value_and_grad(trl_utils.selective_log_softmax, ref_selective_log_softmax, logits, dtype, labels)
    check_value_and_grad(lambda x, y: trl_utils.selective_log_softmax(x, y, temperature=0.7),
                         lambda x, y: ref_selective_log_softmax(x, y, 0.7), logits, dtype, labels)
    row_mask = torch.rand(labels.shape, generator=torch.Generator().manual_seed(4)) > 0.3
    check_value_and_grad(lambda x, y: trl_utils.selective_log_softmax(x, y, row_mask=row_mask),
                         lambda x, y: ref_selective_log_softmax(x, y, row_mask=row_mask), logits, dtype, labels)
    topk = logits.float().topk(4, dim=-1).indices  # K labels per row
    check_value_and_grad(lambda x, y: trl_utils.selective_log_softmax(x, y, 1.5),
                         lambda x, y: ref_selective_log_softmax(x, y, 1.5), logits, dtype, topk)
    # and the real TRL function, on fp32 logits
    real = trl_utils_real.selective_log_softmax(logits.float(), labels, temperature=0.7)
    torch.testing.assert_close(trl_utils.selective_log_softmax(logits.float(), labels, 0.7), real.float(),
                               **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_trl_entropy_and_joint(dtype):
    logits, labels = inputs(dtype)
    check_value_and_grad(trl_utils.entropy_from_logits, ref_entropy_trl, logits, dtype)
    torch.testing.assert_close(trl_utils.entropy_from_logits(logits.float(), chunk_size=2),
                               trl_utils_real.entropy_from_logits(logits.float(), chunk_size=2), **TOL[dtype])
    lp, ent = trl_utils.selective_log_softmax_and_entropy(logits, labels, entropy_requires_grad=False,
                                                          temperature=2.0)
    real_lp, real_ent = trl_utils_real.selective_log_softmax_and_entropy(logits.double(), labels,
                                                                         temperature=2.0)
    torch.testing.assert_close(lp.double(), real_lp, **TOL[dtype])
    torch.testing.assert_close(ent.double(), real_ent, **TOL[dtype])
    torch.testing.assert_close(ent.double(), ref_entropy_trl(logits.double() / 2.0), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_openrlhf(dtype):
    logits, labels = inputs(dtype, shape=(2, 3, 4))
    check_value_and_grad(openrlhf.log_probs_from_logits, ref_log_probs_openrlhf, logits, dtype, labels)
    before = logits.clone()
    check_value_and_grad(lambda x, y: openrlhf.log_probs_from_logits(x, y, temperature=0.5),
                         lambda x, y: ref_log_probs_openrlhf(x, y, temperature=0.5), logits, dtype, labels)
    assert torch.equal(logits, before)  # the caller's logits are not divided in place
    check_value_and_grad(openrlhf.compute_entropy, ref_entropy_logsumexp, logits, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_verl(dtype):
    logits, labels = inputs(dtype)
    for inplace in (True, False):
        check_value_and_grad(lambda x, y, i=inplace: verl.logprobs_from_logits(x, y, inplace_backward=i),
                             ref_logprobs_verl, logits, dtype, labels)
    check_value_and_grad(verl.entropy_from_logits, ref_entropy_logsumexp, logits, dtype)


def test_masked_means():
    g = torch.Generator().manual_seed(5)
    values = torch.randn(4, 6, generator=g, dtype=torch.float64)
    mask = (torch.rand(4, 6, generator=g) > 0.4).double()
    mask[:, 0] = 1.0
    for axis in (None, 0, 1, -1):
        torch.testing.assert_close(verl.masked_mean(values, mask, axis), ref_masked_mean(values, mask, axis))
        torch.testing.assert_close(openrlhf.masked_mean(values, mask, axis), ref_masked_mean(values, mask, axis))
        torch.testing.assert_close(verl.masked_sum(values, mask, axis), (values * mask).sum(axis))
    torch.testing.assert_close(openrlhf.masked_mean(values, None, 1), values.mean(1))
    assert torch.isnan(verl.masked_mean(values, torch.zeros_like(mask)))  # as the peer: no epsilon


def test_entropy_without_labels_is_one_pass_of_the_op():
    logits, _ = inputs(torch.float32)
    with mock.patch.object(_common, "token_entropy", wraps=_common.token_entropy) as ent, \
            mock.patch.object(_common, "token_logprobs", wraps=_common.token_logprobs) as lp:
        for fn in (trl_utils.entropy_from_logits, openrlhf.compute_entropy, verl.entropy_from_logits):
            fn(logits)
        assert ent.call_count == 3 and lp.call_count == 0
        trl_utils.selective_log_softmax_and_entropy(logits, inputs(torch.float32)[1])
        assert ent.call_count == 3 and lp.call_count == 1  # log-probs and entropy from the same single pass


def test_errors_name_the_function():
    logits, labels = inputs(torch.float32)
    with pytest.raises(ValueError, match=r"logprobs_from_logits: expected labels of shape \(3, 5\).*found \(3,\)"):
        verl.logprobs_from_logits(logits, labels[:, 0])
    with pytest.raises(TypeError, match="compute_entropy: expected floating logits"):
        openrlhf.compute_entropy(labels)
    with pytest.raises(ValueError, match="selective_log_softmax: expected a positive temperature, found 0"):
        trl_utils.selective_log_softmax(logits, labels, temperature=0)
    with pytest.raises(ValueError, match="expected row_mask of shape"):
        trl_utils.selective_log_softmax(logits, labels, row_mask=labels[:1])
