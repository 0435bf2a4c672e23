"""Our fused head against TRL 1.16's own ``add_fused_lm_head`` (the real package), same model and batch: every
output field and every parameter gradient, on padded, packed and pre-shifted batches, for the configurations
TRL's head serves (soft-capped and scaled logits, temperature, fp32 head, bias, MoE router loss, mixed dtypes,
autocast, a frozen head under LoRA)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from trl.trainer.utils import add_fused_lm_head
from trl_helpers import FAMILIES, tiny_model

from mallowspo_fast.integrations.trl_head import HeadSettings, install_fused_head, trl_head_settings
from mallowspo_fast.ops import linear as linear_op

ALL = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
COMMON = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, head_dim=8)


def padded_batch(vocab: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (4, 12), generator=g)
    attn = torch.ones_like(ids)
    attn[1, 9:] = 0
    attn[3, 6:] = 0
    labels = ids.masked_fill(attn == 0, -100)
    labels[:, :4] = -100  # prompt
    return dict(input_ids=ids, attention_mask=attn), labels


def packed_batch(vocab: int):
    """Padding-free: three sequences in one row, positions restarting, -100 on each sequence's first token."""
    g = torch.Generator().manual_seed(2)
    lengths = (7, 5, 8)
    ids = torch.randint(0, vocab, (1, sum(lengths)), generator=g)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    labels = ids.clone()
    labels[position_ids == 0] = -100
    labels[0, :2] = -100
    return dict(input_ids=ids, position_ids=position_ids), labels


def special_model(kind: str) -> torch.nn.Module:
    """Tiny models whose output layer transforms its logits, has a bias, or routes experts."""
    torch.manual_seed(0)
    if kind == "gemma2-softcap":
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**COMMON, final_logit_softcapping=2.0))
    elif kind == "cohere2-logit_scale":
        model = transformers.Cohere2ForCausalLM(transformers.Cohere2Config(**COMMON, logit_scale=0.25))
    elif kind == "granite-logits_scaling":
        model = transformers.GraniteForCausalLM(transformers.GraniteConfig(**COMMON, logits_scaling=4.0))
    elif kind == "phi-bias":
        model = transformers.PhiForCausalLM(transformers.PhiConfig(**COMMON))
    elif kind == "qwen3moe-router":
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            **COMMON, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, output_router_logits=True,
            router_aux_loss_coef=0.01))
    else:
        raise ValueError(kind)
    model = model.float()
    with torch.no_grad():  # logits large enough for the soft cap to bite and the entropies to differ
        model.get_output_embeddings().weight.normal_(0, 1.0)
    return model


def pair(model, settings: HeadSettings, **trl_kwargs):
    """(ours, theirs): the same weights, our head on one, TRL's on the other."""
    theirs = copy.deepcopy(model)
    add_fused_lm_head(theirs, outputs=settings.outputs, **trl_kwargs)
    install_fused_head(model, settings)
    return model, theirs


def compare(ours, theirs, inputs, labels=None, *, fields=ALL, grads=True, rtol=1e-5, atol=2e-5, **kw):
    """Every requested field and every parameter gradient of the two heads on the same batch."""
    kw = dict(labels=labels, **kw) if labels is not None else kw
    outs = []
    for model in (ours, theirs):
        model.zero_grad(set_to_none=True)
        out = model(**inputs, **kw, fused_lm_head=True)
        g = torch.Generator().manual_seed(5)
        up = torch.randn(out.log_probs.shape, generator=g)
        loss = (out.log_probs * up).sum() + out.loss
        if out.entropy is not None:
            loss = loss + (out.entropy * up.flip(-1)).sum()
        if grads:
            loss.backward()
        outs.append(out)
    a, b = outs
    mask = b.label_mask
    assert torch.equal(a.label_mask, mask) and mask.any() and not mask.all()
    for name in fields:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if name == "is_top1" and x is not None:
            assert torch.equal(x & mask, y & mask)
        elif x is not None:
            assert x.shape == y.shape, name
            torch.testing.assert_close(x.float(), y.float(), rtol=rtol, atol=atol, msg=name)
            assert torch.all(x[~mask] == 0), name
    torch.testing.assert_close(a.loss, b.loss, rtol=rtol, atol=atol)
    assert (a.aux_loss is None) == (b.aux_loss is None)
    if a.aux_loss is not None:
        torch.testing.assert_close(a.aux_loss, b.aux_loss, rtol=rtol, atol=atol)
    if grads:
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
            if p.requires_grad:
                assert p.grad is not None and q.grad is not None, name
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6 * max(1.0, q.grad.abs().max()),
                                           msg=name)
    return a, b


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", ["padded", "packed", "shift_labels"])
def test_every_output_and_gradient_matches_trl_head(family, layout):
    ours, theirs = pair(tiny_model(family), HeadSettings(outputs=ALL))
    vocab = ours.config.vocab_size
    inputs, labels = packed_batch(vocab) if layout == "packed" else padded_batch(vocab)
    if layout == "shift_labels":  # pre-shifted labels, scored without shifting (context parallelism)
        compare(ours, theirs, inputs, shift_labels=torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100))
    else:
        compare(ours, theirs, inputs, labels)


@pytest.mark.parametrize("kind", ["gemma2-softcap", "cohere2-logit_scale", "granite-logits_scaling", "phi-bias",
                                  "qwen3moe-router"])
def test_models_that_transform_their_logits_or_route_experts(kind):
    ours, theirs = pair(special_model(kind), HeadSettings(outputs=ALL))
    inputs, labels = padded_batch(300)
    a, _ = compare(ours, theirs, inputs, labels)
    if kind == "qwen3moe-router":
        assert a.aux_loss is not None and a.aux_loss > 0


def test_temperature_and_fp32_head_as_grpo_sets_them():
    settings = HeadSettings(temperature=0.7, cast_lm_head_to_fp32=True, outputs=("log_probs", "entropy"))
    ours, theirs = pair(tiny_model("llama"), settings, temperature=0.7, cast_lm_head_to_fp32=True)
    assert trl_head_settings(theirs) == HeadSettings(temperature=0.7, cast_lm_head_to_fp32=True,
                                                     outputs=("log_probs", "entropy"))
    inputs, labels = padded_batch(ours.config.vocab_size)
    a, _ = compare(ours, theirs, inputs, labels)
    assert a.mean_logits is None and a.is_top1 is None and a.log_sum_sq_probs is None  # not asked for


def test_bf16_hidden_with_fp32_head_and_autocast():
    """Mixed dtypes (bf16 backbone, fp32 output layer) and CPU autocast: both heads compute the products in the
    compute dtype TRL chooses; values agree to bf16 rounding, gradients keep their parameters' dtypes."""
    model = tiny_model("llama")
    model.model.to(torch.bfloat16)
    ours, theirs = pair(model, HeadSettings(outputs=ALL))
    inputs, labels = padded_batch(ours.config.vocab_size)
    compare(ours, theirs, inputs, labels, fields=("log_probs", "entropy"), rtol=2e-2, atol=2e-2, grads=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, _ = compare(ours, theirs, inputs, labels, fields=("log_probs", "entropy"), rtol=2e-2, atol=3e-2,
                       grads=False)
    assert a.log_probs.dtype == torch.float32


def test_frozen_head_gets_no_weight_gradient_product(monkeypatch):
    """LoRA elsewhere, the output layer frozen: the op skips the [V, H] weight-gradient product entirely."""
    peft = pytest.importorskip("peft", reason="PEFT ships with the [trl] extra")
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    theirs = copy.deepcopy(model)
    add_fused_lm_head(theirs.get_base_model(), outputs=ALL)
    install_fused_head(model.get_base_model(), HeadSettings(outputs=ALL))
    calls = []
    real = linear_op._addmm_fp32
    monkeypatch.setattr(linear_op, "_addmm_fp32", lambda *a: calls.append(a[0].shape) or real(*a))
    inputs, labels = padded_batch(300)
    compare(model, theirs, inputs, labels)
    assert calls == [] and model.get_base_model().lm_head.weight.grad is None


def test_lora_on_the_output_layer_is_refused():
    peft = pytest.importorskip("peft", reason="PEFT ships with the [trl] extra")
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    install_fused_head(model.get_base_model(), HeadSettings())
    inputs, labels = padded_batch(300)
    with pytest.raises(ValueError, match="the output layer is adapted by PEFT"):
        model(**inputs, labels=labels, fused_lm_head=True)


def test_plain_forward_unchanged_and_bad_settings_refused():
    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    before = model(input_ids=ids).logits
    install_fused_head(model)
    torch.testing.assert_close(model(input_ids=ids).logits, before)  # generation path untouched
    with pytest.raises(ValueError, match="outputs must be among"):
        install_fused_head(tiny_model("llama"), HeadSettings(outputs=("logits",)))
    capped = tiny_model("llama")
    capped.config.final_logit_softcapping = -1.0
    with pytest.raises(ValueError, match="final_logit_softcapping=-1.0"):
        install_fused_head(capped)


def test_padding_free_packing_equals_the_padded_rows():
    """Our padding-free mode packs the padded rows before the backbone: same outputs and gradients."""
    model = tiny_model("llama")
    packed = copy.deepcopy(model)
    install_fused_head(model, HeadSettings(outputs=ALL))
    install_fused_head(packed, HeadSettings(outputs=ALL, padding_free=True))
    calls = []
    packed.model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape), with_kwargs=True)
    inputs, labels = padded_batch(300)
    compare(packed, model, inputs, labels)
    assert calls == [(1, int(inputs["attention_mask"].sum()))]  # one row of real tokens
