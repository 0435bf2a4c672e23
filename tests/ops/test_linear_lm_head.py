"""Model-level memory mode on a tiny Llama: the chunked path (backbone + output layer applied chunk by
chunk) gives the same log-probs and the same gradient for every parameter as the normal logits path,
with tied and untied embeddings."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from mallowspo_fast.ops.lm_head import (
    CausalLMLogprobs,
    LMHeadLogprobs,
    install_lm_head_logprobs,
    model_sequence_logprobs,
)


def _tiny_llama(tied: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied,
    )
    model = transformers.LlamaForCausalLM(config).float()
    with torch.no_grad():  # a non-trivial output layer (the default init is tiny)
        model.get_output_embeddings().weight.normal_(0, 0.5)
    return model


def _batch():
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 97, (3, 11), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, -3:] = 0  # right padding
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :4] = -100  # prompt
    return input_ids, attention_mask, labels


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_chunked_equals_logits_path(tied):
    model = _tiny_llama(tied)
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    head = install_lm_head_logprobs(model, chunk_size=5, backend="torch")
    # Same Parameter objects, same state-dict keys, tying kept.
    assert isinstance(model.get_output_embeddings(), LMHeadLogprobs) and list(model.state_dict()) == keys
    assert (head.weight is model.model.embed_tokens.weight) == tied
    input_ids, attention_mask, labels = _batch()
    ours = model_sequence_logprobs(model, input_ids, attention_mask, labels, logits_mode="chunked")
    ref = model_sequence_logprobs(reference, input_ids, attention_mask, labels, logits_mode="logits",
                                  backend="reference")
    torch.testing.assert_close(ours.logps, ref.logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.entropy, ref.entropy, atol=1e-5, rtol=1e-5)
    assert torch.equal(ours.num_tokens, ref.num_tokens)
    (ours.logps.sum() + 0.3 * ours.entropy.sum()).backward()
    (ref.logps.sum() + 0.3 * ref.entropy.sum()).backward()
    got, want = _grads(model), _grads(reference)
    assert got.keys() == want.keys() and len(got) == len(list(model.parameters()))
    for name in want:
        scale = want[name].abs().max().clamp(min=1e-6)
        assert (got[name] - want[name]).abs().max() <= 1e-5 * scale, name


def test_head_without_labels_returns_logits_and_model_forward_still_works():
    model = _tiny_llama(tied=False)
    input_ids, attention_mask, _ = _batch()
    before = model(input_ids=input_ids, attention_mask=attention_mask).logits
    install_lm_head_logprobs(model)
    after = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert torch.equal(before, after)
    assert install_lm_head_logprobs(model) is model.get_output_embeddings()  # idempotent


@pytest.mark.parametrize("logits_mode", ["chunked", "logits"])
def test_engine_wrapper_and_token_reduction(logits_mode):
    model = _tiny_llama(tied=True)
    wrapper = CausalLMLogprobs(copy.deepcopy(model), logits_mode=logits_mode, chunk_size=4, backend="torch")
    input_ids, attention_mask, labels = _batch()
    tok = wrapper(input_ids, attention_mask, labels, reduction="token")
    ref = model_sequence_logprobs(model, input_ids, attention_mask, labels, logits_mode="logits",
                                  backend="reference", reduction="token")
    assert tok.logps.shape == (3, 10)
    torch.testing.assert_close(tok.logps, ref.logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tok.entropy, ref.entropy, atol=1e-5, rtol=1e-5)


def test_rejects_heads_that_rescale_logits():
    model = _tiny_llama(tied=False)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        install_lm_head_logprobs(model)
    with pytest.raises(ValueError, match="logits_mode must be one of"):
        CausalLMLogprobs(model, logits_mode="sparse")
