"""The training configuration: one dataclass, read from YAML and ``key=value`` overrides, validated up front.

Names mirror TRL's ``DPOConfig`` / ``TrainingArguments`` and TRL's scripts where the meaning is the same;
the MallowsPO additions and the DeepSpeed knobs are documented in the README (Training, Config reference).
Reading refuses unknown keys and wrong types; :mod:`.validation` then checks ranges, combinations and local
paths, all before a model or a dataset is loaded, each error a ``ValueError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from .validation import (
    LOGITS_MODES,
    LOGPROB_BACKENDS,
    LR_SCHEDULERS,
    NONFINITE_ACTIONS,
    REPORT_TO,
    TRAINER_LOSS_TYPES,
    TRUNCATION_MODES,
    validate,
)


def _f(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field carrying its help text (shown by ``mallowspo-train --help``)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: json.loads(json.dumps(default)), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """Every setting of a training run. Build it with :func:`load_config` (which validates).

    One field per key; the [Config reference](../config-reference.md) lists them all with their type,
    default and meaning (``mallowspo-train --help`` prints the same). Constructing the dataclass directly
    skips the coercion and the checks: use :func:`load_config` or :func:`build_config`.
    """

    # --- model ---------------------------------------------------------------------------------------
    model_name_or_path: str | None = _f(None, "policy to fine-tune: a local Hugging Face model directory "
                                        "(or a hub name); exclusive with model_config", group="model")
    model_config: dict | None = _f(None, "config mapping of a fresh model (needs 'model_type', e.g. llama); "
                                   "vocab_size defaults to the tokenizer's", group="model")
    tokenizer_name_or_path: str | None = _f(None, "tokenizer directory (default: model_name_or_path)",
                                            group="model")
    train_tokenizer: bool = _f(False, "train a byte-level BPE tokenizer on the training data (cached in "
                               "output_dir/tokenizer) when no tokenizer is given", group="model")
    tokenizer_vocab_size: int = _f(2048, "vocabulary size of the tokenizer trained by train_tokenizer",
                                   group="model")
    ref_model_name_or_path: str | None = _f(None, "reference model directory (default: the initial policy)",
                                            group="model")
    attn_implementation: str | None = _f(None, "attention implementation passed to transformers "
                                         "(eager, sdpa, flash_attention_2)", group="model")
    trust_remote_code: bool = _f(False, "allow custom model code from the model directory", group="model")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory", group="model")
    disable_dropout: bool = _f(True, "set every dropout probability of the policy and reference to 0",
                               group="model")

    # --- data ----------------------------------------------------------------------------------------
    dataset_name: str | None = _f(None, "data file (json, jsonl, parquet, csv), folder, save_to_disk folder "
                                  "or hub name", group="data")
    dataset_train_split: str = _f("train", "split used for training", group="data")
    dataset_test_split: str | None = _f(None, "split used for evaluation (none: no eval split unless "
                                        "eval_ratio or eval_size is set)", group="data")
    eval_ratio: float = _f(0.0, "fraction of the training split held out for evaluation (0: none)",
                           group="data")
    eval_size: int = _f(0, "pairs held out from the training split for evaluation (0: none): a seeded random "
                        "sample, or with streaming the first N rows of the stream", group="data")
    streaming: bool = _f(False, "read the training split as a stream (rows loaded and tokenised as they are "
                         "read, never all in memory); needs max_steps, and with a reference-based loss "
                         "precompute_ref_log_probs=false and a numeric phi_star", group="data")
    column_mapping: dict | None = _f(None, "canonical name -> column, e.g. {prompt: question, chosen: "
                                     "good, rejected: bad}", group="data")
    max_train_samples: int | None = _f(None, "use only the first N training pairs", group="data")
    max_eval_samples: int | None = _f(None, "use only the first N evaluation pairs", group="data")
    max_length: int | None = _f(1024, "max tokens of prompt + completion", group="data")
    max_prompt_length: int | None = _f(512, "max prompt tokens", group="data")
    truncation_mode: str = _f("keep_start", "which prompt tokens survive truncation", group="data",
                              choices=TRUNCATION_MODES)
    pad_to_multiple_of: int | None = _f(None, "pad batch length to a multiple of this", group="data")
    dataset_num_proc: int | None = _f(None, "processes for tokenisation", group="data")

    # --- loss ----------------------------------------------------------------------------------------
    loss_type: str | list[str] = _f("mallows_theta", "loss, or a list of losses combined with loss_weights",
                                    group="loss", choices=TRAINER_LOSS_TYPES)
    loss_weights: list[float] | None = _f(None, "one weight per loss_type entry (default all 1)", group="loss")
    beta: float = _f(0.1, "inverse temperature beta (lambda for orpo)", group="loss")
    desirable_weight: float = _f(1.0, "kto: weight lambda_D of the desirable (label true) rows", group="loss")
    undesirable_weight: float = _f(1.0, "kto: weight lambda_U of the undesirable (label false) rows", group="loss")
    label_smoothing: float = _f(0.0, "label smoothing epsilon (conservative DPO / robust)", group="loss")
    phi_star: float | str = _f(0.29, "dispersion scale phi* (official neg_log_dispersion_mean) or 'auto' "
                               "(mean dispersion weight 1 over the training set)", group="loss")
    home_advantage: float = _f(0.0, "margin gamma subtracted from the Mallows margin", group="loss")
    mixing_alpha: float | None = _f(None, "alpha in [0, 1]: mix the reference ratio with gamma", group="loss")
    length_normalization: bool = _f(False, "divide log-probs by the response length", group="loss")
    reference_free: bool = _f(False, "ignore the reference log-ratio (dispersion still uses the reference)",
                              group="loss")
    simpo_gamma: float = _f(0.5, "SimPO target margin", group="loss")
    add_sft_loss: bool = _f(False, "add sft_coef * NLL of the chosen response", group="loss")
    sft_coef: float = _f(0.5, "weight of the SFT term", group="loss")
    rpo_alpha: float | None = _f(None, "RPO: loss <- rpo_alpha * loss + NLL of the chosen response", group="loss")
    precompute_ref_log_probs: bool = _f(True, "reference pass before training (cached on disk), no reference "
                                        "model in memory while training; false: live reference engine",
                                        group="loss")
    ref_cache_dir: str | None = _f(None, "where precomputed reference values are cached "
                                   "(default output_dir/ref_cache)", group="loss")
    ref_offload: bool = _f(False, "live reference: offload its parameters to CPU (ZeRO-3)", group="loss")
    logprob_backend: str = _f("auto", "log-prob/entropy op: auto (triton on CUDA, torch on CPU), triton, torch, "
                              "or reference (naive PyTorch, for comparison)", group="loss", choices=LOGPROB_BACKENDS)
    logits_mode: str = _f("logits", "logits: the model's forward, then the op on its [B, T, V] logits; chunked: the "
                          "backbone, then the output layer applied chunk by chunk (the logits never exist: for "
                          "large vocabularies)", group="loss", choices=LOGITS_MODES)
    logits_chunk_size: int | None = _f(None, "chunked: token rows per chunk (default: about 48 MiB of fp32 logits "
                                       "on CPU, 256 MiB on GPU)", group="loss")

    # --- optimisation ----------------------------------------------------------------------------------
    per_device_train_batch_size: int = _f(8, "pairs per rank per micro-batch", group="optim")
    per_device_eval_batch_size: int = _f(8, "pairs per rank per eval batch", group="optim")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step", group="optim")
    train_batch_size: int | None = _f(None, "global pairs per optimizer step (DeepSpeed name); if set, "
                                      "gradient_accumulation_steps is derived from it", group="optim")
    learning_rate: float = _f(1e-6, "peak learning rate (AdamW)", group="optim")
    weight_decay: float = _f(0.0, "AdamW weight decay", group="optim")
    adam_beta1: float = _f(0.9, "AdamW beta1", group="optim")
    adam_beta2: float = _f(0.999, "AdamW beta2", group="optim")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon", group="optim")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0: off)", group="optim")
    lr_scheduler_type: str = _f("linear", "schedule after warmup", group="optim", choices=LR_SCHEDULERS)
    warmup_ratio: float = _f(0.0, "fraction of the steps spent warming up linearly from 0", group="optim")
    warmup_steps: int = _f(0, "warmup steps (overrides warmup_ratio when > 0)", group="optim")
    num_train_epochs: float = _f(1.0, "passes over the training set (ignored when max_steps > 0)",
                                 group="optim")
    max_steps: int = _f(-1, "optimizer steps to run (-1: from num_train_epochs); at most 2**63 - 1, as are "
                        "warmup_steps and sft_warmup_steps", group="optim")
    sft_warmup_steps: int = _f(0, "optimizer steps of SFT on the chosen responses before preference "
                               "training; the warmed model becomes policy and reference", group="optim")
    sft_learning_rate: float = _f(1e-3, "learning rate of the SFT warm-up", group="optim")
    seed: int = _f(42, "random seed (model init, data order)", group="optim")
    on_nonfinite: str = _f("stop", "a non-finite loss or gradient norm: stop (error naming the step and the rows, "
                           "no update applied, no checkpoint written) or skip (that update is not applied, "
                           "counted as nonfinite_skipped)", group="optim", choices=NONFINITE_ACTIONS)
    max_nonfinite_in_a_row: int = _f(5, "on_nonfinite=skip: stop after this many skipped updates in a row",
                                     group="optim")

    # --- DeepSpeed -------------------------------------------------------------------------------------
    zero_stage: int = _f(3, "ZeRO stage 0-3", group="deepspeed")
    bf16: bool = _f(False, "bfloat16 weights and compute (fp32 master weights)", group="deepspeed")
    offload_optimizer: bool = _f(False, "ZeRO: optimizer states on CPU", group="deepspeed")
    offload_param: bool = _f(False, "ZeRO-3: parameters on CPU", group="deepspeed")
    ddp_timeout: int = _f(1800, "seconds a collective (all-reduce, barrier) may wait for the other ranks "
                          "before the run fails instead of hanging", group="deepspeed")
    deepspeed: str | dict | None = _f(None, "extra DeepSpeed config (JSON file or mapping) merged over the "
                                      "built one; batch sizes must agree", group="deepspeed")

    # --- logging, eval, checkpoints -------------------------------------------------------------------
    output_dir: str = _f("outputs/mallowspo", "checkpoints, logs and the exported model", group="logging")
    logging_steps: int = _f(10, "log metrics every N optimizer steps", group="logging")
    eval_steps: int | None = _f(None, "evaluate every N optimizer steps (none: only at the end)",
                                group="logging")
    save_steps: int = _f(500, "checkpoint every N optimizer steps (0: only at the end)", group="logging")
    save_total_limit: int | None = _f(None, "keep only the newest N checkpoints", group="logging")
    resume_from_checkpoint: str | None = _f(None, "'auto' (newest checkpoint in output_dir, if any) or a "
                                            "checkpoint directory", group="logging")
    report_to: str = _f("all", "all (TensorBoard when installed), tensorboard, or none; JSONL is always "
                        "written", group="logging", choices=REPORT_TO)
    logging_dir: str | None = _f(None, "metrics.jsonl and TensorBoard events (default output_dir/logs)",
                                 group="logging")
    disable_tqdm: bool = _f(False, "no progress bar", group="logging")
    plot_curves: bool = _f(True, "write training_curves.png (needs matplotlib)", group="logging")
    export_model: bool = _f(True, "export the final model in Hugging Face format to output_dir",
                            group="logging")

    # -------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def loss_types(self) -> list[str]:
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    @property
    def is_kto(self) -> bool:
        """Unpaired data (prompt, completion, label) and the KTO loss."""
        return self.loss_types == ["kto"]

    @property
    def uses_mallows(self) -> bool:
        return any(t.startswith("mallows_") for t in self.loss_types)

    @property
    def needs_reference(self) -> bool:
        """Reference log-probs or entropies are read by the loss (not for simpo / orpo alone)."""
        ref_ratio = not self.reference_free and any(t not in ("simpo", "orpo") for t in self.loss_types)
        return ref_ratio or self.uses_mallows

    @property
    def kl_pairing_seed(self) -> int:
        """KTO: the seed of the KL pairing (``data.kl_completions``); part of the reference cache key."""
        return self.seed

    def loss_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the configured loss function: ``kto_loss`` (kto), ``{"loss_type": "orpo",
        "beta": λ}`` (orpo, for ``orpo_loss``), else ``preference_loss`` (all but its tensors)."""
        if self.is_kto:
            return {"beta": self.beta, "desirable_weight": self.desirable_weight,
                    "undesirable_weight": self.undesirable_weight}
        if self.loss_types == ["orpo"]:
            return {"loss_type": "orpo", "beta": self.beta}
        keys = ("loss_type", "loss_weights", "beta", "label_smoothing", "length_normalization", "reference_free",
                "home_advantage", "mixing_alpha", "simpo_gamma", "add_sft_loss", "sft_coef", "rpo_alpha")
        return {k: getattr(self, k) for k in keys}

    def resolved_logging_dir(self) -> str:
        return self.logging_dir or os.path.join(self.output_dir, "logs")

    def resolved_ref_cache_dir(self) -> str:
        return self.ref_cache_dir or os.path.join(self.output_dir, "ref_cache")


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
HINTS: dict[str, Any] = typing.get_type_hints(TrainConfig)


# ----------------------------------------------------------------------------------------------------
# coercion of YAML / command-line values to the field types
def type_name(hint: Any) -> str:
    """Readable type of a field, e.g. ``int | None``."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if typing.get_origin(hint) is list:
        return f"list[{type_name(args[0])}]"
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _parse_text(text: str) -> Any:
    """A command-line value: YAML scalars / flow collections (1e-6, true, null, [a, b], {k: v})."""
    import yaml

    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def _coerce(name: str, value: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        # Try the non-str arms first so that "0.5" becomes a float for `float | str`.
        for arm in sorted((a for a in args if a is not type(None)), key=lambda a: a is str):
            try:
                return _coerce(name, value, arm)
            except (TypeError, ValueError):
                continue
        raise ValueError(f"{name}: expected {type_name(hint)}, found {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(f"{name}: expected a bool (true/false), found {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ValueError(f"{name}: expected an int, found the bool {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ValueError(f"{name}: expected an int, found {value!r}")
    if hint is float:
        if isinstance(value, bool):
            raise ValueError(f"{name}: expected a number, found the bool {value!r}")
        if isinstance(value, (int, float, str)):
            try:
                number = float(value)
            except (ValueError, OverflowError):
                number = None
            if number is not None and math.isfinite(number):
                return number
        raise ValueError(f"{name}: expected a number (finite), found {value!r}")
    if hint is str:
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. output_dir=2024
        raise ValueError(f"{name}: expected a string, found {value!r}")
    if hint is dict or origin is dict:
        if isinstance(value, str):
            value = _parse_text(value)
        if not isinstance(value, Mapping):
            raise ValueError(f"{name}: expected a mapping, found {value!r}")
        return dict(value)
    if origin is list:
        if isinstance(value, str):
            parsed = _parse_text(value)
            if isinstance(parsed, list):
                value = parsed
            elif "," in value:  # loss_type=sigmoid,mallows_theta
                value = [v.strip() for v in value.split(",") if v.strip()]
            else:
                raise ValueError(f"{name}: expected a list, found {value!r}")
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name}: expected a list, found {value!r}")
        return [_coerce(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value)]
    raise TypeError(f"{name}: unsupported field type {hint!r}")


def _suggest(key: str) -> str:
    import difflib

    close = difflib.get_close_matches(key, FIELDS, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def merge_values(values: dict[str, Any], updates: Mapping[str, Any], where: str) -> None:
    """Set ``updates`` into ``values`` (raw, not yet coerced); dotted keys set entries of mapping fields
    (``model_config.hidden_size=64``)."""
    for key, value in updates.items():
        if not isinstance(key, str):
            raise ValueError(f"{where}: config keys must be strings, found {key!r}")
        top, _, rest = key.partition(".")
        if top not in FIELDS:
            raise ValueError(f"{where}: unknown config key {top!r}{_suggest(top)}; "
                             "run `mallowspo-train --help` for the list")
        if rest:
            if type_name(HINTS[top]).split(" | ")[0] != "dict":
                raise ValueError(f"{where}: {top!r} is not a mapping, so {key!r} cannot set an entry of it")
            current = values.get(top)
            if current is None:
                current = {}
            elif not isinstance(current, Mapping):
                raise ValueError(f"{where}: {top!r} is {current!r}, not a mapping; cannot set {key!r}")
            node = dict(current)
            values[top] = node
            parts = rest.split(".")
            for i, p in enumerate(parts[:-1]):
                inner = node.get(p)
                if inner is not None and not isinstance(inner, Mapping):
                    raise ValueError(f"{where}: {'.'.join([top, *parts[:i + 1]])} is {inner!r}, not a mapping; "
                                     f"cannot set {key!r}")
                node[p] = dict(inner or {})
                node = node[p]
            node[parts[-1]] = _parse_text(value) if isinstance(value, str) else value
        else:
            values[top] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` from the command line -> (key, parsed value)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"expected key=value, found {text!r}")
    return key.strip(), _parse_text(value)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML (or JSON) mapping of config keys."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{p}: expected a mapping of config keys at the top level, found {type(data).__name__}")
    return dict(data)


def build_config(values: Mapping[str, Any], where: str = "config", *, world_size: int | None = None) -> TrainConfig:
    """Coerce and validate a raw mapping into a :class:`TrainConfig`.

    Args:
        values: key -> value (strings are read as YAML scalars; dotted keys set entries of mappings).
        where: where the values came from, for error messages.
        world_size: ranks to validate the batch sizes against (None: ``WORLD_SIZE`` or 1).

    Returns:
        The validated config.

    Raises:
        ValueError: an unknown key (with a suggestion), a value of the wrong type or out of range, an
            inconsistent combination or a missing local path, naming the key.

    Examples:
        >>> cfg = build_config({"loss_type": "sigmoid", "beta": 0.1, "model_config": {...}})
    """
    raw: dict[str, Any] = {}
    merge_values(raw, values, where)
    kwargs = {name: _coerce(name, value, HINTS[name]) for name, value in raw.items()}
    cfg = TrainConfig(**kwargs)
    validate(cfg, world_size=world_size)
    return cfg


def load_config(
    path: str | os.PathLike | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    *,
    base: Mapping[str, Any] | None = None,
    world_size: int | None = None,
) -> TrainConfig:
    """A validated config from, in order (later wins): ``base``, the YAML file, the overrides.

    Args:
        path: a YAML (or JSON) config file, or None.
        overrides: ``key=value`` strings (values read as YAML scalars, dotted keys allowed) or a mapping.
        base: defaults under the file (``mallowspo-train --demo`` passes the demo's).
        world_size: ranks to validate the batch sizes against (None: ``WORLD_SIZE`` or 1).

    Returns:
        The validated :class:`TrainConfig`.

    Raises:
        ValueError: an unreadable file, an unknown key (with a "did you mean"), a wrong type, a value out
            of range, an inconsistent combination (e.g. ``offload_param`` without ZeRO-3) or a missing
            local path, naming the key.

    Examples:
        >>> cfg = load_config("run.yaml", ["learning_rate=1e-6", "model_config.hidden_size=128"])
        >>> cfg = load_config(None, {"model_config": {"model_type": "llama"}, "dataset_name": "pairs.jsonl"})
    """
    values: dict[str, Any] = {}
    if base:
        merge_values(values, base, "defaults")
    if path is not None:
        merge_values(values, read_config_file(path), str(path))
    if isinstance(overrides, Mapping):
        merge_values(values, overrides, "overrides")
    else:
        for text in overrides:
            merge_values(values, dict([parse_override(text)]), "command line")
    return build_config(values, world_size=world_size)


def describe_fields() -> list[tuple[str, str, str, str, str]]:
    """(group, name, type, default, help) of every key, for ``--help`` and the docs."""
    rows = []
    for name, f in FIELDS.items():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = f.metadata.get("help", "")
        if f.metadata.get("choices") and name != "loss_type":
            help_ += f" [{'|'.join(f.metadata['choices'])}]"
        elif name == "loss_type":
            help_ += f" [{'|'.join(TRAINER_LOSS_TYPES)}]"
        rows.append((f.metadata.get("group", ""), name, type_name(HINTS[name]), json.dumps(default), help_))
    return rows
