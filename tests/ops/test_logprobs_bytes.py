"""Prove the byte budget of KERNELS.md §2 by counting what the kernels load and store.

Under TRITON_INTERPRET=1 every tl.load/tl.store goes through the interpreter's builder; wrapping it
records the address of every element touched, so "each unmasked logit is read exactly once" becomes
a set equality with multiplicities, not an argument.
"""

from __future__ import annotations

import os
from collections import Counter
from contextlib import contextmanager

import numpy as np
import pytest
import torch

import mallowspo_fast as mpf

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="byte counting needs the Triton interpreter"
)


@contextmanager
def record_memory_traffic():
    """Yield (loads, stores): lists of (addresses ndarray, itemsize) for every masked-in element."""
    from triton.runtime.interpreter import InterpreterBuilder

    loads, stores = [], []
    orig_load, orig_store = InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store

    def load(self, ptrs, mask, other, cache_policy, is_volatile):
        itemsize = np.dtype(_np_dtype(ptrs)).itemsize
        loads.append((np.broadcast_to(ptrs.data, mask.data.shape)[mask.data].astype(np.uint64), itemsize))
        return orig_load(self, ptrs, mask, other, cache_policy, is_volatile)

    def store(self, ptrs, value, mask, cache_policy):
        itemsize = value.data.dtype.itemsize
        stores.append((np.broadcast_to(ptrs.data, mask.data.shape)[mask.data].astype(np.uint64), itemsize))
        return orig_store(self, ptrs, value, mask, cache_policy)

    InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store = load, store
    try:
        yield loads, stores
    finally:
        InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store = orig_load, orig_store


def _np_dtype(ptrs):
    from triton.runtime.interpreter import _get_np_dtype

    return _get_np_dtype(ptrs.get_element_ty())


def _in_buffer(records, tensor):
    """Multiset of element indices of ``tensor``'s storage touched by ``records``, and total bytes."""
    start = tensor.untyped_storage().data_ptr()
    end = start + tensor.untyped_storage().nbytes()
    counts: Counter = Counter()
    nbytes = 0
    for addrs, itemsize in records:
        sel = addrs[(addrs >= start) & (addrs < end)]
        nbytes += sel.size * itemsize
        counts.update(((sel - start) // tensor.element_size()).tolist())
    return counts, nbytes


def _expected_elements(logits, labels, ignore_index=-100):
    """Storage element indices of the unmasked rows of a [B, T, V] view."""
    keep = []
    b_idx, t_idx = torch.nonzero(labels != ignore_index, as_tuple=True)
    v = torch.arange(logits.shape[-1])
    for b, t in zip(b_idx.tolist(), t_idx.tolist()):
        base = logits.storage_offset() + b * logits.stride(0) + t * logits.stride(1)
        keep.extend((base + v * logits.stride(2)).tolist())
    return keep


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("vocab", [37, 5000])
def test_forward_reads_each_unmasked_logit_once(dtype, vocab):
    full = torch.randn(3, 7, vocab).to(dtype)
    logits = full[:, :-1]  # shifted view: rows of the last position are never touched
    labels = torch.randint(0, vocab, (3, 6))
    labels[0, :4] = -100
    labels[2] = -100
    with record_memory_traffic() as (loads, stores):
        mpf.sequence_logprobs(logits, labels, backend="triton")
    counts, nbytes = _in_buffer(loads, full)
    expected = _expected_elements(logits, labels)
    assert set(counts) == set(expected), "forward must read exactly the unmasked rows' logits"
    assert max(counts.values()) == 1, "each logit is read exactly once"
    n_tokens = int((labels != -100).sum())
    assert nbytes == n_tokens * vocab * full.element_size()
    # Everything written is O(N): per-token logp/H/lse and per-sequence outputs.
    written = sum(a.size * s for a, s in stores)
    assert written <= 3 * 4 * labels.numel() + 3 * 8 * labels.shape[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "inplace"])
def test_backward_reads_once_writes_once(dtype, inplace):
    vocab = 3000
    leaf = torch.randn(2, 5, vocab).to(dtype).requires_grad_(True)
    # In place needs a non-leaf buffer to reuse; out of place, the kernel's buffer becomes leaf.grad.
    logits = leaf * 1 if inplace else leaf
    labels = torch.randint(0, vocab, (2, 5))
    labels[1, 1:] = -100
    seq = mpf.sequence_logprobs(logits, labels, backend="triton", inplace_backward=inplace)
    loss = (seq.logps * torch.tensor([0.3, -1.2]) + seq.entropy).sum()
    with record_memory_traffic() as (loads, stores):
        loss.backward()
    grad = leaf.grad
    logits = logits.detach()
    # Loads of logits: each unmasked element once, masked rows never.
    read_counts, read_bytes = _in_buffer(loads, logits)
    expected = _expected_elements(logits, labels)
    assert set(read_counts) == set(expected) and max(read_counts.values()) == 1
    assert read_bytes == len(expected) * logits.element_size()
    # Stores into the gradient buffer: every element exactly once (masked rows get their zeros).
    target = logits if inplace else grad
    write_counts, write_bytes = _in_buffer(stores, target)
    if inplace:
        # The in-place gradient lives in the logits buffer and flows straight to the leaf.
        assert write_bytes == logits.numel() * logits.element_size()
    else:
        assert write_bytes == grad.numel() * grad.element_size()
    assert len(write_counts) == logits.numel() and max(write_counts.values()) == 1


def test_out_of_range_labels_never_read_out_of_bounds():
    """Bypass the CPU validation and call the kernels directly with bad labels: no access outside the
    row, NaN for the bad tokens (the GPU contract, where raising would need a host sync)."""
    from mallowspo_fast.ops.triton_path import triton_token_logprobs

    vocab = 50
    logits = torch.randn(1, 4, vocab)
    labels = torch.tensor([[3, vocab, -7, 10**6]])
    with record_memory_traffic() as (loads, _):
        logps, entropy = triton_token_logprobs(logits, labels, -100, 1.0)
    start = logits.untyped_storage().data_ptr()
    end = start + logits.untyped_storage().nbytes()
    for addrs, _itemsize in loads:
        outside_labels = addrs[(addrs < start) | (addrs >= end)]
        # Every address outside the logits belongs to the (tiny) labels tensor.
        lab0 = labels.untyped_storage().data_ptr()
        assert np.all((outside_labels >= lab0) & (outside_labels < lab0 + labels.numel() * 8))
    assert torch.isfinite(logps[0, 0]) and torch.isnan(logps[0, 1:]).all()
    assert torch.isfinite(entropy).all()


# ------------------------------------------------------------------ without labels (labels=None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("vocab", [37, 5000])
def test_no_labels_forward_reads_every_logit_once_and_writes_two_floats_per_row(dtype, vocab):
    full = torch.randn(3, 7, vocab).to(dtype)
    logits = full[:, :-1]  # the last position of each sequence is never touched
    with record_memory_traffic() as (loads, stores):
        out = mpf.token_logprobs(logits, None, backend="triton")
    counts, nbytes = _in_buffer(loads, full)
    expected = _expected_elements(logits, torch.zeros(3, 6, dtype=torch.long))
    assert set(counts) == set(expected), "the forward must read exactly the rows of the view"
    assert max(counts.values()) == 1, "each logit is read exactly once: one pass, no second kernel"
    assert nbytes == logits.shape[0] * logits.shape[1] * vocab * full.element_size()
    # Nothing but the logits is read (no labels), and only H and lse are written: 2 fp32 per row.
    assert sum(a.size * s for a, s in loads) == nbytes
    assert sum(a.size * s for a, s in stores) == 2 * 4 * 3 * 6
    assert out.entropy.shape == (3, 6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "inplace"])
@pytest.mark.parametrize("upstream", ["both", "entropy"])
def test_no_labels_backward_reads_once_writes_once(dtype, inplace, upstream):
    vocab = 3000
    leaf = torch.randn(2, 5, vocab).to(dtype).requires_grad_(True)
    logits = leaf * 1 if inplace else leaf
    out = mpf.token_entropy(logits, backend="triton", inplace_backward=inplace)
    loss = (out.entropy * torch.randn(2, 5)).sum()
    if upstream == "both":
        loss = loss + (out.lse * torch.randn(2, 5)).sum()
    with record_memory_traffic() as (loads, stores):
        loss.backward()
    logits = logits.detach()
    read_counts, read_bytes = _in_buffer(loads, logits)
    assert len(read_counts) == logits.numel() and max(read_counts.values()) == 1
    assert read_bytes == logits.numel() * logits.element_size()
    target = logits if inplace else leaf.grad
    write_counts, write_bytes = _in_buffer(stores, target)
    assert write_bytes == target.numel() * target.element_size()
    assert len(write_counts) == target.numel() and max(write_counts.values()) == 1
