"""Vocab-parallel ops on 2 and 4 gloo ranks on CPU (spawned here): values and gradients equal to the
single-device op on the full vocabulary, with uneven shards (a one-column shard among them), labels in
other shards, ignore_index rows, temperature / logit scale / soft cap, labels=None, statistics, the
sequence form, in-place backward and the memory mode with a bias; every rank gets the same results."""

from __future__ import annotations

import pytest
import torch
from vp_ranks import run_ranks

import mallowspo_fast as mpf
from mallowspo_fast.ops.naive import naive_token_logprobs

IGNORE = -100
VOCAB, HIDDEN = 37, 16
BOUNDS = {2: (0, 20, 37), 4: (0, 9, 10, 26, 37)}
CAPPED = dict(temperature=0.7, softcap=30.0, logit_scale=2.0)
F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64
# name: (kind, logits dtype, backend, transform keywords)
CASES = {
    "token-fp32-torch-softcap": ("token", F32, "torch", CAPPED),
    "token-fp32-triton-temperature": ("token", F32, "triton", dict(temperature=0.7)),
    "token-bf16-torch": ("token", BF16, "torch", {}),
    "token-bf16-triton-softcap": ("token", BF16, "triton", CAPPED),
    "token-fp64-torch": ("token", F64, "torch", dict(temperature=1.3, logit_scale=-0.5)),
    "inplace-fp32-torch": ("inplace", F32, "torch", {}),
    "entropy-fp32-torch": ("entropy", F32, "torch", dict(temperature=0.7)),
    "entropy-fp32-triton-softcap": ("entropy", F32, "triton", CAPPED),
    "stats-fp32-torch": ("stats", F32, "torch", {}),
    "stats-fp32-triton-softcap": ("stats", F32, "triton", CAPPED),
    "sequence-fp32-triton": ("sequence", F32, "triton", dict(temperature=0.7)),
    "sequence-bf16-torch-softcap": ("sequence", BF16, "torch", CAPPED),
    "linear-fp32-torch-bias": ("linear", F32, "torch", dict(temperature=0.7)),
    "linear-fp32-triton-bias-softcap": ("linear", F32, "triton", CAPPED),
    "linear-bf16-torch-bias": ("linear", BF16, "torch", {}),
}


def _inputs(name: str):
    """The full-vocabulary inputs of a case, the same in every process (seeded by the case's index)."""
    kind, dtype, _, _ = CASES[name]
    gen = torch.Generator().manual_seed(list(CASES).index(name))
    labels = torch.randint(0, VOCAB, (3, 6), generator=gen)
    labels[0, :3] = IGNORE
    labels[2, 4] = 19  # the last id of the first shard at tp = 2; ids in every shard appear too
    labels[1, 2], labels[1, 5] = 9, 36
    out = dict(labels=labels, g=torch.randn(3, 6, generator=gen), h=torch.randn(3, 6, generator=gen),
               g_seq=torch.randn(3, generator=gen), h_seq=torch.randn(3, generator=gen))
    if kind == "linear":
        out["hidden"] = torch.randn(3, 6, HIDDEN, generator=gen).to(dtype)
        out["weight"] = (torch.randn(VOCAB, HIDDEN, generator=gen) / 2).to(dtype)
        out["bias"] = torch.randn(VOCAB, generator=gen).to(dtype)
    else:
        logits = torch.randn(3, 6, VOCAB, generator=gen) * 4
        if kind == "stats":  # ties of the max across shards: the first global index must win
            logits[..., 9] = logits[..., 30] = 50.0
        out["logits"] = logits.to(dtype)
    return out


def _run(name: str, inp: dict, shard: slice | None, **dist_kw):
    """One forward + backward of case ``name``: on a shard with ``dist_kw`` (vocab-parallel op), or on the
    full vocabulary without (the single-device op). Returns (outputs, gradients), detached."""
    kind, _, backend, kw = CASES[name]
    vp = shard is not None
    sl = shard if vp else slice(None)
    labels = inp["labels"]
    if kind == "linear":
        hidden = inp["hidden"].clone().requires_grad_(True)
        weight = inp["weight"][sl].clone().requires_grad_(True)
        bias = inp["bias"][sl].clone().requires_grad_(True)
        fn = mpf.vocab_parallel_linear_token_logprobs if vp else mpf.linear_token_logprobs
        out = fn(hidden, weight, labels, bias=bias, backend=backend, chunk_size=5, **kw, **dist_kw)
        ((out.logps * inp["g"]).sum() + (out.entropy * inp["h"]).sum()).backward()
        return tuple(out), (hidden.grad, weight.grad, bias.grad)
    logits = inp["logits"][..., sl].clone().requires_grad_(True)
    leaf = logits
    if kind == "inplace":
        logits = logits * 1.0  # in place over a non-leaf tensor that nothing else needs
        kw = dict(kw, inplace_backward=True)
    if kind == "sequence":
        fn = mpf.vocab_parallel_sequence_logprobs if vp else mpf.sequence_logprobs
        out = fn(logits, labels, backend=backend, **kw, **dist_kw)
        ((out.logps * inp["g_seq"]).sum() + (out.entropy * inp["h_seq"]).sum()).backward()
        return tuple(out), (leaf.grad,)
    if kind == "entropy":
        fn = mpf.vocab_parallel_token_entropy if vp else mpf.token_entropy
        out = fn(logits, backend=backend, **kw, **dist_kw)
        ((out.entropy * inp["h"]).sum() + (out.lse * inp["g"]).sum()).backward()
        return tuple(out), (leaf.grad,)
    fn = mpf.vocab_parallel_token_logprobs if vp else mpf.token_logprobs
    out = fn(logits, labels, backend=backend, return_stats=kind == "stats", **kw, **dist_kw)
    ((out.logps * inp["g"]).sum() + (out.entropy * inp["h"]).sum()).backward()
    return tuple(t for t in out if t is not None), (leaf.grad,)


def rank_main(rank: int, world: int) -> dict:
    """What each spawned rank runs: every case on its shard, and a label beyond V."""
    bounds = BOUNDS[world]
    shard = slice(bounds[rank], bounds[rank + 1])
    results = {}
    for name in CASES:
        out, grads = _run(name, _inputs(name), shard, vocab_start=bounds[rank])
        results[name] = ([t.detach() for t in out], [None if g is None else g.detach() for g in grads])
    logits = torch.randn(2, 3, shard.stop - shard.start)
    labels = torch.zeros(2, 3, dtype=torch.long)
    labels[1, 2] = VOCAB
    try:
        mpf.vocab_parallel_token_logprobs(logits, labels, vocab_start=bounds[rank])
        results["error"] = None
    except ValueError as e:
        results["error"] = str(e)
    return results


def _tolerance(dtype, grad: bool) -> dict:
    if dtype == F64:
        return dict(rtol=1e-12, atol=1e-12)
    if dtype == BF16 and grad:
        return dict(rtol=1.6e-2, atol=1e-5)  # the gradient is rounded to bf16: one ulp apart at most
    # fp32 values (bf16 logits too: computed in fp32); gradients: p = e^{z − lse} carries lse's last-bit
    # difference (|z| up to 43 here: 4e-6 relative)
    return dict(rtol=1e-5, atol=1e-6) if grad else dict(rtol=1e-6, atol=1e-6)


def _linear_tolerance(dtype, grad: bool) -> dict:
    # The logits are products: a shard's and the full weight's may round differently (the GEMM blocks
    # differ), by one ulp of a logit (|z| up to 43 here: 4e-6 in fp32; 0.25 in bf16).
    if dtype == BF16:
        return dict(rtol=2e-2, atol=2e-2)
    return dict(rtol=1e-5, atol=1e-5) if dtype == F32 else _tolerance(dtype, grad)


@pytest.fixture(scope="module", params=[2, 4], ids=["tp2", "tp4"])
def ranks(request, tmp_path_factory):
    world = request.param
    return world, run_ranks(rank_main, world, tmp_path_factory.mktemp(f"tp{world}"))


@pytest.mark.parametrize("name", list(CASES))
def test_each_rank_gets_the_single_device_results(ranks, name):
    world, results = ranks
    bounds = BOUNDS[world]
    kind, dtype, _, _ = CASES[name]
    inp = _inputs(name)
    want_out, want_grads = _run(name, inp, None)
    tol = _linear_tolerance if kind == "linear" else _tolerance
    for rank in range(world):
        out, _ = results[rank][name]
        # Every rank holds the same results, bit for bit (the same combination of the same all-reduced values).
        assert all(torch.equal(a, b) for a, b in zip(out, results[0][name][0])), (name, rank)
    for got, want in zip(results[0][name][0], want_out):
        if got.dtype == torch.bool or got.dtype == torch.int64:
            assert torch.equal(got, want), name
        else:
            torch.testing.assert_close(got, want, **tol(dtype, False), msg=lambda m: f"{name}: {m}")
    if kind == "linear":
        # The hidden-state gradient is summed over the ranks (each holds the full one); weight and bias: slices.
        for rank in range(world):
            grads = results[rank][name][1]
            torch.testing.assert_close(grads[0], want_grads[0], **tol(dtype, True), msg=lambda m: f"{name}: {m}")
            edges = slice(bounds[rank], bounds[rank + 1])
            torch.testing.assert_close(grads[1], want_grads[1][edges], **tol(dtype, True), msg=lambda m: f"{name}: {m}")
            torch.testing.assert_close(grads[2], want_grads[2][edges], **tol(dtype, True), msg=lambda m: f"{name}: {m}")
        return
    got_grad = torch.cat([results[rank][name][1][0] for rank in range(world)], -1)
    torch.testing.assert_close(got_grad, want_grads[0], **tol(dtype, True), msg=lambda m: f"{name}: {m}")


def test_float64_against_the_float64_reference(ranks):
    world, results = ranks
    inp = _inputs("token-fp64-torch")
    ref = naive_token_logprobs(inp["logits"], inp["labels"], IGNORE, compute_dtype=F64,
                               transform=mpf.ops.transform.LogitTransform(1.3, None, -0.5))
    for got, want in zip(results[0]["token-fp64-torch"][0], ref):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_stats_top1_ties_across_shards(ranks):
    world, results = ranks
    logps, entropy, log_sum_sq, mean, is_top1 = results[0]["stats-fp32-torch"][0]
    labels = _inputs("stats-fp32-torch")["labels"]
    # The max (50) sits at ids 9 and 30: only label 9 is the top-1 (the first global index).
    assert torch.equal(is_top1, labels == 9) and bool(is_top1[1, 2])


def test_label_beyond_the_vocabulary_raises_on_every_rank(ranks):
    world, results = ranks
    for rank in range(world):
        msg = results[rank]["error"]
        assert msg is not None and f"labels must lie in [0, {VOCAB})" in msg and "position (1, 2)" in msg, msg
