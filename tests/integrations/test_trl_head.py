"""The fused head against TRL's own ``add_fused_lm_head`` (real TRL) and a float64 reference, on padded,
padding-free (packed) and pre-shifted batches of two model families."""

from __future__ import annotations

import copy

import pytest
import torch
from trl.trainer.utils import add_fused_lm_head
from trl_helpers import FAMILIES, tiny_model

from mallowspo_fast.integrations.trl import install_fused_head

OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")


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


def pair_of_models(family):
    ours, theirs = tiny_model(family), tiny_model(family)
    theirs.load_state_dict(ours.state_dict())
    install_fused_head(ours, outputs=OUTPUTS)
    add_fused_lm_head(theirs, outputs=OUTPUTS)
    return ours, theirs


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", ["padded", "packed", "shift_labels"])
def test_fused_head_matches_trl_head(family, layout):
    ours, theirs = pair_of_models(family)
    vocab = ours.config.vocab_size
    inputs, labels = packed_batch(vocab) if layout == "packed" else padded_batch(vocab)
    kw = dict(labels=labels)
    if layout == "shift_labels":  # pre-shifted labels, scored without shifting (context parallelism)
        kw = dict(shift_labels=torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100))
    a = ours(**inputs, **kw, fused_lm_head=True)
    b = theirs(**inputs, **kw, fused_lm_head=True)
    mask = b.label_mask
    assert torch.equal(a.label_mask, mask) and mask.any() and not mask.all()
    for name in ("log_probs", "entropy", "mean_logits"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape, name
        torch.testing.assert_close(x.float(), y.float(), rtol=1e-5, atol=2e-5, msg=name)
        assert torch.all(x[~mask] == 0), name
    assert torch.equal(a.is_top1 & mask, b.is_top1 & mask)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_head_gradients_match_float64(family):
    model = tiny_model(family)
    ref64 = copy.deepcopy(model).double()
    install_fused_head(model)
    inputs, labels = padded_batch(model.config.vocab_size)
    g = torch.Generator().manual_seed(3)
    up_logp, up_ent = torch.randn(labels[:, 1:].shape, generator=g), torch.randn(labels[:, 1:].shape, generator=g)

    out = model(**inputs, labels=labels, fused_lm_head=True)
    ((out.log_probs * up_logp).sum() + (out.entropy * up_ent).sum()).backward()

    # float64 reference written out: log-softmax, gather, entropy -sum p log p, zero on ignored labels
    logits = ref64(**inputs).logits[:, :-1]
    y = labels[:, 1:]
    mask = y != -100
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    ent = -(logp_all.exp() * logp_all).sum(-1) * mask
    ((logp * up_logp.double()).sum() + (ent * up_ent.double()).sum()).backward()

    torch.testing.assert_close(out.log_probs.double(), logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy.double(), ent, rtol=1e-5, atol=1e-5)
    for (name, p), p64 in zip(model.named_parameters(), ref64.parameters(), strict=True):
        assert p.grad is not None, name
        scale = p64.grad.abs().max().clamp(min=1e-6)
        assert (p.grad.double() - p64.grad).abs().max() / scale < 1e-4, name


def test_plain_forward_unchanged_and_bad_heads_refused():
    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    before = model(input_ids=ids).logits
    install_fused_head(model)
    torch.testing.assert_close(model(input_ids=ids).logits, before)  # generation path untouched
    capped = tiny_model("llama")
    capped.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        install_fused_head(capped)
    with pytest.raises(ValueError, match="outputs must be among"):
        install_fused_head(tiny_model("llama"), outputs=("log_sum_sq_probs",))
