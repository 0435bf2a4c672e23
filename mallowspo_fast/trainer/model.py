"""Models and DeepSpeed engines: the policy (with optimizer and schedule) and inference-only engines.

Every rank builds the full model and ``deepspeed.initialize`` partitions it (ZeRO-3). A fresh model from
``model_config`` is initialised from ``seed`` with the Hugging Face initialisers, identically on every
rank. For large checkpoints with ``accelerate`` installed, transformers' ZeRO-3 loading is used instead
(weights are partitioned while they load).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from typing import Any

import torch

from .config import TrainConfig
from .ds_config import build_lr_scheduler, build_ref_ds_config, build_train_ds_config, num_warmup_steps
from .launch import DistState

logger = logging.getLogger("mallowspo_fast.trainer")


def _zero3_loading(zero_stage: int, ds_config: dict) -> Any:
    """transformers' ZeRO-3 aware loading (needs accelerate); a no-op context otherwise."""
    if zero_stage != 3 or importlib.util.find_spec("accelerate") is None:
        return contextlib.nullcontext(None)
    from transformers.integrations import HfDeepSpeedConfig

    return contextlib.nullcontext(HfDeepSpeedConfig(ds_config))


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0  # attention modules pass it to the functional call
    for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)


def build_model(cfg: TrainConfig, source: str | None, tokenizer: Any, ds_config: dict | None = None) -> Any:
    """The causal LM from a directory, or fresh from ``cfg.model_config`` (seeded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if source is not None:
        with _zero3_loading(cfg.zero_stage, ds_config or {}) as keep_alive:  # noqa: F841  (must outlive the load)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    else:
        mc = dict(cfg.model_config)
        model_type = mc.pop("model_type")
        mc.setdefault("vocab_size", len(tokenizer))
        for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
            if getattr(tokenizer, name, None) is not None:
                mc.setdefault(name, getattr(tokenizer, name))
        config = AutoConfig.for_model(model_type, **mc)
        torch.manual_seed(cfg.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **kwargs)
        model = model.to(dtype)
    vocab = getattr(model.config, "vocab_size", None)
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has "
                         f"{model.config.vocab_size}: token ids would fall outside the embedding")
    if cfg.disable_dropout:
        disable_dropout(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.logits_mode == "chunked":
        model = chunked_logprobs_model(model, cfg.logits_chunk_size, cfg.logprob_backend)
    return model


def chunked_logprobs_model(model: Any, chunk_size: int | None, backend: str) -> Any:
    """``logits_mode: chunked``: the module handed to DeepSpeed runs the backbone and then the output
    layer chunk by chunk (``CausalLMLogprobs``), so the [B, T, V] logits never exist.

    The output layer is replaced by a head that owns the same Parameters (tied embeddings included),
    and the whole computation runs inside ``engine(...)``: ZeRO-3 gathers the sharded output weight
    around the head's forward and again for its backward, as for the ``nn.Linear`` it replaces. The
    Hugging Face model stays reachable as ``.model`` (export saves it with its usual keys). ``chunk_size``
    and ``backend`` are the config's ``logits_chunk_size`` and ``logprob_backend`` ("auto" included)."""
    from ..ops.lm_head import CausalLMLogprobs

    return CausalLMLogprobs(model, logits_mode="chunked", chunk_size=chunk_size, backend=backend)


def hf_model(module: Any) -> Any:
    """The Hugging Face model inside an engine's module (unwraps ``logits_mode: chunked``)."""
    from ..ops.lm_head import CausalLMLogprobs

    return module.model if isinstance(module, CausalLMLogprobs) else module


def policy_engine(cfg: TrainConfig, state: DistState, model: Any, total_steps: int, *,
                  learning_rate: float | None = None, scheduler: str | None = None) -> Any:
    """``deepspeed.initialize`` with AdamW and the LambdaLR schedule (DeepSpeed steps and saves it)."""
    import deepspeed

    ds_config = build_train_ds_config(cfg, state.world_size, on_cpu=state.device.type == "cpu",
                                      learning_rate=learning_rate)
    kind = cfg.lr_scheduler_type if scheduler is None else scheduler
    warmup = num_warmup_steps(cfg.warmup_steps, cfg.warmup_ratio, total_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=params, config=ds_config,
        lr_scheduler=lambda opt: build_lr_scheduler(opt, kind, warmup, total_steps),
    )
    return engine


def inference_engine(cfg: TrainConfig, state: DistState, model: Any) -> Any:
    """An engine without optimizer (live reference, separate-reference precompute)."""
    import deepspeed

    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=build_ref_ds_config(cfg, state.world_size))
    engine.eval()
    return engine
