"""Prove the byte budget of docs/kernels.md §Byte budget by counting what the kernels load and store.

Under TRITON_INTERPRET=1 every tl.load/tl.store goes through the interpreter's builder; wrapping it
records the address of every element touched, so "each unmasked logit is read exactly once" becomes
a set equality with multiplicities, not an argument. The launchers of the Triton backend
(``triton_path.forward`` / ``backward`` / ``sequence_reduce``) are called directly, with every
compile-time flag: the soft cap and the statistics change what is computed per element, never what is
read or written per element. The raw forward of a vocabulary shard (``forward_raw``, the vocab-parallel
ops) is held to the same reads.
"""

from __future__ import annotations

import os
from collections import Counter
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from mallowspo_fast.ops import triton_path
from mallowspo_fast.ops.transform import IDENTITY, LogitTransform

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="byte counting needs the Triton interpreter"
)

IGNORE = -100
SOFTCAP = LogitTransform(temperature=0.7, softcap=30.0, logit_scale=2.0)
# (transform, return_stats): the flags off (the budget of the plain op), each flag alone, both.
FLAGS = {"plain": (IDENTITY, False), "softcap": (SOFTCAP, False), "stats": (IDENTITY, True),
         "softcap+stats": (SOFTCAP, True)}
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float64: "fp64"}


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


def _total(records) -> int:
    return sum(a.size * s for a, s in records)


def _expected_elements(logits, labels, ignore_index=IGNORE):
    """Storage element indices of the unmasked rows of a [B, T, V] view."""
    keep = []
    b_idx, t_idx = torch.nonzero(labels != ignore_index, as_tuple=True)
    v = torch.arange(logits.shape[-1])
    for b, t in zip(b_idx.tolist(), t_idx.tolist()):
        base = logits.storage_offset() + b * logits.stride(0) + t * logits.stride(1)
        keep.extend((base + v * logits.stride(2)).tolist())
    return keep


def _masked_labels(vocab):
    labels = torch.randint(0, vocab, (3, 6))
    labels[0, :4] = IGNORE
    labels[2] = IGNORE
    return labels


# ------------------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("flags", list(FLAGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("vocab", [37, 5000])
def test_forward_reads_each_unmasked_logit_once_and_writes_per_row_values(dtype, vocab, flags):
    transform, stats = FLAGS[flags]
    full = torch.randn(3, 7, vocab).to(dtype)
    logits = full[:, :-1]  # shifted view: rows of the last position are never touched
    labels = _masked_labels(vocab)
    with record_memory_traffic() as (loads, stores):
        out = triton_path.forward(logits, labels, IGNORE, transform, stats)
    counts, nbytes = _in_buffer(loads, full)
    expected = _expected_elements(logits, labels)
    assert set(counts) == set(expected), "forward must read exactly the unmasked rows' logits"
    assert max(counts.values()) == 1, "each logit is read exactly once"
    assert nbytes == len(expected) * full.element_size()
    # Besides the logits only the labels are read, once per row (8 bytes each).
    assert _total(loads) == nbytes + 8 * labels.numel()
    # Every row writes logp, H, lse and lse's rounding residual (masked rows: zeros) in the accumulation
    # dtype; the statistics add log Σp² and the mean logit (same dtype) and is_top1 (one byte). Each output
    # element once.
    acc = 8 if dtype == torch.float64 else 4
    per_row = 4 * acc + ((2 * acc + 1) if stats else 0)
    assert _total(stores) == per_row * labels.numel()
    for t in out:
        if t is not None:
            written, _ = _in_buffer(stores, t)
            assert len(written) == t.numel() and max(written.values()) == 1


@pytest.mark.parametrize("flags", list(FLAGS))
@pytest.mark.parametrize("vocab", [37, 5000])
def test_no_labels_forward_reads_every_logit_once_and_writes_two_floats_per_row(vocab, flags):
    transform, stats = FLAGS[flags]
    full = torch.randn(3, 7, vocab).to(torch.bfloat16)
    logits = full[:, :-1]  # the last position of each sequence is never touched
    with record_memory_traffic() as (loads, stores):
        out = triton_path.forward(logits, None, IGNORE, transform, stats)
    counts, nbytes = _in_buffer(loads, full)
    expected = _expected_elements(logits, torch.zeros(3, 6, dtype=torch.long))
    assert set(counts) == set(expected), "the forward must read exactly the rows of the view"
    assert max(counts.values()) == 1, "each logit is read exactly once: one pass, no second kernel"
    # Nothing but the logits is read (no labels); H, lse and its residual are written (+ log Σp², the mean).
    assert _total(loads) == nbytes == logits.shape[0] * logits.shape[1] * vocab * full.element_size()
    assert _total(stores) == (5 if stats else 3) * 4 * 3 * 6
    assert out.logps is None and out.is_top1 is None and out.entropy.shape == (3, 6)


@pytest.mark.parametrize("flags", list(FLAGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("with_labels", [True, False], ids=["labels", "nolabels"])
def test_raw_forward_of_a_vocabulary_shard_has_the_forward_budget(dtype, flags, with_labels):
    """RETURN_RAW (the vocab-parallel forward): the same reads as the forward, and its K raw values per row
    (4, or 7 with the statistics) written instead of the per-row results, masked rows included (zeros)."""
    transform, stats = FLAGS[flags]
    vocab = 5000
    full = torch.randn(3, 7, vocab).to(dtype)
    logits = full[:, :-1]
    labels = _masked_labels(vocab) if with_labels else None
    if with_labels:
        labels[1, 1] = -1  # a label of another shard: no column here
    with record_memory_traffic() as (loads, stores):
        raw = triton_path.forward_raw(logits, labels, IGNORE, transform, stats)
    mask = labels if with_labels else torch.zeros(3, 6, dtype=torch.long)
    counts, nbytes = _in_buffer(loads, full)
    expected = _expected_elements(logits, mask)
    assert set(counts) == set(expected) and max(counts.values()) == 1
    assert nbytes == len(expected) * full.element_size()
    assert _total(loads) == nbytes + (8 * mask.numel() if with_labels else 0)
    acc = 8 if dtype == torch.float64 else 4
    assert _total(stores) == (7 if stats else 4) * acc * mask.numel()
    written, _ = _in_buffer(stores, raw)
    assert len(written) == raw.numel() and max(written.values()) == 1


def test_sequence_reduce_reads_the_per_token_values_once_and_writes_three_per_sequence():
    labels = _masked_labels(50)
    logps, entropy = torch.randn(3, 6), torch.rand(3, 6)
    with record_memory_traffic() as (loads, stores):
        triton_path.sequence_reduce(labels, logps, entropy, IGNORE)
    assert _total(loads) == (8 + 4 + 4) * labels.numel()
    assert _total(stores) == (4 + 4 + 8) * 3


def test_out_of_range_labels_never_read_out_of_bounds():
    """Bad labels straight to the kernels: no access outside the row, NaN for the bad tokens (the GPU
    contract, where raising would need a host sync)."""
    vocab = 50
    logits = torch.randn(1, 4, vocab)
    labels = torch.tensor([[3, vocab, -7, 10**6]])
    with record_memory_traffic() as (loads, _):
        out = triton_path.forward(logits, labels, IGNORE, SOFTCAP, True)
    start = logits.untyped_storage().data_ptr()
    end = start + logits.untyped_storage().nbytes()
    lab0 = labels.untyped_storage().data_ptr()
    for addrs, _itemsize in loads:
        outside_logits = addrs[(addrs < start) | (addrs >= end)]
        # Every address outside the logits belongs to the (tiny) labels tensor.
        assert np.all((outside_logits >= lab0) & (outside_logits < lab0 + labels.numel() * 8))
    assert torch.isfinite(out.logps[0, 0]) and torch.isnan(out.logps[0, 1:]).all()
    assert torch.isfinite(out.entropy).all() and not out.is_top1[0, 1:].any()


# ----------------------------------------------------------------------------------------- backward


def _upstream(batch, seq, which):
    g, h = torch.randn(batch, seq), torch.randn(batch, seq)
    return {"both": (g, h), "logp": (g, None), "entropy": (None, h)}[which]


@pytest.mark.parametrize("transform", [IDENTITY, SOFTCAP], ids=["plain", "softcap"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "inplace"])
@pytest.mark.parametrize("upstream", ["both", "logp"])
def test_backward_reads_each_unmasked_logit_once_and_writes_each_gradient_once(dtype, inplace, transform,
                                                                               upstream):
    vocab = 3000
    logits = torch.randn(2, 5, vocab).to(dtype)
    labels = torch.randint(0, vocab, (2, 5))
    labels[1, 1:] = IGNORE
    out = triton_path.forward(logits, labels, IGNORE, transform)
    g, h = _upstream(2, 5, upstream)
    buffer = logits.clone() if inplace else logits
    with record_memory_traffic() as (loads, stores):
        grad = triton_path.backward(buffer, labels, out.lse, out.entropy, g, h, None, IGNORE, transform, inplace,
                                    out.lse_lo)
    # Loads of logits: each unmasked element once, masked rows never.
    read_counts, read_bytes = _in_buffer(loads, buffer)
    expected = _expected_elements(buffer, labels)
    assert set(read_counts) == set(expected) and max(read_counts.values()) == 1
    assert read_bytes == len(expected) * buffer.element_size()
    # Everything else read is O(N): every row's label, and for the unmasked rows lse and its residual, the
    # upstream grads given and H (only with an entropy grad).
    rows, live = labels.numel(), int((labels != IGNORE).sum())
    assert _total(loads) - read_bytes == 8 * rows + 4 * live * (2 + (g is not None) + 2 * (h is not None))
    # Stores into the gradient buffer: every element exactly once (masked rows get their zeros), nothing else.
    if inplace:
        assert grad.data_ptr() == buffer.data_ptr()
    write_counts, write_bytes = _in_buffer(stores, grad)
    assert write_bytes == _total(stores) == grad.numel() * grad.element_size()
    assert len(write_counts) == grad.numel() and max(write_counts.values()) == 1


@pytest.mark.parametrize("transform", [IDENTITY, SOFTCAP], ids=["plain", "softcap"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "inplace"])
@pytest.mark.parametrize("upstream", ["both", "entropy"])
def test_no_labels_backward_reads_once_writes_once(inplace, upstream, transform):
    vocab = 3000
    logits = torch.randn(2, 5, vocab).to(torch.bfloat16)
    out = triton_path.forward(logits, None, IGNORE, transform)
    h = torch.randn(2, 5)
    g_lse = torch.randn(2, 5) if upstream == "both" else None
    buffer = logits.clone() if inplace else logits
    with record_memory_traffic() as (loads, stores):
        grad = triton_path.backward(buffer, None, out.lse, out.entropy, None, h, g_lse, IGNORE, transform, inplace,
                                    out.lse_lo)
    read_counts, read_bytes = _in_buffer(loads, buffer)
    assert len(read_counts) == buffer.numel() and max(read_counts.values()) == 1
    assert read_bytes == buffer.numel() * buffer.element_size()
    # Per row: lse, its residual, H and the entropy grad (+ the lse grad); no labels.
    assert _total(loads) - read_bytes == 4 * 10 * (4 + (g_lse is not None))
    write_counts, write_bytes = _in_buffer(stores, grad)
    assert write_bytes == _total(stores) == grad.numel() * grad.element_size()
    assert len(write_counts) == grad.numel() and max(write_counts.values()) == 1
