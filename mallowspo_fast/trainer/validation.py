"""Validation of a :class:`TrainConfig`: every key checked before a model or a dataset is loaded.

Unknown keys and wrong types are refused while the values are read (``config``); here: out-of-range values,
inconsistent combinations and missing local paths, each a ``ValueError`` naming the key. The allowed values
of the choice keys live here too (``config`` declares its fields with them).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..losses import LOSS_TYPES

if TYPE_CHECKING:
    from .config import TrainConfig

# orpo has its own loss function (no reference model); kto trains on unpaired (prompt, completion, label) rows
TRAINER_LOSS_TYPES = (*LOSS_TYPES, "orpo", "kto")
LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
LOGPROB_BACKENDS = ("auto", "triton", "torch", "reference")
LOGITS_MODES = ("logits", "chunked")
REPORT_TO = ("all", "none", "tensorboard")
TRUNCATION_MODES = ("keep_start", "keep_end")
NONFINITE_ACTIONS = ("stop", "skip")
# Step counters are saved in checkpoints and handed to torch and DeepSpeed as int64.
MAX_STEPS = 2**63 - 1


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


_FILE_SUFFIXES = frozenset({".json", ".jsonl", ".parquet", ".csv", ".tsv", ".arrow", ".txt", ".yaml", ".yml"})


def _looks_local(path: str) -> bool:
    """A path rather than a hub name (hub names are ``name`` or ``org/name``)."""
    return (path.startswith((".", "/", "~")) or path.rstrip("/").count("/") > 1
            or Path(path).suffix.lower() in _FILE_SUFFIXES)


def _stat(key: str, path: str | os.PathLike, test: str) -> bool:
    """``Path(path).<test>()``; a path the OS refuses (too long, a NUL byte) is a ValueError naming ``key``."""
    try:
        return "\x00" not in os.fspath(path) and getattr(Path(path).expanduser(), test)()
    except OSError as err:
        raise ValueError(f"{key}={os.fspath(path)[:80]!r}...: not a usable path ({err.strerror})") from None


def _check_model_path(key: str, path: str | None) -> None:
    if path is None:
        return
    p = Path(path).expanduser()
    if _stat(key, p, "is_dir"):
        _require((p / "config.json").is_file() or key == "tokenizer_name_or_path",
                 f"{key}={path!r}: the directory has no config.json (expected a Hugging Face model directory)")
        return
    _require(not _stat(key, p, "exists") and not _looks_local(path),
             f"{key}={path!r}: no such model directory (expected a local Hugging Face model directory "
             "or a hub name like org/name)")


def _world_size(world_size: int | None) -> int:
    if world_size is not None:
        return world_size
    text = os.environ.get("WORLD_SIZE", "1")
    return int(text) if text.isdigit() and int(text) > 0 else 1


def validate(cfg: TrainConfig, *, world_size: int | None = None) -> None:
    """Raise ValueError on the first invalid value or combination (nothing is loaded here).

    ``world_size``: ranks to check the batch sizes against (None: ``WORLD_SIZE`` or 1). With
    ``train_batch_size`` set, ``cfg.gradient_accumulation_steps`` is derived from it here.
    """
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    for name in fields:  # text: null means "none"; an empty string or a NUL byte is never a name or a path
        value = getattr(cfg, name)
        _require(not isinstance(value, str) or (value.strip() != "" and "\x00" not in value),
                 f"{name} must be a non-empty string without NUL bytes (null for none), found {value!r}")
    _validate_model(cfg)
    _validate_data(cfg)
    for name, f in fields.items():
        choices = f.metadata.get("choices")
        if choices is None or name == "loss_type":  # a list of loss types is checked entry by entry
            continue
        _require(getattr(cfg, name) in choices, f"{name} must be one of {choices}, found {getattr(cfg, name)!r}")
    _validate_loss(cfg)
    _validate_optim(cfg, _world_size(world_size))
    _validate_streaming(cfg)
    _validate_runtime(cfg)


def _validate_model(cfg: TrainConfig) -> None:
    _require((cfg.model_name_or_path is None) != (cfg.model_config is None),
             "give exactly one of model_name_or_path (a model directory) and model_config (a fresh model), "
             f"found model_name_or_path={cfg.model_name_or_path!r}, model_config={cfg.model_config!r}")
    _check_model_path("model_name_or_path", cfg.model_name_or_path)
    _check_model_path("ref_model_name_or_path", cfg.ref_model_name_or_path)
    _check_model_path("tokenizer_name_or_path", cfg.tokenizer_name_or_path)
    if cfg.model_config is not None:
        _require(isinstance(cfg.model_config.get("model_type"), str),
                 f"model_config needs a 'model_type' (e.g. llama), found keys {sorted(cfg.model_config)}")
        from transformers import CONFIG_MAPPING

        _require(cfg.model_config["model_type"] in CONFIG_MAPPING,
                 f"model_config.model_type={cfg.model_config['model_type']!r} is not a transformers model type")
        _require(cfg.tokenizer_name_or_path is not None or cfg.train_tokenizer,
                 "model_config builds a fresh model: give tokenizer_name_or_path or set train_tokenizer=true")
    _require(cfg.tokenizer_vocab_size >= 300, f"tokenizer_vocab_size must be >= 300, found {cfg.tokenizer_vocab_size}")


def _validate_data(cfg: TrainConfig) -> None:
    _require(cfg.dataset_name is not None, "dataset_name is required (a data file, folder or hub name)")
    if _looks_local(cfg.dataset_name):
        _require(_stat("dataset_name", cfg.dataset_name, "exists"), f"dataset_name={cfg.dataset_name!r}: no such file "
                 "or directory")
    _require(0.0 <= cfg.eval_ratio < 1.0, f"eval_ratio must be in [0, 1), found {cfg.eval_ratio}")
    _require(cfg.eval_size >= 0, f"eval_size must be >= 0, found {cfg.eval_size}")
    held_out = [f"{k}={getattr(cfg, k)!r}" for k in ("dataset_test_split", "eval_ratio", "eval_size")
                if getattr(cfg, k)]
    _require(len(held_out) <= 1, f"give one of dataset_test_split, eval_ratio and eval_size for the eval split, "
             f"found {', '.join(held_out)}")
    for key in ("max_train_samples", "max_eval_samples", "max_length", "max_prompt_length", "pad_to_multiple_of",
                "dataset_num_proc"):
        value = getattr(cfg, key)
        _require(value is None or value >= 1, f"{key} must be >= 1 or null, found {value}")
    _require(cfg.max_length is None or cfg.max_length >= 2, f"max_length must be >= 2 (a prompt token and a "
             f"completion token) or null, found {cfg.max_length}")
    if cfg.max_length is not None and cfg.max_prompt_length is not None:
        _require(cfg.max_prompt_length < cfg.max_length, f"max_prompt_length ({cfg.max_prompt_length}) must be "
                 f"smaller than max_length ({cfg.max_length}): the completion needs room")
    if cfg.column_mapping is not None:
        _require(all(isinstance(k, str) and isinstance(v, str) for k, v in cfg.column_mapping.items()),
                 f"column_mapping must map names to column names (strings), found {cfg.column_mapping!r}")


def _validate_loss(cfg: TrainConfig) -> None:
    types_ = cfg.loss_types
    _require(len(types_) > 0, "loss_type must not be an empty list")
    for t in types_:
        _require(t in TRAINER_LOSS_TYPES, f"loss_type {t!r} is not supported; expected one of {TRAINER_LOSS_TYPES}")
    _require(len(set(types_)) == len(types_), f"loss_type {types_} repeats an entry")
    _require("orpo" not in types_ or len(types_) == 1, "orpo cannot be combined with other loss types")
    _require("kto" not in types_ or len(types_) == 1, f"loss_type {types_}: kto trains on unpaired data "
             "(prompt, completion, label) and cannot be combined with the paired losses; use loss_type=kto alone")
    if cfg.loss_weights is not None:
        _require(len(cfg.loss_weights) == len(types_), f"loss_weights has {len(cfg.loss_weights)} entries but "
                 f"loss_type has {len(types_)}")
    _require(cfg.beta > 0 and math.isfinite(cfg.beta), f"beta must be a positive number, found {cfg.beta}")
    high = 0.5 if "robust" in types_ else 1.0
    _require(0.0 <= cfg.label_smoothing <= high and not ("robust" in types_ and cfg.label_smoothing == 0.5),
             f"label_smoothing must be in [0, {high}{')' if high == 0.5 else ']'}, found {cfg.label_smoothing}")
    if isinstance(cfg.phi_star, str):
        _require(cfg.phi_star == "auto", f"phi_star must be a positive number or 'auto', found {cfg.phi_star!r}")
    else:
        _require(cfg.phi_star > 0 and math.isfinite(cfg.phi_star), f"phi_star must be > 0, found {cfg.phi_star}")
    if cfg.mixing_alpha is not None:
        _require(0.0 <= cfg.mixing_alpha <= 1.0, f"mixing_alpha must be in [0, 1], found {cfg.mixing_alpha}")
    for key in ("home_advantage", "simpo_gamma", "sft_coef"):
        _require(math.isfinite(getattr(cfg, key)), f"{key} must be finite, found {getattr(cfg, key)}")
    for key in ("desirable_weight", "undesirable_weight"):
        value = getattr(cfg, key)
        _require(value >= 0 and math.isfinite(value), f"{key} must be a finite number >= 0, found {value}")
    if cfg.is_kto:
        _validate_kto(cfg)


def _validate_kto(cfg: TrainConfig) -> None:
    """KTO reads reference values of each row's completion and of its KL completion (fixed per split at
    tokenisation, so both precompute like a pair): refuse what assumes paired data or losses."""
    refused = {"reference_free": cfg.reference_free, "loss_weights": cfg.loss_weights is not None,
               "length_normalization": cfg.length_normalization, "add_sft_loss": cfg.add_sft_loss,
               "rpo_alpha": cfg.rpo_alpha is not None, "label_smoothing": cfg.label_smoothing != 0,
               "sft_warmup_steps": cfg.sft_warmup_steps != 0, "streaming": cfg.streaming,
               "phi_star": cfg.phi_star == "auto"}
    bad = [f"{k}={getattr(cfg, k)!r}" for k, on in refused.items() if on]
    _require(not bad, f"loss_type=kto does not support {', '.join(bad)} (paired-loss or paired-data options; "
             "streaming: the KL rows pair each row with another row of the split); reset them to their defaults")


def _validate_optim(cfg: TrainConfig, world_size: int) -> None:
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "logging_steps"):
        _require(getattr(cfg, key) >= 1, f"{key} must be >= 1, found {getattr(cfg, key)}")
    if cfg.train_batch_size is not None:
        per_step = cfg.per_device_train_batch_size * world_size
        _require(cfg.train_batch_size % per_step == 0 and cfg.train_batch_size >= per_step,
                 f"train_batch_size={cfg.train_batch_size} must be a multiple of per_device_train_batch_size "
                 f"({cfg.per_device_train_batch_size}) x world size ({world_size}) = {per_step}")
        cfg.gradient_accumulation_steps = cfg.train_batch_size // per_step
    _require(cfg.learning_rate > 0, f"learning_rate must be > 0, found {cfg.learning_rate}")
    _require(cfg.sft_learning_rate > 0, f"sft_learning_rate must be > 0, found {cfg.sft_learning_rate}")
    _require(cfg.weight_decay >= 0, f"weight_decay must be >= 0, found {cfg.weight_decay}")
    _require(0.0 <= cfg.adam_beta1 < 1.0 and 0.0 <= cfg.adam_beta2 < 1.0,
             f"adam_beta1 and adam_beta2 must be in [0, 1), found {cfg.adam_beta1}, {cfg.adam_beta2}")
    _require(cfg.adam_epsilon > 0, f"adam_epsilon must be > 0, found {cfg.adam_epsilon}")
    _require(cfg.max_grad_norm >= 0, f"max_grad_norm must be >= 0, found {cfg.max_grad_norm}")
    _require(0.0 <= cfg.warmup_ratio < 1.0, f"warmup_ratio must be in [0, 1), found {cfg.warmup_ratio}")
    _require(cfg.max_steps == -1 or 1 <= cfg.max_steps <= MAX_STEPS,
             f"max_steps must be -1 or in [1, 2**63 - 1] (a step count fits in int64), found {cfg.max_steps}")
    _require(cfg.max_steps >= 1 or cfg.num_train_epochs > 0,
             f"num_train_epochs must be > 0 when max_steps is -1, found {cfg.num_train_epochs}")
    for key in ("warmup_steps", "sft_warmup_steps"):
        _require(0 <= getattr(cfg, key) <= MAX_STEPS,
                 f"{key} must be in [0, 2**63 - 1] (a step count fits in int64), found {getattr(cfg, key)}")
    _require(0 <= cfg.seed < 2**32, f"seed must be in [0, 2**32) (numpy and datasets seeds), found {cfg.seed}")
    _require(cfg.zero_stage in (0, 1, 2, 3), f"zero_stage must be 0, 1, 2 or 3, found {cfg.zero_stage}")
    _require(not cfg.offload_param or cfg.zero_stage == 3, "offload_param needs zero_stage=3")
    _require(not cfg.offload_optimizer or cfg.zero_stage >= 1, "offload_optimizer needs zero_stage >= 1")
    _require(not cfg.ref_offload or cfg.zero_stage == 3, "ref_offload (reference parameters on CPU) needs "
             "zero_stage=3")
    if isinstance(cfg.deepspeed, str):
        _require(_stat("deepspeed", cfg.deepspeed, "is_file"), f"deepspeed={cfg.deepspeed!r}: no such JSON file")


def _validate_streaming(cfg: TrainConfig) -> None:
    """A streamed training split has no length and is read once per epoch: refuse what needs more."""
    if not cfg.streaming:
        return
    _require(cfg.max_steps >= 1, "streaming=true needs max_steps >= 1: a streamed training split has no length, "
             f"so num_train_epochs cannot be turned into a number of steps (found max_steps={cfg.max_steps})")
    _require(cfg.eval_ratio == 0, f"streaming=true: eval_ratio={cfg.eval_ratio} needs the length of the training "
             "split; hold out the first N rows of the stream with eval_size=N, or give dataset_test_split")
    if cfg.needs_reference:
        needed = []
        if cfg.precompute_ref_log_probs:
            needed.append("precompute_ref_log_probs=false (the precomputed reference pass reads the whole training "
                          "split before the first step; false scores each micro-batch with a live reference engine)")
        if cfg.phi_star == "auto":
            needed.append("a numeric phi_star (phi_star=auto averages over a reference pass on the whole training "
                          "split; give e.g. the value a non-streamed run logged, or 0.29)")
        _require(not needed, f"streaming=true with loss_type={cfg.loss_type!r} (reads reference values) needs "
                 + " and ".join(needed))
    _require(cfg.sft_warmup_steps == 0, f"streaming=true: sft_warmup_steps={cfg.sft_warmup_steps} is not supported "
             "(the warm-up's data order and cache key need the length of the training split); run the warm-up as "
             "a separate non-streamed job and pass its output as model_name_or_path, or set sft_warmup_steps=0")


def _validate_runtime(cfg: TrainConfig) -> None:
    for key in ("save_steps",):
        _require(getattr(cfg, key) >= 0, f"{key} must be >= 0, found {getattr(cfg, key)}")
    _require(cfg.eval_steps is None or cfg.eval_steps >= 1, f"eval_steps must be >= 1 or null, found {cfg.eval_steps}")
    _require(cfg.save_total_limit is None or cfg.save_total_limit >= 1,
             f"save_total_limit must be >= 1 or null, found {cfg.save_total_limit}")
    _require(cfg.max_nonfinite_in_a_row >= 1,
             f"max_nonfinite_in_a_row must be >= 1, found {cfg.max_nonfinite_in_a_row}")
    _require(cfg.ddp_timeout >= 1, f"ddp_timeout must be >= 1 (seconds), found {cfg.ddp_timeout}")
    _require(cfg.on_nonfinite != "skip" or cfg.zero_stage >= 1 or cfg.bf16, "on_nonfinite=skip needs zero_stage >= "
             "1 or bf16=true (the engine then discards a non-finite update); with zero_stage=0 in fp32 use stop")
    if cfg.resume_from_checkpoint not in (None, "auto"):
        _require(_stat("resume_from_checkpoint", cfg.resume_from_checkpoint, "is_dir"),
                 f"resume_from_checkpoint={cfg.resume_from_checkpoint!r}: no such checkpoint "
                 "directory (give 'auto' or a checkpoint-N directory)")
    if cfg.report_to == "tensorboard":
        import importlib.util

        _require(importlib.util.find_spec("tensorboard") is not None,
                 "report_to=tensorboard but the tensorboard package is not installed (pip install tensorboard), "
                 "or use report_to=all / none")
    if cfg.logits_chunk_size is not None:
        _require(cfg.logits_chunk_size > 0, f"logits_chunk_size must be a positive int or null, found "
                 f"{cfg.logits_chunk_size}")
    if cfg.logprob_backend == "triton":
        import torch

        _require(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                 "logprob_backend=triton needs a CUDA device (or TRITON_INTERPRET=1 on CPU, slow); "
                 "use auto or torch")
