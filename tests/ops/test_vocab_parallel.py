"""Vocab-parallel op in one process: the backends' ``forward_raw`` against float64, the exact combination
of shards (the two all-reduces replaced by a max and a sum over shards computed here) and the local backward
against the single-device op on the full vocabulary, and the public API's argument checks on a one-rank
gloo group. The ops over real ranks: test_vocab_parallel_ranks.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from vp_ranks import free_port

import mallowspo_fast as mpf
from mallowspo_fast.ops import torch_path, triton_path
from mallowspo_fast.ops.transform import IDENTITY, LogitTransform
from mallowspo_fast.ops.vocab_parallel_combine import finish, local_labels, pack

IGNORE = -100
CAPPED = LogitTransform(temperature=0.7, softcap=30.0, logit_scale=2.0)
SCALED = LogitTransform(temperature=1.3, logit_scale=-0.5)
IMPL = {"torch": torch_path, "triton": triton_path}


def _labels(batch, seq, vocab, gen):
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[0, :2] = IGNORE
    return labels


def _raw_f64(z, labels, stats):
    """m, s, w, z[label] (+ q, Σ z, first argmax) of transformed logits z [R, V] in float64."""
    m = z.amax(-1, keepdim=True)
    e = torch.exp(z - m)
    cols = [m[:, 0], e.sum(-1), (e * (z - m)).sum(-1)]
    owned = (labels >= 0) & (labels < z.shape[-1]) if labels is not None else None
    if labels is None:
        cols.append(torch.zeros_like(cols[0]))
    else:
        safe = torch.where(owned, labels, 0)
        cols.append(torch.where(owned, z.gather(-1, safe[:, None])[:, 0], 0.0))
    if stats:
        cols += [(e * e).sum(-1), z.sum(-1), z.argmax(-1).double() if labels is not None else torch.zeros_like(m[:, 0])]
    return torch.stack(cols, -1)


# The compiled route compiles one graph per dtype and flag set (seconds each): two of them here, the
# other combinations run through the same code with other constants.
RAW_CASES = [(b, d, s, lab) for b in ("torch-eager", "triton") for d in (torch.float32, torch.bfloat16, torch.float64)
             for s in (False, True) for lab in (True, False)]
RAW_CASES += [("torch-compiled", torch.bfloat16, True, True), ("torch-compiled", torch.float32, False, False)]


@pytest.mark.parametrize(("backend", "dtype", "stats", "with_labels"), RAW_CASES, indirect=["backend"],
                         ids=[f"{b}-{str(d)[6:]}-{'stats' if s else 'plain'}-{'labels' if lab else 'nolabels'}"
                              for b, d, s, lab in RAW_CASES])
def test_forward_raw_matches_float64(backend, dtype, stats, with_labels):
    gen = torch.Generator().manual_seed(1)
    vocab = 4500 if torch_path.compile_mode() == "1" else 37  # the compiled route's vocabularies
    full = (torch.randn(2, 6, vocab, generator=gen) * 4).to(dtype)
    logits = full[:, :-1]  # a shifted view
    labels = _labels(2, 5, vocab, gen) if with_labels else None
    if with_labels:
        labels[1, 0] = -1  # another shard's label: no column of this one
    out = IMPL[backend].forward_raw(logits, labels, IGNORE, CAPPED, stats)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.shape == (2, 5, 7 if stats else 4) and out.dtype == acc
    z = CAPPED.apply(logits.double()).reshape(10, vocab)
    ref = _raw_f64(z, None if labels is None else labels.reshape(-1), stats).view(2, 5, -1)
    if with_labels:
        ref[labels == IGNORE] = 0
    rtol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=rtol * vocab)


@pytest.mark.parametrize("backend", ["torch-eager", "triton"], indirect=True)
def test_forward_raw_of_a_shard_of_only_minus_inf(backend):
    logits = torch.full((1, 3, 9), float("-inf"))
    out = IMPL[backend].forward_raw(logits, torch.tensor([[2, -1, IGNORE]]), IGNORE, IDENTITY, True)
    assert out[0, 0, 0] == float("-inf") and (out[0, :2, 1:3] == 0).all()
    assert out[0, 0, 3] == float("-inf") and out[0, 1, 3] == 0  # the label's logit; another shard's label
    assert (out[0, 2] == 0).all()  # masked row


# --------------------------------------------------------------------- shards combined in one process


def _combine_in_process(impl, full, labels, bounds, transform, stats):
    """What the ranks compute, with the all-reduces as a max and a sum over the shards here."""
    batch, seq, _ = full.shape
    flat = None if labels is None else labels.reshape(-1)
    raws, locals_ = [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        loc = None if labels is None else local_labels(labels, a, b - a, IGNORE)
        locals_.append(loc)
        raws.append(impl.forward_raw(full[..., a:b], loc, IGNORE, transform, stats).view(batch * seq, -1))
    gmax = torch.stack([r[:, 0] for r in raws]).amax(0)
    summed = sum(pack(r, gmax, flat, IGNORE, a, b - a, stats) for r, a, b in zip(raws, bounds[:-1], bounds[1:]))
    rows, vocab = finish(gmax, summed, flat, IGNORE, stats)
    assert vocab == full.shape[-1]
    return type(rows)(*(None if t is None else t.view(batch, seq) for t in rows)), locals_


BOUNDS = {"even": (0, 20, 40), "uneven": (0, 9, 10, 26, 40), "one-column-first": (0, 1, 40)}


@pytest.mark.parametrize("backend", ["torch-eager", "triton"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize(("transform", "bounds"),
                         [(IDENTITY, "even"), (CAPPED, "uneven"), (SCALED, "one-column-first")],
                         ids=["identity-even", "softcap-uneven", "scaled-one-column-first"])
@pytest.mark.parametrize("with_labels", [True, False], ids=["labels", "nolabels"])
def test_shards_combine_to_the_single_device_op(backend, dtype, transform, bounds, with_labels):
    impl = IMPL[backend]
    gen = torch.Generator().manual_seed(2)
    full = (torch.randn(3, 5, 40, generator=gen) * 5).to(dtype)
    labels = _labels(3, 5, 40, gen) if with_labels else None
    rows, locals_ = _combine_in_process(impl, full, labels, BOUNDS[bounds], transform, True)
    ref = impl.forward(full, labels, IGNORE, transform, True)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6, atol=2e-6)
    for name in ("logps", "entropy", "lse", "log_sum_sq_probs", "mean_logits"):
        got, want = getattr(rows, name), getattr(ref, name)
        if want is None:
            assert got is None
            continue
        torch.testing.assert_close(got, want, **tol, msg=name)
    if with_labels:
        assert torch.equal(rows.is_top1, ref.is_top1)
    # The backward is local: each shard's gradient with the global lse and H is the full gradient's slice.
    g, h = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen)
    g_lse = None if with_labels else torch.randn(3, 5, generator=gen)
    g_logp = g if with_labels else None
    want = impl.backward(full, labels, ref.lse, ref.entropy, g_logp, h, g_lse, IGNORE, transform, False,
                         lse_lo=ref.lse_lo).clone()
    edges = BOUNDS[bounds]
    # (each shard's gradient copied at once: the torch path on CPU may hand out one pooled buffer per shape)
    got = torch.cat([impl.backward(full[..., a:b].contiguous(), loc, rows.lse, rows.entropy, g_logp, h, g_lse,
                                   IGNORE, transform, False, lse_lo=rows.lse_lo).clone()
                     for a, b, loc in zip(edges[:-1], edges[1:], locals_)], -1)
    gtol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else (
        dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-5))
    torch.testing.assert_close(got.double(), want.double(), **gtol)


@pytest.mark.parametrize("backend", ["torch-eager", "triton"], indirect=True)
def test_top1_ties_across_shards_first_global_index_wins(backend):
    full = torch.zeros(1, 4, 12)
    full[..., 3] = full[..., 8] = 5.0  # the max twice: in shard 0 (ids 0-5) and shard 1 (ids 6-11)
    full[0, 3, 8] = 6.0  # last row: the max only in shard 1
    labels = torch.tensor([[3, 8, 0, 8]])
    rows, _ = _combine_in_process(IMPL[backend], full, labels, (0, 6, 12), IDENTITY, True)
    assert rows.is_top1.tolist() == [[True, False, False, True]]
    assert torch.equal(rows.is_top1, IMPL[backend].forward(full, labels, IGNORE, IDENTITY, True).is_top1)


@pytest.mark.parametrize("backend", ["torch-eager", "triton"], indirect=True)
def test_large_logits_and_shifts_stay_exact(backend):
    impl = IMPL[backend]
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(2, 4, 40, generator=gen, dtype=torch.float64) * 3
    labels = _labels(2, 4, 40, gen)
    for shift in (0.0, 1e4, -1e4):
        full = (base + shift).float()
        # float64 of the very fp32 inputs (the shifted ones are rounded at 1e4: ulp 1e-3)
        want_logp, want_h = mpf.ops.naive.naive_token_logprobs(full.double(), labels, IGNORE,
                                                               compute_dtype=torch.float64)
        rows, locals_ = _combine_in_process(impl, full, labels, (0, 9, 23, 40), IDENTITY, False)
        ref = impl.forward(full, labels, IGNORE, IDENTITY, False)
        # H is kept relative to the max and the log-prob is formed as (z[label] − M) − log S: as exact at 1e4 as
        # at 0 (z[label] − lse would carry the rounding of lse at 1e4, 1e-3 in fp32).
        torch.testing.assert_close(rows.entropy, ref.entropy, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(rows.entropy.double(), want_h, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rows.logps.double(), want_logp, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(rows.logps, ref.logps, rtol=1e-6, atol=1e-5)
        # The backward: p = e^{(z − lse) − lse_lo} with the combination's lse residual, as exact as at 0.
        g, h = torch.ones(2, 4), torch.full((2, 4), 0.5)
        got = torch.cat([impl.backward(full[..., a:b].contiguous(), loc, rows.lse, rows.entropy, g, h, None, IGNORE,
                                       IDENTITY, False, lse_lo=rows.lse_lo).clone()
                         for a, b, loc in zip((0, 9, 23), (9, 23, 40), locals_)], -1)
        x = full.double().requires_grad_(True)
        lp, ent = mpf.ops.naive.naive_token_logprobs(x, labels, IGNORE, compute_dtype=torch.float64)
        (lp.sum() + 0.5 * ent.sum()).backward()
        torch.testing.assert_close(got.double(), x.grad, rtol=1e-5, atol=1e-6)
    # A shard whose logits sit 1e4 under the others' adds exactly nothing (its e^{m_r − M} underflows to 0), and
    # the shard holding the max alone carries the row.
    far = base.clone()
    far[..., 23:] -= 1e4
    far = far.float()
    rows, _ = _combine_in_process(impl, far, labels, (0, 9, 23, 40), IDENTITY, False)
    want_logp, want_h = mpf.ops.naive.naive_token_logprobs(far.double(), labels, IGNORE, compute_dtype=torch.float64)
    torch.testing.assert_close(rows.entropy.double(), want_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows.logps.double(), want_logp, rtol=1e-6, atol=1e-5)  # some about -1e4


def test_local_labels_never_collide_with_ignore_index():
    labels = torch.tensor([0, 5, 10, 14, IGNORE, -1])
    assert local_labels(labels, 10, 5, IGNORE).tolist() == [-1, -1, 0, 4, IGNORE, -1]
    # ignore_index = -1: another shard's label becomes -2, never the ignore value
    assert local_labels(torch.tensor([0, 12, -1]), 10, 5, -1).tolist() == [-2, 2, -1]
    # a label 100 below the shard would be -100 in shard coordinates: it stays "another shard's"
    assert local_labels(torch.tensor([100]), 200, 50, IGNORE).tolist() == [-1]


# ----------------------------------------------------------------------- public API on one rank


@pytest.fixture
def one_rank_group():
    """A one-rank gloo group in this process (destroyed afterwards)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_one_rank_equals_the_single_device_ops(one_rank_group):
    gen = torch.Generator().manual_seed(4)
    full = torch.randn(2, 5, 40, generator=gen)
    labels = _labels(2, 5, 40, gen)
    got = mpf.vocab_parallel_token_logprobs(full, labels, vocab_start=0, backend="torch", return_stats=True)
    want = mpf.token_logprobs(full, labels, backend="torch", return_stats=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    seq = mpf.vocab_parallel_sequence_logprobs(full, labels, vocab_start=0, group=one_rank_group, backend="triton")
    for a, b in zip(seq, mpf.sequence_logprobs(full, labels, backend="triton")):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_one_rank_rows_all_masked_and_the_memory_mode(one_rank_group):
    """Nothing unmasked anywhere (empty collectives), and the memory mode on one rank against its single-device
    form (values and the gradients of hidden, weight and bias)."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 16, generator=gen, requires_grad=True)
    none = torch.full((2, 3), IGNORE)
    out = mpf.vocab_parallel_token_logprobs(logits, none, vocab_start=0, backend="torch")
    (out.logps.sum() + out.entropy.sum()).backward()
    assert not out.logps.any() and not out.entropy.any() and not logits.grad.any()
    hidden = torch.randn(2, 3, 8, generator=gen, requires_grad=True)
    weight, bias = torch.randn(16, 8, generator=gen, requires_grad=True), torch.randn(16, generator=gen,
                                                                                       requires_grad=True)
    tok = mpf.vocab_parallel_linear_token_logprobs(hidden, weight, none, vocab_start=0, bias=bias, chunk_size=2)
    (tok.logps.sum() + tok.entropy.sum()).backward()
    assert not tok.logps.any() and not hidden.grad.any() and not weight.grad.any() and not bias.grad.any()
    labels = _labels(2, 3, 16, gen)
    grads = []
    for fn, kw in ((mpf.vocab_parallel_linear_token_logprobs, dict(vocab_start=0)), (mpf.linear_token_logprobs, {})):
        params = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
        tok = fn(params[0], params[1], labels, bias=params[2], chunk_size=2, temperature=0.7, **kw)
        ((tok.logps * 2).sum() + tok.entropy.sum()).backward()
        grads.append((tok.logps.detach(), tok.entropy.detach(), *(p.grad for p in params)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_argument_errors(one_rank_group):
    logits, labels = torch.randn(2, 3, 8), torch.randint(0, 8, (2, 3))
    with pytest.raises(ValueError, match="vocab_start must be a non-negative int"):
        mpf.vocab_parallel_token_logprobs(logits, labels, vocab_start=-1)
    with pytest.raises(TypeError, match="group must be a torch.distributed ProcessGroup"):
        mpf.vocab_parallel_token_logprobs(logits, labels, vocab_start=0, group="tp")
    with pytest.raises(ValueError, match="backend='reference' has no vocab-parallel form"):
        mpf.vocab_parallel_token_logprobs(logits, labels, vocab_start=0, backend="reference")
    with pytest.raises(ValueError, match=r"found -3 at position \(1, 2\)"):
        mpf.vocab_parallel_token_logprobs(logits, labels.index_put((torch.tensor(1), torch.tensor(2)),
                                                                   torch.tensor(-3)), vocab_start=0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 8\).*found 8 at position \(0, 1\)"):
        mpf.vocab_parallel_token_logprobs(logits, labels.index_put((torch.tensor(0), torch.tensor(1)),
                                                                   torch.tensor(8)), vocab_start=0)
    with pytest.raises(ValueError, match=r"found 8 at position \(2,\)"):  # memory mode: the caller's position
        mpf.vocab_parallel_linear_token_logprobs(torch.randn(4, 5), torch.randn(8, 5), torch.tensor([IGNORE, 1, 8, 2]),
                                                 vocab_start=0)
    with pytest.raises(ValueError, match="labels are required"):
        mpf.vocab_parallel_sequence_logprobs(logits, None, vocab_start=0)
    with pytest.raises(ValueError, match=r"expected weight \[V, H\]"):
        mpf.vocab_parallel_linear_token_logprobs(torch.randn(3, 4), torch.randn(8, 5), torch.zeros(3, dtype=torch.long),
                                                 vocab_start=0)


def test_without_torch_distributed_a_clear_error():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        mpf.vocab_parallel_token_logprobs(torch.randn(2, 8), torch.zeros(2, dtype=torch.long), vocab_start=0)
