"""OpenRLHF 0.11.2 and verl 0.9.1 drop-ins against those releases' definitions, written out below in plain
torch (neither package is installed): values, result dtypes (the peer's, on each of its paths), gradients,
float64 computed in float64, OpenRLHF's in-place division by the temperature, verl's in-place backward, and
the masked reductions on NaN outside the mask and on empty masks."""

from __future__ import annotations

import pytest
import torch
from dropin_helpers import DTYPES, LOW, assert_value, check_against_reference, fp64_sensitive_inputs, inputs

from mallowspo_fast.integrations import _common, openrlhf, verl


# --- OpenRLHF 0.11.2 openrlhf/models/utils.py, in our words ---------------------------------------------------
def openrlhf_log_probs(logits, labels, temperature=1.0):
    """log softmax(logits / T) at each label, in the logits' dtype. (OpenRLHF divides the caller's logits in
    place first; the side effect is tested on its own below.)"""
    z = logits / temperature if temperature != 1.0 else logits
    return z.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - z.logsumexp(-1)


def logsumexp_entropy(logits):
    """OpenRLHF compute_entropy and verl entropy_from_logits: logsumexp(z) − Σ softmax(z)·z, logits' dtype."""
    return logits.logsumexp(-1) - (logits.softmax(-1) * logits).sum(-1)


def openrlhf_masked_mean(tensor, mask, dim=None):
    """The plain mean over dim without a mask; else Σ tensor·mask / Σ mask over dim (NaN when Σ mask = 0)."""
    return tensor.mean(dim=dim) if mask is None else (tensor * mask).sum(dim=dim) / mask.sum(dim=dim)


# --- verl 0.9.1 verl/utils/torch_functional.py, in our words --------------------------------------------------
def verl_log_probs(logits, labels):
    """verl's torch path: log_softmax over V picked at each label, in the logits' dtype."""
    return logits.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def verl_masked_sum(values, mask, axis=None):
    """Values where the mask is 0 are replaced by 0 (NaN there does not count), then Σ values·mask."""
    return (torch.where(mask.bool(), values, 0.0) * mask).sum(axis=axis)


def verl_masked_mean(values, mask, axis=None):
    """verl_masked_sum / (Σ mask + 1e-8): 0 for an empty mask."""
    return verl_masked_sum(values, mask, axis) / (mask.sum(axis=axis) + 1e-8)


@pytest.fixture(params=[False, True], ids=["without-flash-attn", "with-flash-attn"])
def flash_attn(request, monkeypatch):
    monkeypatch.setattr(_common, "FLASH_ATTN_INSTALLED", request.param)
    monkeypatch.delenv(verl.DISABLE_FLASH_CE_ENV, raising=False)
    return request.param


# --- OpenRLHF ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_openrlhf_values_dtypes_and_gradients(dtype, flash_attn):
    logits, labels = inputs(dtype, shape=(2, 3, 4))
    # OpenRLHF's dtype: the logits' own, except float64 on flash-attn's kernel, which returns fp32
    want = torch.float32 if flash_attn and dtype == torch.float64 else dtype
    for temperature in (1.0, 0.5):
        check_against_reference(lambda x, y, t=temperature: openrlhf.log_probs_from_logits(x, y, temperature=t),
                                lambda x, y, t=temperature: openrlhf_log_probs(x, y, t), logits, labels,
                                expected_dtype=want, edit=(0, 1, 2))
    assert openrlhf_log_probs(logits, labels).dtype == dtype
    check_against_reference(openrlhf.compute_entropy, logsumexp_entropy, logits)
    assert logsumexp_entropy(logits).dtype == dtype


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_openrlhf_divides_the_callers_logits_in_place(dtype):
    logits, labels = inputs(dtype)
    x = logits.clone()
    openrlhf.log_probs_from_logits(x, labels, temperature=0.7)
    scaled = logits.clone()
    scaled.div_(0.7)  # what OpenRLHF leaves in the caller's tensor, rounded to its dtype
    assert torch.equal(x, scaled)
    openrlhf.log_probs_from_logits(x, labels)  # temperature 1: untouched
    assert torch.equal(x, scaled)
    leaf = logits.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):  # as OpenRLHF's own div_
        openrlhf.log_probs_from_logits(leaf, labels, temperature=0.7)
    with pytest.raises(ValueError, match="log_probs_from_logits: expected a positive temperature, found -1"):
        openrlhf.log_probs_from_logits(x, labels, temperature=-1)
    assert torch.equal(x, scaled)  # nothing divided before the check


def test_openrlhf_masked_mean_is_openrlhfs_definition():
    g = torch.Generator().manual_seed(5)
    values = torch.randn(4, 6, generator=g, dtype=torch.float64)
    mask = (torch.rand(4, 6, generator=g) > 0.4).double()
    mask[:, 0] = 1.0
    for dim in (None, 0, 1, -1):
        torch.testing.assert_close(openrlhf.masked_mean(values, mask, dim), openrlhf_masked_mean(values, mask, dim))
    by_row = torch.stack([values[i][mask[i].bool()].mean() for i in range(4)])  # the mean of the kept entries
    torch.testing.assert_close(openrlhf.masked_mean(values, mask, -1), by_row)
    torch.testing.assert_close(openrlhf.masked_mean(values, None, 1), values.mean(1))
    assert torch.isnan(openrlhf.masked_mean(values, torch.zeros_like(mask)))  # 0/0, as OpenRLHF
    poisoned = values.masked_fill(mask == 0, float("nan"))
    assert torch.isnan(openrlhf.masked_mean(poisoned, mask))  # NaN·0 = NaN: OpenRLHF does not guard it
    for vd, md in ((torch.bfloat16, torch.bool), (torch.bfloat16, torch.float32), (torch.float64, torch.int64)):
        v, m = values.to(vd), mask.to(md)
        assert openrlhf.masked_mean(v, m, 1).dtype == openrlhf_masked_mean(v, m, 1).dtype


# --- verl -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_verl_values_dtypes_and_gradients(dtype, flash_attn):
    logits, labels = inputs(dtype)
    want = torch.float32 if flash_attn else dtype  # flash-attn's kernel returns fp32; verl's torch path, the input's
    for inplace in (True, False):
        check_against_reference(lambda x, y, i=inplace: verl.logprobs_from_logits(x, y, inplace_backward=i),
                                verl_log_probs, logits, labels, expected_dtype=want, edit=(2, 4))
    assert verl_log_probs(logits, labels).dtype == dtype
    check_against_reference(verl.entropy_from_logits, logsumexp_entropy, logits, edit=(0,))


@pytest.mark.parametrize("inplace", (True, False))
def test_verl_writes_the_gradient_into_the_logits_only_where_verl_does(inplace, flash_attn):
    logits, labels = inputs(torch.float32)
    leaf = logits.clone().requires_grad_(True)
    x = leaf * 1
    verl.logprobs_from_logits(x, labels, inplace_backward=inplace).sum().backward()
    overwritten = not torch.equal(x.detach(), logits)
    assert overwritten == (flash_attn and inplace)  # flash-attn's kernel honours it; verl's torch path never writes
    x64 = logits.double().requires_grad_(True)
    verl_log_probs(x64, labels).sum().backward()
    torch.testing.assert_close(leaf.grad.double(), x64.grad, atol=1e-6, rtol=1e-5)


def test_verl_flash_attn_switch_and_its_ignored_labels(monkeypatch):
    logits, labels = inputs(torch.bfloat16)
    monkeypatch.setattr(_common, "FLASH_ATTN_INSTALLED", True)
    assert verl.uses_flash_attn_path() and verl.logprobs_from_logits(logits, labels).dtype == torch.float32
    labels = labels.clone()
    labels[1, 2] = -100
    assert verl.logprobs_from_logits(logits, labels)[1, 2] == 0  # flash-attn's kernel: -100 gives 0
    monkeypatch.setenv(verl.DISABLE_FLASH_CE_ENV, "1")  # verl's switch back to its torch path, read per call
    assert not verl.uses_flash_attn_path() and verl.logprobs_from_logits(logits, labels).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16))
def test_verl_masked_sum_and_mean_are_verls_current_definitions(dtype):
    g = torch.Generator().manual_seed(6)
    values = torch.randn(4, 6, 3, generator=g, dtype=torch.float64).to(dtype)
    mask = torch.rand(4, 6, 3, generator=g) > 0.4
    mask[1] = False  # an empty row
    for m in (mask, mask.float(), mask.long()):
        for axis in (None, 0, 1, -1, (1, 2)):
            for ours, ref in ((verl.masked_sum, verl_masked_sum), (verl.masked_mean, verl_masked_mean)):
                got, want = ours(values, m, axis), ref(values, m, axis)
                assert got.dtype == want.dtype  # verl's promotion (bf16 values, bool mask: masked_mean is fp32)
                torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the same numbers from another route: the kept entries' sum and mean, per (batch, time) row
    flat, keep = values.double().reshape(-1, 3), mask.reshape(-1, 3)
    sums = torch.stack([flat[i][keep[i]].sum() for i in range(len(flat))]).view(4, 6)
    counts = keep.sum(-1).view(4, 6).double()
    tol = dict(atol=1e-2, rtol=1e-2) if dtype == torch.bfloat16 else dict(atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(verl.masked_sum(values, mask, -1).double(), sums, **tol)
    means = verl.masked_mean(values, mask, -1).double()
    torch.testing.assert_close(means, sums / (counts + 1e-8), **tol)
    assert (means[1] == 0).all()  # empty mask: 0, not NaN
    assert verl.masked_mean(values, torch.zeros_like(mask)) == 0


def test_verl_masked_reductions_ignore_nan_and_inf_outside_the_mask():
    g = torch.Generator().manual_seed(7)
    values = torch.randn(5, 8, generator=g, dtype=torch.float64)
    mask = torch.rand(5, 8, generator=g) > 0.5
    poisoned = values.masked_fill(~mask, float("nan"))
    poisoned[~mask & (torch.arange(8) % 2 == 0)] = float("inf")
    for fn in (verl.masked_sum, verl.masked_mean):
        for axis in (None, 1):
            torch.testing.assert_close(fn(poisoned, mask, axis), fn(values, mask, axis), rtol=0, atol=0)
    leaf = poisoned.clone().requires_grad_(True)
    verl.masked_mean(leaf, mask.double(), 1).sum().backward()
    assert torch.isfinite(leaf.grad).all() and (leaf.grad[~mask] == 0).all()


@pytest.mark.parametrize("name", ("openrlhf", "verl"))
def test_float64_is_computed_in_float64(name, monkeypatch):
    monkeypatch.setattr(_common, "FLASH_ATTN_INSTALLED", False)
    logits, labels = fp64_sensitive_inputs()
    module = openrlhf if name == "openrlhf" else verl
    lp = module.log_probs_from_logits(logits.clone(), labels) if name == "openrlhf" else \
        module.logprobs_from_logits(logits, labels)
    ent = openrlhf.compute_entropy(logits) if name == "openrlhf" else verl.entropy_from_logits(logits)
    exact_lp, exact_ent = verl_log_probs(logits, labels), logsumexp_entropy(logits)
    assert (verl_log_probs(logits.float(), labels).double() - exact_lp).abs().max() > 1e-7  # fp32 would not do
    assert lp.dtype == ent.dtype == torch.float64
    assert_value(lp, exact_lp, torch.float64)
    assert_value(ent, exact_ent, torch.float64)


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_results_are_rounded_once_from_fp32(dtype, monkeypatch):
    """bf16/fp16 logits: the peers compute in that dtype; the drop-ins compute in fp32 and round once, so they
    are within half an ulp of the exact value (check_against_reference asserts it)."""
    monkeypatch.setattr(_common, "FLASH_ATTN_INSTALLED", False)
    logits, labels = inputs(dtype, scale=6.0, seed=11)
    check_against_reference(verl.logprobs_from_logits, verl_log_probs, logits, labels)
    check_against_reference(openrlhf.compute_entropy, logsumexp_entropy, logits)
