"""Tiny models, a local tokenizer and preference data for the TRL integration tests (no hub access)."""

from __future__ import annotations

import copy
import functools
import os

import torch

# Short, distinct pairs (standard explicit format), with responses of different lengths so that batches pad.
PAIRS = [
    {"prompt": "Name something red:", "chosen": " an apple", "rejected": " a stone that is grey"},
    {"prompt": "Name something blue:", "chosen": " the sky", "rejected": " mud"},
    {"prompt": "Name something green:", "chosen": " fresh grass in spring", "rejected": " coal"},
    {"prompt": "Name something white:", "chosen": " snow", "rejected": " black ink"},
    {"prompt": "Name something yellow:", "chosen": " the sun", "rejected": " the night sky"},
    {"prompt": "Name something pink:", "chosen": " a rose", "rejected": " moss"},
    {"prompt": "Name something brown:", "chosen": " soil", "rejected": " a white cloud"},
    {"prompt": "Name something grey:", "chosen": " a rock", "rejected": " flame"},
]


@functools.lru_cache(maxsize=1)
def tokenizer():
    from mallowspo_fast.data.tokenizer import train_tokenizer

    texts = [p["prompt"] + p["chosen"] + p["rejected"] for p in PAIRS] * 4
    return train_tokenizer(texts, vocab_size=300, min_frequency=1)


def dataset():
    from datasets import Dataset

    return Dataset.from_list(PAIRS)


FAMILIES = ("llama", "gpt2")


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised 1-layer causal LM of ``family`` (float32) over the local tokenizer's vocabulary."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    vocab = len(tokenizer())
    if family == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                             tie_word_embeddings=False)
    elif family == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=1, n_head=2, n_positions=64,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        raise ValueError(f"unknown family {family!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger logits than the default init, so the entropies are not all ~log V
        model.get_output_embeddings().weight.mul_(8.0)
    return model


def dpo_args(tmp_path, cls=None, **extra):
    from trl import DPOConfig

    cls = cls or DPOConfig
    kw = dict(output_dir=os.fspath(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
              lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
              bf16=False, fp16=False, seed=0, beta=0.5, max_length=32, disable_tqdm=True,
              dataloader_num_workers=0)
    kw.update(extra)
    return cls(**kw)


def make_trainer(trainer_cls, family: str, args, seed: int = 0):
    model = tiny_model(family, seed)
    ref = copy.deepcopy(model)
    return trainer_cls(model=model, ref_model=ref, args=args, train_dataset=dataset(), processing_class=tokenizer())
