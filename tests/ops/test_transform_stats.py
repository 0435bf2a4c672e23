"""Logit transforms (temperature, logit scale, soft cap) and per-token statistics (log Σp², mean logit,
top-1) on every public entry point and backend, against float64 references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mallowspo_fast as mpf
from mallowspo_fast.ops.naive import naive_token_logprobs, naive_token_stats
from mallowspo_fast.ops.transform import LogitTransform
from mallowspo_fast.testing import (
    DEVICE,
    GRAD_ATOL,
    VALUE_ATOL,
    random_grads,
    random_labels,
    ref_entropy,
    ref_token,
)

# "torch-eager", "torch-compiled" and "torch-native" force the three routes of the torch backend.
BACKENDS = ["torch-eager", "torch-compiled", "torch-native", "triton", "reference"]
TRANSFORMS = {
    "plain": dict(),
    "temperature": dict(temperature=0.7),
    "scale": dict(logit_scale=0.0625),
    "negative-scale": dict(logit_scale=-1.5),
    "softcap": dict(softcap=30.0),
    "softcap+scale+temperature": dict(softcap=5.0, logit_scale=2.0, temperature=1.3),
}


def _inputs(dtype, shape=(3, 7, 257), seed=0, scale=4.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=gen) * scale).to(DEVICE, dtype)
    labels = random_labels(shape[:-1], shape[-1], generator=gen)
    g, h = random_grads(shape[:-1], gen)
    return logits, labels, g, h


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("kw", TRANSFORMS.values(), ids=TRANSFORMS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_token_logprobs_with_transforms(backend, kw, dtype):
    logits, labels, g, h = _inputs(dtype)
    x = logits.clone().requires_grad_(True)
    out = mpf.token_logprobs(x, labels, backend=backend, **kw)
    (out.logps * g + out.entropy * h).sum().backward()
    xr, ref_lp, ref_h = ref_token(logits, labels, transform=LogitTransform(**kw))
    (ref_lp * g.double() + ref_h * h.double()).sum().backward()
    torch.testing.assert_close(out.logps.double(), ref_lp, atol=VALUE_ATOL[dtype], rtol=1e-5)
    torch.testing.assert_close(out.entropy.double(), ref_h, atol=VALUE_ATOL[dtype], rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=GRAD_ATOL[dtype], rtol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("kw", [TRANSFORMS["plain"], TRANSFORMS["softcap+scale+temperature"]], ids=["plain", "all"])
def test_entropy_and_lse_without_labels_with_transforms(backend, kw):
    logits, _, g, h = _inputs(torch.float32, seed=1)
    x = logits.clone().requires_grad_(True)
    out = mpf.token_entropy(x, backend=backend, **kw)
    (out.entropy * h + out.lse * g).sum().backward()
    xr, ref_h, ref_lse = ref_entropy(logits, transform=LogitTransform(**kw))
    (ref_h * h.double() + ref_lse * g.double()).sum().backward()
    torch.testing.assert_close(out.entropy.double(), ref_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=1e-6, rtol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_sequence_logprobs_with_a_softcap(backend):
    logits, labels, g, h = _inputs(torch.float32, seed=2)
    x = logits.clone().requires_grad_(True)
    seq = mpf.sequence_logprobs(x[:, :-1], labels[:, 1:], softcap=8.0, logit_scale=0.5, backend=backend)
    (seq.logps * g[:, 0] + seq.entropy * h[:, 0]).sum().backward()
    xr = logits.double().requires_grad_(True)
    ref = mpf.sequence_logprobs(xr[:, :-1], labels[:, 1:], softcap=8.0, logit_scale=0.5, backend="reference")
    (ref.logps * g[:, 0].double() + ref.entropy * h[:, 0].double()).sum().backward()
    torch.testing.assert_close(seq.logps.double(), ref.logps, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(seq.entropy.double(), ref.entropy, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=1e-6, rtol=1e-2)
    assert torch.equal(seq.num_tokens, ref.num_tokens)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("kw", [TRANSFORMS["plain"], TRANSFORMS["softcap+scale+temperature"]], ids=["plain", "all"])
def test_stats_match_float64(backend, kw):
    logits, labels, _, _ = _inputs(torch.float32, seed=3)
    # Ties for the top-1 flag: a row whose label and an earlier column share the maximum (argmax: the
    # earlier wins), and one whose label is the first of two maxima.
    labels[0, 0], labels[0, 1] = 9, 4
    logits[0, 0, 3], logits[0, 0, 9] = 50.0, 50.0
    logits[0, 1, 4], logits[0, 1, 200] = 50.0, 50.0
    out = mpf.token_logprobs(logits, labels, backend=backend, return_stats=True, **kw)
    assert isinstance(out, mpf.TokenStats) and out.lse is None
    ref = naive_token_stats(logits.double(), labels, transform=LogitTransform(**kw), compute_dtype=torch.float64)
    for got, want in zip(out[:4], ref[:4]):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)
    assert out.is_top1.dtype == torch.bool and torch.equal(out.is_top1, ref[4])
    assert not out.is_top1[0, 0] and out.is_top1[0, 1]
    ent = mpf.token_entropy(logits, backend=backend, return_stats=True, **kw)
    ref_all = naive_token_stats(logits.double(), None, transform=LogitTransform(**kw), compute_dtype=torch.float64)
    assert ent.logps is None and ent.is_top1 is None
    for got, want in ((ent.entropy, ref_all[1]), (ent.log_sum_sq_probs, ref_all[2]), (ent.mean_logits, ref_all[3])):
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_stats_do_not_change_the_gradient(backend):
    logits, labels, g, h = _inputs(torch.float32, seed=4)
    grads = []
    for stats in (False, True):
        x = logits.clone().requires_grad_(True)
        out = mpf.token_logprobs(x, labels, backend=backend, return_stats=stats, softcap=10.0)
        (out.logps * g + out.entropy * h).sum().backward()
        assert not stats or not (out.log_sum_sq_probs.requires_grad or out.mean_logits.requires_grad)
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_softcap_saturates_without_nan(backend):
    """|y| ~ 1e3 against a soft cap of 5: tanh is ±1 in fp32, the gradient through it is exactly 0 there."""
    logits, labels, g, h = _inputs(torch.float32, seed=5, scale=1e3)
    x = logits.clone().requires_grad_(True)
    out = mpf.token_logprobs(x, labels, softcap=5.0, backend=backend)
    (out.logps * g + out.entropy * h).sum().backward()
    xr, ref_lp, ref_h = ref_token(logits, labels, transform=LogitTransform(softcap=5.0))
    (ref_lp * g.double() + ref_h * h.double()).sum().backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(out.logps.double(), ref_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=1e-6, rtol=1e-2)


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_memory_mode_with_transforms_and_stats(backend, bias):
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(2, 9, 16, generator=gen).to(DEVICE)
    weight = (torch.randn(300, 16, generator=gen) * 0.5).to(DEVICE)
    b = torch.randn(300, generator=gen).to(DEVICE) if bias else None
    labels = random_labels((2, 9), 300, generator=gen)
    kw = dict(softcap=6.0, logit_scale=1.5, temperature=0.9)
    params = [t.clone().requires_grad_(True) for t in (hidden, weight) + ((b,) if bias else ())]
    out = mpf.linear_token_logprobs(params[0], params[1], labels, bias=params[2] if bias else None, chunk_size=5,
                                    backend=backend, return_stats=True, **kw)
    (out.logps.sum() + 0.3 * out.entropy.sum()).backward()
    ref_params = [t.double().requires_grad_(True) for t in (hidden, weight) + ((b,) if bias else ())]
    logits = F.linear(ref_params[0], ref_params[1], ref_params[2] if bias else None)
    ref = naive_token_stats(logits.detach(), labels, transform=LogitTransform(**kw), compute_dtype=torch.float64)
    ref_lp, ref_h = naive_token_logprobs(logits, labels, compute_dtype=torch.float64, transform=LogitTransform(**kw))
    (ref_lp.sum() + 0.3 * ref_h.sum()).backward()
    for got, want in zip(out[:4], ref[:4]):
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)
    assert torch.equal(out.is_top1, ref[4])
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p.grad.double(), r.grad, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kw,match", [
    (dict(softcap=0.0), "softcap must be None or a positive finite number, got 0.0"),
    (dict(softcap=float("inf")), "softcap must be None or a positive finite number"),
    (dict(logit_scale=0.0), "logit_scale must be a finite non-zero number, got 0.0"),
    (dict(logit_scale=float("nan")), "logit_scale must be a finite non-zero number"),
], ids=["softcap-zero", "softcap-inf", "scale-zero", "scale-nan"])
def test_bad_transform_arguments(kw, match):
    logits, labels, _, _ = _inputs(torch.float32)
    for call in (lambda: mpf.token_logprobs(logits, labels, **kw), lambda: mpf.token_entropy(logits, **kw),
                 lambda: mpf.sequence_logprobs(logits, labels, **kw)):
        with pytest.raises(ValueError, match=match):
            call()
