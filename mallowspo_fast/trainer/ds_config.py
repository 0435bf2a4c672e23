"""DeepSpeed configs built in code from :class:`TrainConfig`, and the learning-rate schedule.

The schedule is a ``torch.optim.lr_scheduler.LambdaLR`` handed to ``deepspeed.initialize``: DeepSpeed steps
it at every optimizer step and saves it in checkpoints. It follows the Hugging Face schedules exactly
(warmup from 0 over ``warmup_steps``, then linear or cosine decay to 0); DeepSpeed's own WarmupDecayLR /
WarmupCosineLR would force at least two warmup steps.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from .config import TrainConfig

# Batch keys that the trainer owns: a user config may repeat them only with the same values.
_BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def _zero_section(stage: int, *, offload_param: bool, offload_optimizer: bool) -> dict:
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        # Needed by the 16-bit export: the gathered weights are saved from rank 0.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if offload_param:
            zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    return zero


def _merge(base: dict, extra: Mapping[str, Any]) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _user_config(deepspeed: str | Mapping[str, Any] | None) -> dict:
    """The ``deepspeed`` key: a JSON file, a mapping, or None."""
    if deepspeed is None:
        return {}
    if isinstance(deepspeed, str):
        with open(deepspeed, encoding="utf-8") as f:
            try:
                return json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"deepspeed={deepspeed!r}: not valid JSON: {e}") from None
    return dict(deepspeed)


def build_train_ds_config(cfg: TrainConfig, world_size: int, *, on_cpu: bool,
                          learning_rate: float | None = None) -> dict[str, Any]:
    """The policy engine's config: ZeRO stage, precision, offload, batch sizes, clipping, AdamW.

    ``on_cpu`` selects DeepSpeed's plain torch AdamW (the fused CPU Adam needs a compiled extension).
    """
    micro = cfg.per_device_train_batch_size
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "train_batch_size": micro * cfg.gradient_accumulation_steps * world_size,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": _zero_section(cfg.zero_stage, offload_param=cfg.offload_param,
                                           offload_optimizer=cfg.offload_optimizer),
        "bf16": {"enabled": cfg.bf16},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.learning_rate if learning_rate is None else learning_rate,
                "betas": [cfg.adam_beta1, cfg.adam_beta2],
                "eps": cfg.adam_epsilon,
                "weight_decay": cfg.weight_decay,
            },
        },
        "steps_per_print": 10**9,  # the trainer logs; DeepSpeed's own step prints would duplicate it
        "wall_clock_breakdown": False,
    }
    if on_cpu or cfg.offload_optimizer:
        # torch's AdamW: no compiled extension needed (DeepSpeedCPUAdam would be built on first use).
        ds["optimizer"]["params"]["torch_adam"] = True
    user = _user_config(cfg.deepspeed)
    for key in _BATCH_KEYS:
        if key in user and user[key] != ds[key]:
            raise ValueError(f"deepspeed config sets {key}={user[key]} but the trainer config gives {ds[key]} "
                             "(set per_device_train_batch_size / gradient_accumulation_steps instead)")
    return _merge(ds, user)


def build_ref_ds_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """An inference-only engine for the reference model: no optimizer; ZeRO-3 when training is ZeRO-3
    (else stage 0, a replica per rank), parameters optionally offloaded to CPU (``ref_offload``)."""
    stage = 3 if cfg.zero_stage == 3 else 0
    micro = cfg.per_device_train_batch_size
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro * world_size,
        "zero_optimization": _zero_section(stage, offload_param=cfg.ref_offload and stage == 3,
                                           offload_optimizer=False),
        "bf16": {"enabled": cfg.bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def num_warmup_steps(warmup_steps: int, warmup_ratio: float, total_steps: int) -> int:
    """``warmup_steps`` if positive, else ``ceil(warmup_ratio * total_steps)`` (the HF rule)."""
    return warmup_steps if warmup_steps > 0 else math.ceil(warmup_ratio * total_steps)


def lr_lambda(kind: str, warmup: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at optimizer step ``s`` (0-based), Hugging Face semantics."""

    def f(s: int) -> float:
        if s < warmup:
            return s / max(1, warmup)
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        progress = (s - warmup) / max(1, total_steps - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))
        raise ValueError(f"lr_scheduler_type must be linear, cosine, constant or constant_with_warmup, found {kind!r}")

    return f


def build_lr_scheduler(optimizer: Any, kind: str, warmup: int, total_steps: int) -> Any:
    """LambdaLR over the DeepSpeed-wrapped optimizer (DeepSpeed steps it after each optimizer step):
    ``kind`` (``lr_scheduler_type``) after ``warmup`` steps, none for ``constant``."""
    import torch

    warm = 0 if kind == "constant" else warmup
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(kind, warm, total_steps))
