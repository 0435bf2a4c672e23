"""The torch path's pooled gradient buffer (CPU): reused only when nothing else holds its storage."""

from __future__ import annotations

import torch

import mallowspo_fast as mpf
from mallowspo_fast.ops import torch_path as tp


def _grad(logits, labels):
    x = logits.clone().requires_grad_(True)
    y = x * 1.0  # a non-leaf: the op's gradient flows on to the multiplication, then is freed
    out = mpf.token_logprobs(y, labels, backend="torch")
    captured = {}
    y.register_hook(lambda g: captured.update(ptr=g.data_ptr()))
    (out.logps.sum() + 0.5 * out.entropy.sum()).backward()
    return x.grad, captured["ptr"]


def test_a_free_buffer_is_reused_and_a_held_one_is_not(monkeypatch):
    monkeypatch.setenv(tp.POOL_ENV, "1")
    monkeypatch.setattr(tp._GradPool, "buffers", {})
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 300, generator=gen) * 3
    labels = torch.randint(0, 300, (2, 5), generator=gen)
    labels[0, 1] = -100
    ref = _grad(logits, labels)[0]
    first = _grad(logits, labels)
    second = _grad(logits, labels)
    assert first[1] == second[1], "a free pooled buffer was not reused"
    for got in (first[0], second[0]):
        torch.testing.assert_close(got, ref, atol=0, rtol=0)
    # A caller holding the op's gradient keeps it from the pool: the next backward writes elsewhere.
    held = []
    x = logits.clone().requires_grad_(True)
    y = x * 1.0
    y.register_hook(lambda g: held.append(g))
    out = mpf.token_logprobs(y, labels, backend="torch")
    (out.logps.sum() + 0.5 * out.entropy.sum()).backward()
    third = _grad(logits, labels)
    assert third[1] != held[0].data_ptr()
    torch.testing.assert_close(held[0], x.grad, atol=0, rtol=0)  # untouched by the later backward
    torch.testing.assert_close(third[0], ref, atol=0, rtol=0)
    # Leaf logits never use the pool (autograd keeps a leaf's gradient tensor itself as .grad).
    before = dict(tp._GradPool.buffers)
    leaf = logits.clone().requires_grad_(True)
    out = mpf.token_logprobs(leaf, labels, backend="torch")
    (out.logps.sum() + 0.5 * out.entropy.sum()).backward()
    assert all(leaf.grad.data_ptr() != b.data_ptr() for b in before.values())
    torch.testing.assert_close(leaf.grad, ref, atol=0, rtol=0)


def test_the_pool_can_be_turned_off(monkeypatch):
    monkeypatch.setenv(tp.POOL_ENV, "0")
    monkeypatch.setattr(tp._GradPool, "buffers", {})
    logits = torch.randn(1, 3, 50)
    labels = torch.randint(0, 50, (1, 3))
    _grad(logits, labels)
    assert tp._GradPool.buffers == {}


def test_two_ops_on_the_same_logits_never_share_a_buffer(monkeypatch):
    """Two gradients of the same shape in flight at once (log-probs and the entropy of every row of one
    logits tensor): the second backward must not reuse the buffer autograd still holds for the first."""
    monkeypatch.setenv(tp.POOL_ENV, "1")
    monkeypatch.setattr(tp._GradPool, "buffers", {})
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 300, generator=gen) * 3
    labels = torch.randint(0, 300, (2, 4), generator=gen)
    grads = []
    for pooled in ("0", "1", "1"):
        monkeypatch.setenv(tp.POOL_ENV, pooled)
        x = logits.clone().requires_grad_(True)
        y = x * 1.0
        a = mpf.token_logprobs(y, labels, backend="torch")
        b = mpf.token_entropy(y, backend="torch")
        (a.logps.sum() + 0.5 * a.entropy.sum() + b.entropy.sum() - 0.1 * b.lse.sum()).backward()
        grads.append(x.grad)
    for got in grads[1:]:
        torch.testing.assert_close(got, grads[0], atol=0, rtol=0)
