"""Fuzzed values for every field of the trainer config, through the loader the command line uses.

Each example sets one to three fields (taken from ``describe_fields()``, so new fields are fuzzed too)
to values of any type, as a YAML-like mapping or as ``key=value`` command-line text, over a valid base
config. The result is a ValueError/TypeError that names one of the fields set, or a config in which
every field has its declared type, every float is finite and the documented ranges hold.
"""

from __future__ import annotations

import json
import math
import typing
from pathlib import Path
from typing import Any

import pytest
from fuzz_helpers import CLEAR_ERRORS, fuzz_pair, json_junk
from hypothesis import strategies as st

from mallowspo_fast.trainer import cli
from mallowspo_fast.trainer.config import FIELDS, HINTS, describe_fields, load_config

NAMES = [row[1] for row in describe_fields()]
TINY_MODEL = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1}

# What an accepted value must satisfy, beyond its declared type (README, Config reference).
_pos = lambda v: v > 0  # noqa: E731
_nonneg = lambda v: v >= 0  # noqa: E731
_at_least_1 = lambda v: v is None or v >= 1  # noqa: E731
_unit_open = lambda v: 0 <= v < 1  # noqa: E731
_steps = lambda v: 0 <= v < 2**63  # noqa: E731  (step counts fit in int64)
RANGES: dict[str, typing.Callable[[Any], bool]] = {
    "tokenizer_vocab_size": lambda v: v >= 300,
    "eval_ratio": _unit_open, "eval_size": _nonneg,
    "max_train_samples": _at_least_1, "max_eval_samples": _at_least_1, "max_prompt_length": _at_least_1,
    "max_length": lambda v: v is None or v >= 2, "pad_to_multiple_of": _at_least_1, "dataset_num_proc": _at_least_1,
    "beta": _pos, "desirable_weight": _nonneg, "undesirable_weight": _nonneg,
    "label_smoothing": lambda v: 0 <= v <= 1, "phi_star": lambda v: v == "auto" or (not isinstance(v, str) and v > 0),
    "mixing_alpha": lambda v: v is None or 0 <= v <= 1, "logits_chunk_size": _at_least_1,
    "per_device_train_batch_size": _pos, "per_device_eval_batch_size": _pos, "gradient_accumulation_steps": _pos,
    "train_batch_size": _at_least_1, "learning_rate": _pos, "weight_decay": _nonneg, "adam_beta1": _unit_open,
    "adam_beta2": _unit_open, "adam_epsilon": _pos, "max_grad_norm": _nonneg, "warmup_ratio": _unit_open,
    "warmup_steps": _steps, "num_train_epochs": _pos, "max_steps": lambda v: v == -1 or _steps(v) and v >= 1,
    "sft_warmup_steps": _steps, "sft_learning_rate": _pos, "seed": lambda v: 0 <= v < 2**32,
    "zero_stage": lambda v: v in (0, 1, 2, 3), "logging_steps": _pos, "eval_steps": _at_least_1,
    "save_steps": _nonneg, "save_total_limit": _at_least_1,
    "output_dir": lambda v: v.strip() != "", "dataset_name": lambda v: v.strip() != "",
    "dataset_train_split": lambda v: v.strip() != "",
}


@pytest.fixture(scope="session")
def base_config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("fuzz_config")
    pairs = root / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Name a colour:", "chosen": " red", "rejected": " stone"}) + "\n")
    return {"model_config": dict(TINY_MODEL), "train_tokenizer": True, "dataset_name": str(pairs),
            "output_dir": str(root / "out")}


def _is_instance(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return value is None
    if args and origin not in (list, dict):  # a union
        return any(_is_instance(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(_is_instance(v, args[0]) for v in value)
    if hint is float:
        return isinstance(value, float)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or hint)


def _check_accepted(cfg: Any, names: list[str]) -> None:
    for name in NAMES:
        value = getattr(cfg, name)
        assert _is_instance(value, HINTS[name]), (name, value, HINTS[name])
        floats = value if isinstance(value, list) else [value]
        for v in floats:
            assert not isinstance(v, float) or math.isfinite(v), f"{name}={value!r} accepted"
        if name in RANGES and value is not None:
            assert RANGES[name](value), f"{name}={value!r} accepted outside its range"
    for name in names:
        choices = FIELDS[name].metadata.get("choices") if name in FIELDS else None
        value = getattr(cfg, name)
        if choices:
            assert all(v in choices for v in (value if isinstance(value, list) else [value])), (name, value)


numeric_text = st.sampled_from(["1e-3", "-1", "0", "1", "0.5", "nan", "inf", "-inf", "1e400", "1_000", " 7 ", "0x10",
                                "null", "none", "true", "[1, 2]", "{a: 1}", "", "auto", "keep_end", "sigmoid,ipo"])
field_value = (
    json_junk
    | numeric_text
    | st.floats()
    | st.integers(-(2**70), 2**70)
    | st.integers(-3, 5)
    | st.text(max_size=300)
    | st.lists(st.sampled_from(["sigmoid", "mallows_theta", "kto", "orpo", "ipo", 1.0, None]), max_size=3)
)
unknown_key = st.text(min_size=1, max_size=12).filter(lambda k: "=" not in k and "." not in k and k.strip())
assignment = st.tuples(st.sampled_from(NAMES) | unknown_key, field_value)


def _named(name: str, message: str) -> bool:
    """The message names the key (as written, or its repr for unprintable keys)."""
    key = name.strip()
    return key in message or repr(key)[1:-1] in message


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def check_config(base_config, assignments, as_text):
    values = dict(assignments)
    names = list(values)
    try:
        if as_text:
            cfg = load_config(None, [f"{k}={_as_text(v)}" for k, v in values.items()], base=base_config,
                              world_size=1)
        else:
            cfg = load_config(None, values, base=base_config, world_size=1)
    except CLEAR_ERRORS as err:
        message = str(err)
        assert any(_named(n, message) for n in names), (names, message)
        return
    _check_accepted(cfg, names)


test_config_values, test_config_values_slow = fuzz_pair(
    scale=5,
    assignments=st.lists(assignment, min_size=1, max_size=3, unique_by=lambda a: a[0]), as_text=st.booleans()
)(check_config)


def check_cli(base_config, tmp_path_factory, assignments):
    """The command line: exit status 2 and a message naming the field, or a printed config."""
    root = tmp_path_factory.getbasetemp()
    yaml_file = Path(root) / "fuzz_base.yaml"
    yaml_file.write_text(json.dumps(base_config))
    argv = [str(yaml_file), "--print_config", *(f"{k}={_as_text(v)}" for k, v in assignments)]
    try:
        status = cli.main(argv)
    except CLEAR_ERRORS as err:  # only the argument parser's own refusals may escape as exceptions
        assert any(_named(k, str(err)) for k, _ in assignments), err
        return
    assert status in (0, 2)


test_cli_values, test_cli_values_slow = fuzz_pair(
    assignments=st.lists(assignment, min_size=1, max_size=2, unique_by=lambda a: a[0])
)(check_cli)
