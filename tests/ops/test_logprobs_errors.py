"""Input validation, backend selection and 64-bit offsets of the fused op."""

from __future__ import annotations

import os

import pytest
import torch

import mallowspo_fast as mpf
from mallowspo_fast.ops.logprobs import resolve_backend
from mallowspo_fast.testing import BACKENDS, DEVICE, ref_token


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("bad", [50, -1, 10**9])
def test_out_of_range_label_raises_on_cpu(backend, bad):
    logits = torch.randn(2, 3, 50)
    labels = torch.zeros(2, 3, dtype=torch.long)
    labels[1, 2] = bad
    with pytest.raises(ValueError, match=rf"\[0, 50\).*found {bad} at position \(1, 2\)"):
        mpf.sequence_logprobs(logits, labels, backend=backend)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"logits \(2, 3, 10\) and labels \(2, 4\)"):
        mpf.token_logprobs(torch.randn(2, 3, 10), torch.zeros(2, 4, dtype=torch.long))


def test_sequence_needs_three_dims():
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        mpf.sequence_logprobs(torch.randn(3, 10), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize(
    "logits_dtype,labels_dtype,match",
    [(torch.int64, torch.int64, "logits must be"), (torch.float32, torch.float32, "labels must be int64")],
)
def test_dtype_errors(logits_dtype, labels_dtype, match):
    logits = torch.zeros(2, 5).to(logits_dtype)
    labels = torch.zeros(2).to(labels_dtype)
    with pytest.raises(TypeError, match=match):
        mpf.token_logprobs(logits, labels)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        mpf.token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), temperature=temperature)


def test_unknown_backend_and_env_override(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        mpf.token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), backend="cuda")
    monkeypatch.setenv("MALLOWSPO_FAST_BACKEND", "reference")
    assert resolve_backend(None, torch.device("cpu")) == "reference"
    monkeypatch.delenv("MALLOWSPO_FAST_BACKEND")
    assert resolve_backend(None, torch.device("cpu")) == "torch"
    assert resolve_backend(None, torch.device("cuda")) == "triton"


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        resolve_backend("triton", torch.device("cpu"))


@pytest.mark.skipif(DEVICE != "cpu", reason="lazily allocated host buffer")
@pytest.mark.parametrize("backend", BACKENDS)
def test_int64_offsets_beyond_2_pow_31_elements(backend):
    """Rows more than 2^31 elements apart in one buffer. The buffer is allocated lazily by the OS, so
    only the pages of the two rows we fill are ever backed by memory."""
    vocab = 64
    step = 2**31 + 96  # element distance between the two rows
    buf = torch.empty(step + vocab, dtype=torch.bfloat16)
    logits = buf.as_strided((2, 1, vocab), (step, vocab, 1))
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(2, 1, vocab, generator=gen).to(torch.bfloat16)
    logits.copy_(rows)
    labels = torch.tensor([[5], [vocab - 1]])
    logits.requires_grad_(False)
    leaf = logits.detach().requires_grad_(True)
    seq = mpf.sequence_logprobs(leaf, labels, backend=backend)
    _, ref_lp, ref_h = ref_token(rows, labels)
    torch.testing.assert_close(seq.logps.double(), ref_lp.sum(-1), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(seq.entropy.double(), ref_h.sum(-1), atol=1e-4, rtol=1e-5)
    seq.logps.sum().backward()
    assert leaf.grad.shape == (2, 1, vocab) and torch.isfinite(leaf.grad.float()).all()
    del buf


def test_interpreter_flag_is_set_for_the_suite():
    # The kernel tests above ran on CPU tensors: either a GPU exists or the interpreter is on.
    assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_labels_are_accepted(backend):
    logits = torch.randn(2, 3, 17, device=DEVICE)
    labels = torch.randint(0, 17, (2, 3), device=DEVICE)
    a = mpf.sequence_logprobs(logits, labels.int(), backend=backend)
    b = mpf.sequence_logprobs(logits, labels, backend=backend)
    assert torch.equal(a.logps, b.logps) and torch.equal(a.entropy, b.entropy)
