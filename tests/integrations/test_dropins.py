"""TRL's helper drop-ins (``mallowspo_fast.integrations.trl_utils``) against TRL 1.16.0's definitions, written
out below in plain torch, and against the real installed TRL functions: values, result dtypes (the peer's),
gradients, float64 computed in float64, results edited in place, row masks and K labels per row."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import trl.trainer.utils as trl_real
from dropin_helpers import DTYPES, assert_value, check_against_reference, fp64_sensitive_inputs, inputs

from mallowspo_fast.integrations import _common, openrlhf, trl_utils, verl


# --- TRL 1.16.0 (trl/trainer/utils.py), eager path, in our words ---------------------------------------------
def trl_selective_log_softmax(logits, index, temperature=1.0, row_mask=None):
    """Scale the logits by 1/T in their own dtype, log-softmax over V, pick the indexed entries ([...] or
    [..., K]); positions with row_mask == 0 give 0. Result in the logits' dtype."""
    z = logits / temperature if temperature != 1.0 else logits
    single = index.dim() == logits.dim() - 1
    picked = z.log_softmax(-1).gather(-1, index.unsqueeze(-1) if single else index)
    picked = picked.squeeze(-1) if single else picked
    return picked if row_mask is None else picked.masked_fill(row_mask == 0, 0.0)


def trl_entropy(logits):
    """-Σ p log p with log p = log_softmax(logits), per row, in the logits' dtype."""
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def trl_joint(logits, index, temperature=1.0, row_mask=None):
    """Log-probs as above and the entropy of softmax(logits / T), 0 where row_mask == 0."""
    z = logits / temperature if temperature != 1.0 else logits
    entropy = trl_entropy(z)
    if row_mask is not None:
        entropy = entropy.masked_fill(row_mask == 0, 0.0)
    return trl_selective_log_softmax(z, index, row_mask=row_mask), entropy


# -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_selective_log_softmax_values_dtype_and_gradients(dtype):
    logits, labels = inputs(dtype)
    row_mask = torch.rand(labels.shape, generator=torch.Generator().manual_seed(4)) > 0.3
    topk = logits.float().topk(4, dim=-1).indices  # K labels per row
    cases = [((labels,), {}), ((labels,), dict(temperature=0.7)), ((labels,), dict(row_mask=row_mask)),
             ((topk,), dict(temperature=1.5)), ((topk,), dict(row_mask=topk > 100))]
    for args, kw in cases:
        out = check_against_reference(lambda x, i, kw=kw: trl_utils.selective_log_softmax(x, i, **kw),
                                      lambda x, i, kw=kw: trl_selective_log_softmax(x, i, **kw), logits, *args)
        # the peer's own result dtype, and its values within the peer's precision in that dtype
        peer = trl_real.selective_log_softmax(logits, *args, **kw)
        assert out.dtype == peer.dtype == trl_selective_log_softmax(logits, *args, **kw).dtype
        torch.testing.assert_close(out.detach().double(), peer.double(), rtol=4 * peer_tol(dtype), atol=1e-6)


def peer_tol(dtype):
    return {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_entropy_and_joint_values_dtype_and_gradients(dtype):
    logits, labels = inputs(dtype)
    check_against_reference(trl_utils.entropy_from_logits, trl_entropy, logits)
    assert trl_utils.entropy_from_logits(logits, chunk_size=2).dtype == trl_real.entropy_from_logits(logits, 2).dtype
    row_mask = (torch.arange(labels.numel()).view(labels.shape) % 3 != 0).long()
    for which in (0, 1):  # the log-probs, then the entropy, each against the definition
        for kw in (dict(temperature=2.0), dict(row_mask=row_mask, temperature=0.8)):
            check_against_reference(
                lambda x, y, kw=kw, w=which: trl_utils.selective_log_softmax_and_entropy(x, y, **kw)[w],
                lambda x, y, kw=kw, w=which: trl_joint(x, y, **kw)[w], logits, labels)
    lp, ent = trl_utils.selective_log_softmax_and_entropy(logits, labels, False, 2.0, row_mask)
    real_lp, real_ent = trl_real.selective_log_softmax_and_entropy(logits, labels, False, 2.0, row_mask)
    assert (lp.dtype, ent.dtype) == (real_lp.dtype, real_ent.dtype) == (dtype, dtype)
    tol = dict(rtol=4 * peer_tol(dtype), atol=1e-6)
    torch.testing.assert_close(lp.double(), real_lp.double(), **tol)
    torch.testing.assert_close(ent.double(), real_ent.double(), **tol)
    assert (ent[row_mask == 0] == 0).all() and (lp[row_mask == 0] == 0).all()


def test_entropy_requires_grad_false_gives_a_detached_entropy_and_k_labels_work_without_row_mask():
    logits, labels = inputs(torch.float32)
    x = logits.clone().requires_grad_(True)
    lp, ent = trl_utils.selective_log_softmax_and_entropy(x, labels, entropy_requires_grad=False)
    assert lp.requires_grad and not ent.requires_grad
    topk = logits.topk(3, dim=-1).indices
    lp_k, ent_k = trl_utils.selective_log_softmax_and_entropy(logits, topk, temperature=0.5)
    want_lp, want_ent = trl_real.selective_log_softmax_and_entropy(logits, topk, temperature=0.5)
    torch.testing.assert_close(lp_k, want_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent_k, want_ent, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="row_mask needs one label per row"):
        trl_utils.selective_log_softmax_and_entropy(logits, topk, row_mask=torch.ones_like(topk))


def test_float64_is_computed_in_float64():
    logits, labels = fp64_sensitive_inputs()
    exact_lp = trl_selective_log_softmax(logits, labels, temperature=0.3)
    # fp32 arithmetic on these logits is off by far more than the float64 tolerance below
    assert (trl_selective_log_softmax(logits.float(), labels, 0.3).double() - exact_lp).abs().max() > 1e-7
    lp = trl_utils.selective_log_softmax(logits, labels, temperature=0.3)
    lp2, ent = trl_utils.selective_log_softmax_and_entropy(logits, labels, temperature=0.3)
    ent_all = trl_utils.entropy_from_logits(logits / 0.3)
    assert {lp.dtype, lp2.dtype, ent.dtype, ent_all.dtype} == {torch.float64}
    for got, want in ((lp, exact_lp), (lp2, exact_lp), (ent, trl_entropy(logits / 0.3)),
                      (ent_all, trl_entropy(logits / 0.3))):
        assert_value(got, want, torch.float64)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_results_can_be_edited_in_place_before_the_backward(dtype):
    logits, labels = inputs(dtype)
    check_against_reference(trl_utils.selective_log_softmax, trl_selective_log_softmax, logits, labels,
                            edit=(0, 2))
    check_against_reference(trl_utils.entropy_from_logits, trl_entropy, logits, edit=(1, slice(None)))
    x = logits.clone().requires_grad_(True)
    lp, ent = trl_utils.selective_log_softmax_and_entropy(x * 1, labels)
    lp[0, 2] = 0.0
    ent.mul_(0.5)
    (lp.sum() + ent.sum()).backward()
    assert torch.isfinite(x.grad).all()


@pytest.fixture
def trl_kernel_on_cpu(monkeypatch):
    """Applies TRL's kernel rule to CPU tensors, as it applies to CUDA/XPU ones."""
    monkeypatch.setattr(trl_utils, "TRL_KERNEL_DEVICES", ("cpu",))
    monkeypatch.setattr(_common, "TRITON_INSTALLED", True)


def test_result_dtype_follows_trls_kernel_rule(trl_kernel_on_cpu):
    """TRL 1.16 (trl/trainer/utils.py::_supports_trl_loss_kernel): its Triton kernel takes logits on CUDA/XPU
    in fp32/bf16/fp16 with 1 to 3 dims, unit last stride, V > 0, one int32/int64 label per row on the same
    device, and a row mask of the labels' shape in bool/int32/int64; it returns fp32. Any other call goes to
    the eager path, which returns the logits' dtype."""
    logits, labels = inputs(torch.bfloat16)
    sel, joint, ent = (trl_utils.selective_log_softmax, trl_utils.selective_log_softmax_and_entropy,
                       trl_utils.entropy_from_logits)
    kernel = torch.float32
    assert sel(logits, labels).dtype == kernel and ent(logits).dtype == kernel
    assert [t.dtype for t in joint(logits, labels, row_mask=labels > 9)] == [kernel, kernel]
    assert sel(logits, labels, row_mask=(labels > 9).long()).dtype == kernel
    assert sel(logits, labels.int()).dtype == kernel
    eager = torch.bfloat16
    assert sel(logits, labels, row_mask=(labels > 9).float()).dtype == eager  # a float row mask
    assert sel(logits, logits.topk(2, -1).indices).dtype == eager  # K labels per row
    wide = logits.transpose(-1, -2).contiguous().transpose(-1, -2)  # last stride != 1
    assert sel(wide, labels).dtype == eager and ent(wide).dtype == eager
    assert ent(logits.view(3, 5, 1, 257)).dtype == eager  # 4 dims
    assert sel(logits.double(), labels).dtype == torch.float64 and ent(logits.double()).dtype == torch.float64
    assert ent(logits[0, 0]).dtype == kernel  # 1 dim
    with mock.patch.object(_common, "TRITON_INSTALLED", False):
        assert sel(logits, labels).dtype == eager and ent(logits).dtype == eager


def test_entropy_without_labels_is_one_pass_of_the_op():
    logits, labels = inputs(torch.float32)
    with mock.patch.object(_common, "token_entropy", wraps=_common.token_entropy) as ent, \
            mock.patch.object(_common, "token_logprobs", wraps=_common.token_logprobs) as lp:
        for fn in (trl_utils.entropy_from_logits, openrlhf.compute_entropy, verl.entropy_from_logits):
            fn(logits)
        assert ent.call_count == 3 and lp.call_count == 0
        trl_utils.selective_log_softmax_and_entropy(logits, labels)
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
    with pytest.raises(ValueError, match=r"selective_log_softmax: expected an index of shape \(3, 5\)"):
        trl_utils.selective_log_softmax(logits, labels[:2].unsqueeze(-1))
    with pytest.raises(TypeError, match="expected an integer index tensor, found list"):
        trl_utils.selective_log_softmax(logits, [1, 2])
