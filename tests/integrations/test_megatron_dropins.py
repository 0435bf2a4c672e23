"""Drop-ins for the vocab-parallel functions of Megatron-core 0.16.1 and verl 0.9.1's Megatron backend, on two
gloo ranks on CPU (spawned here): against the peers' definitions written out below (same math, same
collectives, an explicit group), and against the real ``megatron.core.tensor_parallel.vocab_parallel_cross_entropy``
with Megatron's ``parallel_state`` where megatron-core is installed (it installs and runs on CPU). verl itself is
not installed here (its requirements conflict with this environment's transformers)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.distributed as dist
from vp_ranks import run_ranks

from mallowspo_fast.integrations import megatron as mg

WORLD, WIDTH = 2, 19  # Megatron's even split: rank r holds ids [19 r, 19 (r + 1))
DTYPES = (torch.float32, torch.bfloat16)
MEGATRON_INSTALLED = importlib.util.find_spec("megatron.core") is not None


# ------------------------------------------------------------------------------ the peers, written out


class PeerCrossEntropy(torch.autograd.Function):
    """Megatron-core 0.16.1 ``_VocabParallelCrossEntropy`` without label smoothing (its forward and backward)."""

    @staticmethod
    def forward(ctx, logits, target, group):
        logits = logits.float().clone()  # (Megatron works in place on the fp32 logits; a copy here)
        logits_max = logits.max(dim=-1)[0]
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        width = logits.shape[-1]
        start = dist.get_rank(group) * width
        target_mask = (target < start) | (target >= start + width)
        masked_target = (target - start).masked_fill(target_mask, 0)
        logits -= logits_max.unsqueeze(-1)
        predicted = logits.gather(-1, masked_target.unsqueeze(-1)).squeeze(-1).masked_fill(target_mask, 0.0)
        dist.all_reduce(predicted, group=group)
        exp_logits = logits.exp()
        sum_exp = exp_logits.sum(-1)
        dist.all_reduce(sum_exp, group=group)
        ctx.save_for_backward(exp_logits / sum_exp.unsqueeze(-1), target_mask, masked_target)
        return sum_exp.log() - predicted

    @staticmethod
    def backward(ctx, grad_output):
        softmax, target_mask, masked_target = ctx.saved_tensors
        grad = softmax.clone()
        onehot = torch.zeros_like(grad).scatter_(-1, masked_target.unsqueeze(-1), 1.0)
        grad -= onehot * (1.0 - target_mask.float()).unsqueeze(-1)
        return grad * grad_output.unsqueeze(-1), None, None


class PeerEntropy(torch.autograd.Function):
    """verl 0.9.1 ``_VocabParallelEntropy`` (computed in the logits' dtype, three all-reduces)."""

    @staticmethod
    def forward(ctx, logits, group):
        logits_max = logits.max(dim=-1, keepdim=True).values
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        exp_logits = (logits - logits_max).exp()
        sum_exp = exp_logits.sum(dim=-1, keepdim=True)
        dist.all_reduce(sum_exp, group=group)
        softmax = exp_logits / sum_exp
        sum_softmax_times_logits = (softmax * logits).sum(dim=-1, keepdim=True)
        dist.all_reduce(sum_softmax_times_logits, group=group)
        ctx.save_for_backward(logits, softmax, sum_softmax_times_logits)
        return (logits_max + sum_exp.log() - sum_softmax_times_logits).squeeze(-1)

    @staticmethod
    def backward(ctx, grad_output):
        logits, softmax, sum_softmax_times_logits = ctx.saved_tensors
        return -softmax * (logits - sum_softmax_times_logits) * grad_output.unsqueeze(-1), None


def peer_sum_pi_squared(logits, group):
    """verl 0.9.1 ``vocab_parallel_sum_pi_squared``."""
    logits_max = logits.max(dim=-1, keepdim=True).values
    dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
    exp_shifted = (logits - logits_max).exp()
    sum_exp = exp_shifted.sum(dim=-1, keepdim=True)
    dist.all_reduce(sum_exp, group=group)
    sum_exp_squared = exp_shifted.pow(2).sum(dim=-1, keepdim=True)
    dist.all_reduce(sum_exp_squared, group=group)
    return (sum_exp_squared / sum_exp.pow(2)).squeeze(-1)


WITH_LABELS = ("vocab_parallel_cross_entropy", "vocab_parallel_log_probs_from_logits")
PEERS = {
    "vocab_parallel_cross_entropy": lambda x, y, g: PeerCrossEntropy.apply(x, y, g),
    "vocab_parallel_log_probs_from_logits": lambda x, y, g: -PeerCrossEntropy.apply(x, y, g),
    "vocab_parallel_entropy": lambda x, y, g: PeerEntropy.apply(x, g),
    "vocab_parallel_entropy_with_chunking": lambda x, y, g: PeerEntropy.apply(x, g).to(torch.get_default_dtype()),
    "vocab_parallel_sum_pi_squared": lambda x, y, g: peer_sum_pi_squared(x, g),
}


# ------------------------------------------------------------------------------------------- ranks


def _inputs(dtype):
    gen = torch.Generator().manual_seed(7)
    logits = (torch.randn(3, 5, WORLD * WIDTH, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, WORLD * WIDTH, (3, 5), generator=gen)
    return logits, labels, torch.randn(3, 5, generator=gen)


def _value_and_grad(fn, shard, labels, up):
    x = shard.clone().requires_grad_(True)
    out = fn(x, labels)
    if out.requires_grad:
        (out.float() * up).sum().backward()
    return out.detach(), None if x.grad is None else x.grad


def rank_main(rank: int, world: int) -> dict:
    res: dict = {"ours": {}, "peer": {}, "peer32": {}, "errors": {}}
    group = dist.group.WORLD
    for dtype in DTYPES:
        logits, labels, up = _inputs(dtype)
        shard = logits[..., rank * WIDTH:(rank + 1) * WIDTH]
        for name, peer in PEERS.items():
            ours = getattr(mg, name)
            if name in WITH_LABELS:
                call = lambda x, y, o=ours: o(x, y, group=group)  # noqa: E731
            else:
                call = lambda x, y, o=ours: o(x, group=group)  # noqa: E731
            res["ours"][(name, dtype)] = _value_and_grad(call, shard, labels, up)
            res["peer"][(name, dtype)] = _value_and_grad(lambda x, y, p=peer: p(x, y, group), shard, labels, up)
            # The peer's definition evaluated in fp32 on the same inputs (its gradient flows back to their dtype).
            res["peer32"][(name, dtype)] = _value_and_grad(lambda x, y, p=peer: p(x.float(), y, group), shard,
                                                           labels, up)
    logits, labels, up = _inputs(torch.float32)
    shard = logits[..., rank * WIDTH:(rank + 1) * WIDTH].contiguous()
    kept = shard.clone()
    mg.vocab_parallel_cross_entropy(shard, labels, group=group)
    res["not_written"] = torch.equal(shard, kept)
    for key, call in {"no_group": lambda: mg.vocab_parallel_entropy(shard),
                      "smoothing": lambda: mg.vocab_parallel_cross_entropy(shard, labels, 0.1, group=group)}.items():
        try:
            call()
        except (RuntimeError, ValueError) as e:
            res["errors"][key] = f"{type(e).__name__}: {e}"
    res["megatron"] = _against_megatron(rank, shard, labels, up) if MEGATRON_INSTALLED else None
    return res


def _against_megatron(rank, shard, labels, up) -> dict:
    """Megatron's own function and ours with the group from Megatron's parallel_state (no group= given)."""
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=WORLD)
    try:
        real = _value_and_grad(lambda x, y: tensor_parallel.vocab_parallel_cross_entropy(x, y), shard, labels, up)
        ours = _value_and_grad(lambda x, y: mg.vocab_parallel_cross_entropy(x, y), shard, labels, up)
        logps = _value_and_grad(lambda x, y: mg.vocab_parallel_log_probs_from_logits(x, y), shard, labels, up)
        entropy = _value_and_grad(lambda x, y: mg.vocab_parallel_entropy(x), shard, labels, up)
        peer_entropy = _value_and_grad(
            lambda x, y: PeerEntropy.apply(x, parallel_state.get_tensor_model_parallel_group()), shard, labels, up)
    finally:
        parallel_state.destroy_model_parallel()
    return {"real": real, "ours": ours, "logps": logps, "entropy": entropy, "peer_entropy": peer_entropy}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_ranks(rank_main, WORLD, tmp_path_factory.mktemp("megatron"))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(PEERS))
def test_dropins_match_the_peer_definitions(results, name, dtype):
    """Dtypes and shapes as the peer's; values and gradients as the peer's definition evaluated in fp32 on the
    same inputs. (verl computes the entropy and Σp² in the logits' dtype: in bf16 its max + log Σe − Σ p·z
    cancels, e.g. 0.0 for an entropy of 0.10, which the fused op, in fp32 and rounded once, does not.)"""
    bf16 = dtype == torch.bfloat16
    for rank in range(WORLD):
        (ours, our_grad), (peer, peer_grad) = results[rank]["ours"][(name, dtype)], results[rank]["peer"][(name, dtype)]
        ref, ref_grad = results[rank]["peer32"][(name, dtype)]
        assert ours.dtype == peer.dtype and ours.shape == peer.shape, (name, ours.dtype, peer.dtype)
        tol = dict(rtol=1.6e-2, atol=1e-2) if bf16 and ours.dtype == dtype else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.float(), ref.float(), **tol)
        if name == "vocab_parallel_sum_pi_squared":
            assert our_grad is None  # not differentiable (documented)
            continue
        assert our_grad.dtype == peer_grad.dtype == ref_grad.dtype == dtype
        tol = dict(rtol=1.6e-2, atol=1e-4) if bf16 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(our_grad.float(), ref_grad.float(), **tol)


def test_the_logits_are_never_written_and_errors_are_clear(results):
    for rank in range(WORLD):
        assert results[rank]["not_written"]
        errors = results[rank]["errors"]
        assert errors["no_group"].startswith("RuntimeError: vocab_parallel_entropy: no tensor-parallel group")
        assert "label_smoothing must be 0.0" in errors["smoothing"]


def test_against_megatron_core(results):
    if results[0]["megatron"] is None:
        pytest.skip("megatron-core is not installed (pip install megatron-core==0.16.1 to run this check)")
    for rank in range(WORLD):
        got = results[rank]["megatron"]
        torch.testing.assert_close(got["ours"][0], got["real"][0], rtol=1e-6, atol=1e-6)
        assert got["ours"][0].dtype == got["real"][0].dtype == torch.float32
        torch.testing.assert_close(got["ours"][1], got["real"][1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["logps"][0], -got["real"][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got["entropy"][0], got["peer_entropy"][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["entropy"][1], got["peer_entropy"][1], rtol=1e-5, atol=1e-5)
