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
    head_transform,
    install_lm_head_logprobs,
    model_sequence_logprobs,
)
from mallowspo_fast.ops.transform import LogitTransform


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


def test_unknown_logits_mode_is_refused():
    with pytest.raises(ValueError, match="logits_mode must be one of"):
        CausalLMLogprobs(_tiny_llama(tied=False), logits_mode="sparse")


def _transforming_model(kind: str) -> torch.nn.Module:
    """A tiny model whose own forward transforms its logits after the output layer's matmul."""
    common = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, head_dim=8)
    torch.manual_seed(0)
    if kind == "gemma2-softcap":
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**common, final_logit_softcapping=3.0))
    elif kind == "cohere-logit_scale":
        model = transformers.CohereForCausalLM(transformers.CohereConfig(**common, logit_scale=0.25))
    elif kind == "granite-logits_scaling":
        model = transformers.GraniteForCausalLM(transformers.GraniteConfig(**common, logits_scaling=4.0))
    else:
        raise ValueError(kind)
    model = model.float()
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0, 2.0)  # logits large enough for the soft cap to bite
    return model


@pytest.mark.parametrize("kind", ["gemma2-softcap", "cohere-logit_scale", "granite-logits_scaling"])
def test_chunked_mode_applies_what_the_model_does_to_its_logits(kind):
    """The chunked path equals the model's own forward (logits mode) on models that soft-cap or scale."""
    model = _transforming_model(kind)
    input_ids, attention_mask, labels = _batch()
    ref = model_sequence_logprobs(model, input_ids, attention_mask, labels, logits_mode="logits", backend="torch",
                                  reduction="token")
    got = model_sequence_logprobs(model, input_ids, attention_mask, labels, logits_mode="chunked", backend="torch",
                                  reduction="token")
    torch.testing.assert_close(got.logps, ref.logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.entropy, ref.entropy, atol=1e-5, rtol=1e-5)
    head = install_lm_head_logprobs(model)
    assert head.transform == head_transform(model) != LogitTransform()
    hidden = torch.randn(2, 3, 32)
    torch.testing.assert_close(head(hidden), model.lm_head.transform.apply(hidden @ head.weight.t()))


@pytest.mark.parametrize("attrs,expected", [
    (dict(), LogitTransform()),
    (dict(final_logit_softcapping=30.0), LogitTransform(softcap=30.0)),
    (dict(logit_scale=0.0625), LogitTransform(logit_scale=0.0625)),
    (dict(logit_scale=None), LogitTransform()),  # MPT: None means unscaled
    (dict(output_multiplier=0.2, final_logit_softcapping=30.0), LogitTransform(softcap=30.0, logit_scale=0.2)),
    (dict(lm_head_multiplier=0.5), LogitTransform(logit_scale=0.5)),
    (dict(logits_scaling=8.0), LogitTransform(logit_scale=0.125)),  # Granite, MiniCPM3: a divisor
    (dict(logits_scaling=8.0, model_type="hyperclovax"), LogitTransform(logit_scale=8.0)),
], ids=["plain", "softcap", "logit_scale", "logit_scale-none", "output_multiplier", "lm_head_multiplier",
        "logits_scaling", "logits_scaling-hyperclovax"])
def test_head_transform_reads_each_attribute(attrs, expected):
    model = torch.nn.Module()
    model.config = transformers.PretrainedConfig(**{k: v for k, v in attrs.items() if k != "model_type"})
    if "model_type" in attrs:
        model.config.model_type = attrs["model_type"]
    assert head_transform(model) == expected


@pytest.mark.parametrize("attrs,match", [
    (dict(final_logit_softcapping=0.0), "final_logit_softcapping=0.0"),
    (dict(logit_scale="auto"), "logit_scale='auto'"),
    (dict(logit_scale=0.0), "logit_scale=0.0"),
    (dict(logit_scale=0.5, lm_head_multiplier=2.0), "several logit scales that disagree"),
], ids=["softcap-zero", "scale-not-a-number", "scale-zero", "two-scales"])
def test_head_transform_refuses_what_it_cannot_apply(attrs, match):
    model = torch.nn.Module()
    model.config = transformers.PretrainedConfig(**attrs)
    with pytest.raises(ValueError, match=match):
        head_transform(model)
