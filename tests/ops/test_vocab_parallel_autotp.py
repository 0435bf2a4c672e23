"""The vocab-parallel op under DeepSpeed's tensor-parallel training (AutoTP) on two CPU gloo ranks (spawned here).

With ``tensor_parallel: {autotp_size: 2, vocab_parallel_lm_head: true}`` DeepSpeed shards the output layer by
vocabulary rows and the model returns each rank's logits ``[B, T, V_r]``; its ``lm_head`` knows its
``vocab_start_index`` and process group. Two training steps there, with the loss from
``vocab_parallel_sequence_logprobs`` (logits form) or ``vocab_parallel_linear_sequence_logprobs`` (hidden
states and the rank's ``lm_head.weight``), equal two steps of the same model in one process with
``sequence_logprobs`` on the full logits (the losses of both steps and the updated output-layer rows), as
do two steps with DeepSpeed's default head, which gathers the logits over the ranks."""

from __future__ import annotations

import os

import pytest
import torch
from vp_ranks import run_ranks

import mallowspo_fast as mpf

WORLD, VOCAB, LR = 2, 250, 0.05
IGNORE = -100


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def _batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 16), generator=gen)
    labels = ids[:, 1:].clone()
    labels[0, :5] = IGNORE  # a prompt
    return ids, labels


def rank_main(rank: int, world: int) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    ids, labels = _batch()
    results = {}
    for form in ("gathered", "logits", "linear"):
        # (no gradient clipping: DeepSpeed's default clips at 1.0, the one-process loop below does not)
        config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 0}, "gradient_clipping": 0.0,
                  "tensor_parallel": {"autotp_size": world, "vocab_parallel_lm_head": form != "gathered"},
                  "optimizer": {"type": "SGD", "params": {"lr": LR}}}
        model = _model()
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        lm = engine.module.lm_head
        losses = []
        for _ in range(2):
            if form == "gathered":
                seq = mpf.sequence_logprobs(engine(input_ids=ids).logits[:, :-1], labels)
            elif form == "logits":
                logits = engine(input_ids=ids).logits  # this rank's [B, T, V_r]
                assert logits.shape[-1] == lm.weight.shape[0] < VOCAB
                seq = mpf.vocab_parallel_sequence_logprobs(logits[:, :-1], labels, vocab_start=lm.vocab_start_index,
                                                           group=lm.mp_group)
            else:
                hidden = engine.module.model(input_ids=ids).last_hidden_state
                seq = mpf.vocab_parallel_linear_sequence_logprobs(hidden[:, :-1], lm.weight, labels,
                                                                  vocab_start=lm.vocab_start_index, group=lm.mp_group)
            loss = -seq.logps.mean()
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        results[form] = dict(losses=losses, start=getattr(lm, "vocab_start_index", None),
                             head=lm.weight.detach().clone())
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(rank_main, WORLD, tmp_path_factory.mktemp("autotp"))


def test_two_autotp_steps_equal_one_process(ranks):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    ids, labels = _batch()
    losses = []
    for _ in range(2):
        seq = mpf.sequence_logprobs(model(input_ids=ids).logits[:, :-1], labels)
        loss = -seq.logps.mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    head = model.lm_head.weight.detach()
    for r in range(WORLD):  # DeepSpeed's own head (logits gathered over the ranks) with the single-device op
        assert ranks[r]["gathered"]["losses"] == pytest.approx(losses, rel=1e-5)
    for form in ("logits", "linear"):
        starts = [ranks[r][form]["start"] for r in range(WORLD)]
        assert starts[0] == 0 and starts[1] == ranks[0][form]["head"].shape[0]  # the shards tile the vocabulary
        for r in range(WORLD):
            got = ranks[r][form]
            assert got["losses"] == pytest.approx(losses, rel=1e-5), (form, r)
            rows = slice(got["start"], got["start"] + got["head"].shape[0])
            torch.testing.assert_close(got["head"], head[rows], rtol=1e-5, atol=1e-6)
