"""Batch invariance: a row's log-prob and entropy do not depend on the other rows of the batch, on padding
or on chunking. Bitwise for the logits-level op on every backend; what holds for the memory mode is
stated (and checked) below."""

from __future__ import annotations

import pytest
import torch

import mallowspo_fast as mpf
from mallowspo_fast.ops import torch_path as tp
from mallowspo_fast.testing import DEVICE

BACKENDS = ["torch-eager", "torch-compiled", "torch-native", "triton", "reference"]


def _rows(vocab, n=13, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, vocab, generator=gen) * 3).to(DEVICE, dtype)
    labels = torch.randint(0, vocab, (n,), generator=gen).to(DEVICE)
    return logits, labels


def _alone(fn, logits, labels):
    """Each row computed on its own: [n] outputs, one call per row."""
    outs = [fn(logits[i:i + 1].unsqueeze(0), labels[i:i + 1].unsqueeze(0)) for i in range(logits.shape[0])]
    return [torch.cat([o[k].reshape(-1) for o in outs]) for k in range(2)]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("vocab", [257, 5003], ids=["V257", "V5003"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_token_logprobs_bitwise_alone_batched_padded_and_masked(backend, vocab, dtype):
    logits, labels = _rows(vocab, dtype=dtype)
    n = logits.shape[0]

    def op(x, lab):
        out = mpf.token_logprobs(x, lab, backend=backend)
        return out.logps, out.entropy

    alone = _alone(op, logits, labels)
    batched = [t.reshape(-1) for t in op(logits.unsqueeze(0), labels.unsqueeze(0))]
    # Padded: the rows spread over a [3, 8] batch with padding positions (ignored labels, random logits)
    # and in another order; then shifted views of the same storage.
    pad = torch.randn(3, 8, vocab, generator=torch.Generator().manual_seed(9)).to(DEVICE, dtype)
    pad_labels = torch.full((3, 8), -100, device=DEVICE)
    slots = torch.randperm(24, generator=torch.Generator().manual_seed(1))[:n]
    pad.view(24, vocab)[slots] = logits
    pad_labels.view(24)[slots] = labels
    padded = [t.reshape(-1)[slots] for t in op(pad, pad_labels)]
    for a, b, c in zip(alone, batched, padded):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_token_entropy_bitwise_alone_and_batched(backend):
    logits, labels = _rows(5003, seed=2)

    def op(x, _lab):
        out = mpf.token_entropy(x, backend=backend)
        return out.entropy, out.lse

    alone = _alone(op, logits, labels)
    batched = [t.reshape(-1) for t in op(logits.unsqueeze(0), None)]
    shifted = torch.cat([logits, logits[:1]]).unsqueeze(0)[:, :-1]  # a view with another batch stride
    for a, b, c in zip(alone, batched, [t.reshape(-1) for t in op(shifted, None)]):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_the_torch_route_depends_on_the_vocabulary_only(monkeypatch):
    monkeypatch.setenv(tp.COMPILE_ENV, "auto")
    for vocab in (tp.COMPILE_MIN_VOCAB - 1, tp.COMPILE_MIN_VOCAB):
        routes = {tp.use_compiled(torch.empty(b, t, vocab)) for b, t in ((1, 1), (1, 2), (7, 300), (64, 4096))}
        assert len(routes) == 1


def test_memory_mode_what_holds():
    """The memory mode computes each chunk's logits with a GEMM whose blocking depends on the chunk's row
    count, so a row's logits can differ in the last bit between batches. What holds, and is checked:
    (1) bitwise equality when the chunks hold the same rows (any other rows of the batch being masked);
    (2) agreement with the logits-level op (and so with itself across batches) within fp32 rounding."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(1, 24, 32, generator=gen)
    weight = torch.randn(700, 32, generator=gen) * 0.3
    labels = torch.randint(0, 700, (1, 24), generator=gen)
    mine = labels.clone()
    mine[:, 12:] = -100  # the first 12 rows; the others of the batch masked
    other = labels.clone()
    other[:, 12:] = torch.randint(0, 700, (1, 12), generator=gen)  # the same 12 rows, new rows after them
    a = mpf.linear_token_logprobs(hidden, weight, mine, chunk_size=4, backend="torch")
    b = mpf.linear_token_logprobs(hidden[:, :12], weight, labels[:, :12], chunk_size=4, backend="torch")
    assert torch.equal(a.logps[:, :12], b.logps) and torch.equal(a.entropy[:, :12], b.entropy)
    c = mpf.linear_token_logprobs(hidden, weight, other, chunk_size=5, backend="torch")
    ref = mpf.token_logprobs(hidden @ weight.t(), other, backend="torch")
    torch.testing.assert_close(c.logps, ref.logps, atol=2e-5, rtol=1e-6)
    torch.testing.assert_close(c.logps[:, :12], b.logps, atol=2e-5, rtol=1e-6)
