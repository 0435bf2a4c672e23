"""``MallowsDPOTrainer`` / ``patch_dpo_trainer`` with the real ``trl.DPOTrainer`` on tiny models (no hub).

- TRL's loss types (``sigmoid``, a weighted ``sigmoid`` + ``ipo`` list, WPO's ``use_weighting``): three optimizer
  steps log the same loss, ``rewards/*`` and ``logps/*`` as unpatched TRL (fp32, rel 1e-5), and the fused op
  really computed them;
- ``mallows_theta`` / ``mallows_phi`` / ``mallows_ipo``: the trainer's loss on a batch equals our loss
  functions applied to the same batch, and its parameter gradients match a float64 reference written out here;
- ``phi_star="auto"``, metric keys, mixed loss lists, the refusals that remain;
- ``precompute_ref_log_probs=True`` with MallowsPO (reference entropies stored beside TRL's columns) and
  padding-free batches: each equal to the run without it.
"""

from __future__ import annotations

import copy
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from trl import DPOTrainer
from trl_helpers import dpo_args, make_trainer

import mallowspo_fast as mpf
from mallowspo_fast.integrations import trl as mtrl
from mallowspo_fast.integrations import trl_head
from mallowspo_fast.integrations.trl import MallowsDPOConfig, MallowsDPOTrainer, patch_dpo_trainer

COMPARED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected")
TRL_KEYS = ("loss", "entropy", "num_tokens", "logits/chosen", "logits/rejected", "mean_token_accuracy",
            "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected")


def step_logs(trainer):
    return [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]


def counted_op():
    """A spy on the fused op inside the head (the test fails if TRL's own head did the work)."""
    return mock.patch.object(trl_head, "linear_token_logprobs", wraps=trl_head.linear_token_logprobs)


@pytest.mark.parametrize("family,extra", [("llama", {}), ("gpt2", {}), ("llama", {"use_weighting": True}),
                                          ("gpt2", {"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0, 0.5]})],
                         ids=["llama", "gpt2", "llama-use_weighting", "gpt2-sigmoid+ipo"])
def test_trl_losses_three_steps_match_unpatched_trl(family, extra, tmp_path):
    plain = make_trainer(DPOTrainer, family, dpo_args(tmp_path / "plain", **extra))
    plain.train()
    ours = make_trainer(MallowsDPOTrainer, family, dpo_args(tmp_path / "ours", **extra))
    with counted_op() as spy:
        ours.train()
    assert spy.call_count == 2 * 3  # policy + reference forward per step
    a, b = step_logs(plain), step_logs(ours)
    assert len(a) == len(b) == 3
    assert a[-1]["rewards/margins"] != 0.0  # training moved the policy away from the reference
    for step, (x, y) in enumerate(zip(a, b, strict=True), 1):
        assert set(TRL_KEYS) <= set(y)
        for key in COMPARED:
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (step, key)


def test_bf16_autocast_run_goes_through_our_head_and_matches_trl(tmp_path):
    """With bf16=True accelerate wraps the reference's forward in autocast at TRL's construction: our head goes
    under the same wrapper (the reference forward still runs in autocast) and the run agrees with TRL's."""
    plain = make_trainer(DPOTrainer, "llama", dpo_args(tmp_path / "plain", bf16=True, max_steps=2))
    plain.train()
    ours = make_trainer(MallowsDPOTrainer, "llama", dpo_args(tmp_path / "ours", bf16=True, max_steps=2))
    assert "_original_forward" in ours.ref_model.__dict__  # accelerate's wrapper, kept around our head
    with counted_op() as spy:
        ours.train()
    assert spy.call_count == 2 * 2
    for x, y in zip(step_logs(plain), step_logs(ours), strict=True):
        for key in ("loss", "logps/chosen", "logps/rejected"):
            assert y[key] == pytest.approx(x[key], rel=2e-2, abs=1e-2), key


def test_patch_instance_of_user_subclass_matches(tmp_path):
    calls = []

    class UserTrainer(DPOTrainer):  # a subclass with its own _compute_loss keeps working after the patch
        def _compute_loss(self, model, inputs, return_outputs):
            calls.append(1)
            return super()._compute_loss(model, inputs, return_outputs)

    plain = make_trainer(DPOTrainer, "llama", dpo_args(tmp_path / "plain", max_steps=2))
    plain.train()
    user = patch_dpo_trainer(make_trainer(UserTrainer, "llama", dpo_args(tmp_path / "user", max_steps=2)))
    assert patch_dpo_trainer(user) is user  # idempotent
    with counted_op() as spy:
        user.train()
    assert spy.call_count == 4 and len(calls) == 2
    for x, y in zip(step_logs(plain), step_logs(user), strict=True):
        for key in COMPARED:
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), key


def first_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def reference_loss64(trainer, batch, loss_type, phi_star):
    """The MallowsPO loss of ``batch`` in float64, written out from the logits of float64 model copies."""
    policy = copy.deepcopy(trainer.model).double()
    ref = copy.deepcopy(trainer.ref_model).double()
    for m in (policy, ref):  # the float64 copies use the plain (unfused) forward
        m.forward = type(m).forward.__get__(m)
    ids, attn = batch["input_ids"], batch["attention_mask"]
    mask = batch["completion_mask"][:, 1:].double()
    y = ids[:, 1:].unsqueeze(-1)

    def seq_logps(model):
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits[:, :-1], -1)
        return logp, (logp.gather(-1, y).squeeze(-1) * mask).sum(1)

    pol_all, pol = seq_logps(policy)
    with torch.no_grad():
        ref_all, refl = seq_logps(ref)
        ent = (-(ref_all.exp() * ref_all).sum(-1) * mask).sum(1) / mask.sum(1)
    vocab = ref_all.shape[-1]
    e_w, e_l = (ent / math.log(vocab)).chunk(2)
    c = -phi_star * torch.log(torch.clamp(0.5 * (e_w + e_l), 1e-6, 1.0))
    pw, pl = pol.chunk(2)
    rw, rl = refl.chunk(2)
    margin = trainer.beta * ((pw - rw) - (pl - rl))
    if loss_type == "mallows_theta":
        losses = F.softplus(-c * margin)
    elif loss_type == "mallows_ipo":  # (c L - 1 / (2 beta))^2
        losses = (c * margin / trainer.beta - 1 / (2 * trainer.beta)) ** 2
    else:  # mallows_phi: -log g_phi(beta * margin), phi = exp(-c); the link itself is tested against mpmath
        losses = mpf.mallows_phi_link_nll(margin, torch.exp(-c))
    return losses.mean(), policy


@pytest.mark.parametrize("family,loss_type", [("llama", "mallows_theta"), ("gpt2", "mallows_phi"),
                                              ("llama", "mallows_ipo")])
def test_mallows_loss_and_gradients(family, loss_type, tmp_path):
    args = dpo_args(tmp_path, MallowsDPOConfig, loss_type=[loss_type], phi_star=0.7, max_steps=1)
    trainer = make_trainer(MallowsDPOTrainer, family, args)
    with torch.no_grad():  # a policy that differs from the reference, so the margins are not all 0
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = first_batch(trainer)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()

    # our own loss functions on the same batch (fp32 logits, the logits-level op)
    with torch.no_grad():
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)[:, 1:]
        fwd = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        pol = mpf.sequence_logprobs(trainer.model(**fwd).logits[:, :-1], labels)
        ref = mpf.sequence_logprobs(trainer.ref_model(**fwd).logits[:, :-1], labels)
        (pw, pl), (rw, rl) = pol.logps.chunk(2), ref.logps.chunk(2)
        (nw, nl), (ew, el) = ref.num_tokens.chunk(2), ref.entropy.chunk(2)
        c = mpf.neg_log_dispersion(ew, el, trainer.model.config.vocab_size, phi_star=0.7, chosen_num_tokens=nw,
                                   rejected_num_tokens=nl)
        own = mpf.preference_loss(pw, pl, rw, rl, loss_type=loss_type, beta=trainer.beta, neg_log_dispersion=c,
                                  chosen_num_tokens=nw, rejected_num_tokens=nl)
    assert loss.item() == pytest.approx(own.loss.item(), rel=1e-5)
    assert not torch.allclose(own.losses, own.losses[0])  # the pairs differ, so the check has teeth

    loss64, policy64 = reference_loss64(trainer, batch, loss_type, 0.7)
    assert loss.item() == pytest.approx(loss64.item(), rel=1e-5)
    loss64.backward()
    for (name, p), p64 in zip(trainer.model.named_parameters(), policy64.parameters(), strict=True):
        scale = p64.grad.abs().max().clamp(min=1e-8)
        assert (p.grad.double() - p64.grad).abs().max() / scale < 1e-4, name

    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert set(TRL_KEYS) - {"loss"} <= set(logged)
    assert logged["dispersion/neg_log_mean"] == pytest.approx(c.mean().item(), rel=1e-5)
    assert logged["dispersion/empty_pairs"] == 0.0


def test_mixed_list_auto_phi_and_training(tmp_path):
    args = dpo_args(tmp_path, MallowsDPOConfig, loss_type=["sigmoid", "mallows_theta"], loss_weights=[0.5, 2.0],
                    phi_star="auto", max_steps=2)
    trainer = make_trainer(MallowsDPOTrainer, "llama", args)
    # phi* = "auto" from every training pair's reference entropies, computed independently here
    es, empties = [], []
    with torch.no_grad():
        for batch in trainer.get_train_dataloader():
            labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)[:, 1:]
            logits = trainer.ref_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            seq = mpf.sequence_logprobs(logits[:, :-1], labels)
            (ew, el), (nw, nl) = seq.entropy.chunk(2), seq.num_tokens.chunk(2)
            es.append(mpf.pair_entropy(ew, el, logits.shape[-1]))
            empties.append(mpf.empty_response_pairs(nw, nl))
    expected = mpf.auto_phi_star(torch.cat(es), empty_pairs=torch.cat(empties))
    assert trainer._mpf_phi_star == pytest.approx(expected, rel=1e-5)

    batch = first_batch(trainer)
    with torch.no_grad():
        mixed = trainer.compute_loss(trainer.model, batch).item()
        with mtrl._loss_types(trainer, ["sigmoid"], [1.0]):
            sigmoid = trainer.compute_loss(trainer.model, batch).item()
        with mtrl._loss_types(trainer, ["mallows_theta"], [1.0]):
            theta = trainer.compute_loss(trainer.model, batch).item()
    assert mixed == pytest.approx(0.5 * sigmoid + 2.0 * theta, rel=1e-6)
    trainer.train()
    logs = step_logs(trainer)
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert all(k in logs[-1] for k in ("dispersion/neg_log_mean", "dispersion/neg_log_std",
                                       "dispersion/entropy_mean", "dispersion/empty_pairs", *TRL_KEYS))


def test_cauchy_loss_through_trl(tmp_path):
    """The official MallowsPO code's cauchy loss, -log(atan(beta h)/pi + 1/2), on TRL's forwards."""
    trainer = make_trainer(MallowsDPOTrainer, "gpt2", dpo_args(tmp_path, loss_type=["cauchy"], max_steps=1))
    batch = first_batch(trainer)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()
        ids, attn = batch["input_ids"], batch["attention_mask"]
        labels = ids.masked_fill(batch["completion_mask"] == 0, -100)[:, 1:]
        pol, ref = (mpf.sequence_logprobs(m(input_ids=ids, attention_mask=attn).logits[:, :-1].double(), labels,
                                          backend="reference").logps for m in (trainer.model, trainer.ref_model))
    margin = trainer.beta * ((pol - ref)[:4] - (pol - ref)[4:])
    assert loss == pytest.approx(float((-torch.log(torch.atan(margin) / math.pi + 0.5)).mean()), rel=1e-5)


def test_refusals(tmp_path):
    with pytest.raises(ValueError, match="phi_star must be a positive number or 'auto', found -1"):
        make_trainer(MallowsDPOTrainer, "llama", dpo_args(tmp_path / "c", MallowsDPOConfig,
                                                            loss_type=["mallows_phi"], phi_star=-1))
    with pytest.raises(ValueError, match="ld_alpha .* is not defined for the MallowsPO losses"):
        make_trainer(MallowsDPOTrainer, "llama", dpo_args(tmp_path / "d", loss_type=["mallows_theta"], ld_alpha=0.5))
    with pytest.raises(TypeError, match="expected a trl.DPOTrainer instance, found object"):
        patch_dpo_trainer(object())


def test_precomputed_reference_carries_entropies_and_matches_the_live_reference(tmp_path):
    """precompute_ref_log_probs=True with a MallowsPO loss: one reference pass stores log-probs and mean
    entropies, no reference model stays in memory, and training logs what a live reference gives."""
    from trl_helpers import dataset, tiny_model, tokenizer

    kw = dict(loss_type=["mallows_theta"], phi_star="auto", max_steps=2)
    live = make_trainer(MallowsDPOTrainer, "llama", dpo_args(tmp_path / "live", MallowsDPOConfig, **kw))
    args = dpo_args(tmp_path / "pre", MallowsDPOConfig, precompute_ref_log_probs=True, **kw)
    with counted_op() as spy:
        pre = MallowsDPOTrainer(model=tiny_model("llama"), ref_model=None, args=args, train_dataset=dataset(),
                                processing_class=tokenizer())
    assert pre.ref_model is None
    assert spy.call_count == 2  # one pass over the 8 pairs, batches of 4: log-probs and entropies together
    columns = pre.train_dataset.column_names
    assert {"ref_chosen_logps", "ref_rejected_logps", "ref_chosen_entropy", "ref_rejected_entropy"} <= set(columns)
    assert pre._mpf_phi_star == pytest.approx(live._mpf_phi_star, rel=1e-6)
    live.train()
    with counted_op() as spy:
        pre.train()
    assert spy.call_count == 2  # policy forwards only
    for x, y in zip(step_logs(live), step_logs(pre), strict=True):
        for key in (*COMPARED, "dispersion/neg_log_mean", "dispersion/entropy_mean"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), key


def test_padding_free_dpo_equals_the_padded_run(tmp_path):
    """TRL 1.16 turns padding_free off for DPO; our head packs the rows before the backbone instead."""
    padded = make_trainer(MallowsDPOTrainer, "llama", dpo_args(tmp_path / "padded", loss_type=["mallows_theta"]))
    packed = make_trainer(MallowsDPOTrainer, "llama", dpo_args(tmp_path / "packed", loss_type=["mallows_theta"],
                                                               padding_free=True))
    lengths = []
    packed.model.model.register_forward_pre_hook(lambda m, a, kw: lengths.append(kw["input_ids"].shape),
                                                 with_kwargs=True)
    padded.train()
    packed.train()
    assert lengths and all(shape[0] == 1 for shape in lengths)  # the backbone saw one packed row
    for x, y in zip(step_logs(padded), step_logs(packed), strict=True):
        for key in (*COMPARED, "dispersion/neg_log_mean"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), key


def test_evaluate_logs_trl_and_dispersion_keys(tmp_path):
    from trl_helpers import dataset, tiny_model, tokenizer

    model = tiny_model("gpt2")
    args = dpo_args(tmp_path, MallowsDPOConfig, loss_type=["mallows_phi"], per_device_eval_batch_size=4)
    trainer = MallowsDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=dataset(),
                                eval_dataset=dataset(), processing_class=tokenizer())
    metrics = trainer.evaluate()
    for key in ("loss", "rewards/margins", "logps/chosen", "mean_token_accuracy", "dispersion/neg_log_mean",
                "dispersion/entropy_mean"):
        assert math.isfinite(metrics[f"eval_{key}"]), key
    # at initialisation (policy = reference) every margin is 0: -log g_phi(0+) < log 2 (right branch)
    assert metrics["eval_rewards/margins"] == 0.0 and metrics["eval_loss"] < math.log(2)
    with torch.no_grad(), pytest.warns(FutureWarning, match="return_outputs=True"):  # TRL's deprecated path
        loss, outputs = trainer.compute_loss(trainer.model, first_batch(trainer), return_outputs=True)
    assert math.isfinite(loss.item()) and outputs.logits.shape[-1] == model.config.vocab_size
