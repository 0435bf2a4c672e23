"""``patch_trainer`` on TRL 1.16's other trainers that call ``fused_lm_head=True`` (KTO, GRPO, RLOO, SFT): two
optimizer steps log what the same trainer logs with TRL's own head (fp32, rel 1e-5), the head keeps each trainer's
settings (temperature, outputs), and the fused op did the work."""

from __future__ import annotations

import copy
import os
from unittest import mock

import pytest
from trl_helpers import PAIRS, dataset, tiny_model, tokenizer

from mallowspo_fast.integrations import trl_head
from mallowspo_fast.integrations.trl_head import HeadSettings, patch_trainer

COMMON = dict(per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2, lr_scheduler_type="constant",
              logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=0,
              disable_tqdm=True, dataloader_num_workers=0)


def _logs(trainer):
    return [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]


def _kto(out):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    rows = [{"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"} for p in PAIRS for k in
            ("chosen", "rejected")]
    model = tiny_model("llama")
    args = KTOConfig(output_dir=os.fspath(out), beta=0.5, max_length=32, **COMMON)
    return KTOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=tokenizer())


def _reward_len(completions, **kwargs):
    return [float(len(c)) / 10.0 for c in completions]


def _grpo(out):
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=os.fspath(out), num_generations=4, max_completion_length=6, temperature=0.8,
                      beta=0.0, generation_batch_size=4, **COMMON)
    return GRPOTrainer(model=tiny_model("gpt2"), reward_funcs=_reward_len, args=args,
                       train_dataset=dataset().select_columns(["prompt"]), processing_class=tokenizer())


def _rloo(out):
    from trl import RLOOConfig, RLOOTrainer

    args = RLOOConfig(output_dir=os.fspath(out), num_generations=4, max_completion_length=6, temperature=0.9,
                      beta=0.0, generation_batch_size=4, **COMMON)
    return RLOOTrainer(model=tiny_model("llama"), reward_funcs=_reward_len, args=args,
                       train_dataset=dataset().select_columns(["prompt"]), processing_class=tokenizer())


def _sft(out):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in PAIRS]
    args = SFTConfig(output_dir=os.fspath(out), max_length=32, **COMMON)
    return SFTTrainer(model=tiny_model("gpt2"), args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=tokenizer())


TRAINERS = {"kto": (_kto, ("loss", "logps/chosen", "logps/rejected", "rewards/chosen", "kl")),
            "grpo": (_grpo, ("loss", "reward", "entropy")),
            "rloo": (_rloo, ("loss", "reward", "entropy")),
            "sft": (_sft, ("loss", "entropy", "mean_token_accuracy"))}


@pytest.mark.parametrize("name", TRAINERS)
def test_two_steps_match_trls_own_head(name, tmp_path):
    build, keys = TRAINERS[name]
    plain = build(tmp_path / "plain")
    plain.train()
    ours = build(tmp_path / "ours")
    settings = trl_head.trl_head_settings(ours.model)
    assert settings is not None
    assert patch_trainer(ours) is ours and patch_trainer(ours) is ours  # idempotent
    assert ours.model._mpf_head_settings.outputs == settings.outputs
    assert ours.model._mpf_head_settings.temperature == settings.temperature
    with mock.patch.object(trl_head, "linear_token_logprobs", wraps=trl_head.linear_token_logprobs) as spy:
        ours.train()
    assert spy.call_count >= 2
    a, b = _logs(plain), _logs(ours)
    assert len(a) == len(b) == 2
    for step, (x, y) in enumerate(zip(a, b, strict=True), 1):
        assert set(keys) <= set(x), (name, sorted(x))
        for key in keys:
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (name, step, key)


def test_grpo_head_takes_the_trainers_temperature(tmp_path):
    trainer = _grpo(tmp_path)
    assert trl_head.trl_head_settings(trainer.model) == HeadSettings(temperature=0.8, outputs=("log_probs",
                                                                                                "entropy"))


def test_a_trainer_without_trls_head_is_refused():
    class NotATrainer:
        model = tiny_model("llama")

    with pytest.raises(ValueError, match="no model of NotATrainer carries TRL's fused LM head"):
        patch_trainer(NotATrainer())
