"""``mallowspo-train CONFIG.yaml [key=value ...]`` (also ``python -m mallowspo_fast.train``).

Accepted forms, later ones win: the config file, ``key=value``, ``--key value`` / ``--key=value``
(``--flag`` alone sets a bool to true), OpenRLHF-style flag names (``--micro_train_batch_size``,
``--max_len``, ``--save_path``, ``--load_checkpoint`` ...). ``--demo`` starts from the embedded default.
``--local_rank`` (added by the deepspeed launcher) is accepted and ignored. ``--print_config`` prints
the validated config and the DeepSpeed config, and exits without loading anything.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import textwrap
import warnings
from collections.abc import Sequence

from .config import FIELDS, HINTS, describe_fields, load_config, type_name

# OpenRLHF flag -> our key (value None: a flag that sets a fixed value)
OPENRLHF_FLAGS = {
    "pretrain": "model_name_or_path",
    "ref_pretrain": "ref_model_name_or_path",
    "dataset": "dataset_name",
    "save_path": "output_dir",
    "micro_train_batch_size": "per_device_train_batch_size",
    "micro_eval_batch_size": "per_device_eval_batch_size",
    "max_len": "max_length",
    "prompt_max_len": "max_prompt_length",
    "max_epochs": "num_train_epochs",
    "adam_offload": "offload_optimizer",
    "l2": "weight_decay",
    "lr_warmup_ratio": "warmup_ratio",
    "max_norm": "max_grad_norm",
    "lr_scheduler": "lr_scheduler_type",
    "load_checkpoint": "resume_from_checkpoint",
}
_FLAG_VALUES = {"load_checkpoint": "auto"}
_USAGE = """usage: mallowspo-train [CONFIG.yaml] [key=value ...] [--key value ...] [--demo] [--print_config]

Fine-tune a causal LM with MallowsPO or the DPO family on preference data (DeepSpeed ZeRO 0-3).
  mallowspo-train --demo                          the embedded default (tiny model, bundled data)
  mallowspo-train run.yaml learning_rate=1e-6     a YAML config plus overrides
  deepspeed --num_gpus 8 --module mallowspo_fast.train run.yaml    several ranks
Dotted keys set entries of mappings: model_config.hidden_size=128.
"""


def help_text() -> str:
    lines = [_USAGE, "config keys (type, default):"]
    group = None
    for grp, name, typ, default, help_ in describe_fields():
        if grp != group:
            lines.append(f"\n [{grp}]")
            group = grp
        lines.append(f"  {name} ({typ}, default {default})")
        lines.extend(textwrap.wrap(help_, width=100, initial_indent="      ", subsequent_indent="      "))
    lines.append("\nOpenRLHF-style flags: " + ", ".join(f"--{k} -> {v}" for k, v in OPENRLHF_FLAGS.items()))
    return "\n".join(lines)


class _Args:
    def __init__(self) -> None:
        self.config: str | None = None
        self.overrides: list[tuple[str, object]] = []
        self.demo = self.help = self.print_config = False


def _is_bool_key(key: str) -> bool:
    return key in FIELDS and type_name(HINTS[key]) == "bool"


def parse_args(argv: Sequence[str]) -> _Args:
    args, tokens, i = _Args(), list(argv), 0
    while i < len(tokens):
        tok = tokens[i]
        i += 1
        if tok in ("-h", "--help"):
            args.help = True
        elif tok == "--demo":
            args.demo = True
        elif tok in ("--print_config", "--print-config"):
            args.print_config = True
        elif tok.startswith("--"):
            name, eq, value = tok[2:].partition("=")
            name = name.replace("-", "_")
            if name == "local_rank":
                if not eq and i < len(tokens):
                    value, i = tokens[i], i + 1
                os.environ.setdefault("LOCAL_RANK", value)
                continue
            key = OPENRLHF_FLAGS.get(name, name)
            flag_like = _is_bool_key(key) or name in _FLAG_VALUES
            if not eq:
                if flag_like and (i >= len(tokens) or tokens[i].startswith("-") or "=" in tokens[i]):
                    value = _FLAG_VALUES.get(name, "true")
                elif i < len(tokens):
                    value, i = tokens[i], i + 1
                else:
                    raise ValueError(f"--{name} needs a value")
            args.overrides.append((key, value))
        elif "=" in tok:
            key, _, value = tok.partition("=")
            args.overrides.append((key.strip(), value))
        elif args.config is None:
            args.config = tok
        else:
            raise ValueError(f"unexpected argument {tok!r}: give one config file, then key=value overrides")
    return args


def _quiet_libraries(is_main: bool) -> None:
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "datasets", "transformers", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed.*")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.distributed.*")
    try:
        import datasets
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    except ImportError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mallowspo-train`` and ``python -m mallowspo_fast.train``.

    Arguments: a config file, then ``key=value`` overrides and ``--key value`` flags (OpenRLHF names
    accepted), ``--demo`` (start from the embedded default), ``--print_config``, ``--help``.

    Args:
        argv: the arguments (None: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success (also after a clean stop on SIGTERM / SIGINT, with a checkpoint),
        2 for a config error (the message names the key), 1 for a data or training error.

    Examples:
        >>> main(["--demo", "max_steps=20", "output_dir=/tmp/demo"])
        0
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(argv)
        if args.help:
            print(help_text())
            return 0
        base = None
        if args.demo:
            from .demo import demo_defaults

            base = demo_defaults()
        if args.config is None and not args.demo:
            print(_USAGE, file=sys.stderr)
            print("mallowspo-train: error: give a config file (or --demo)", file=sys.stderr)
            return 2
        overrides = {}
        for key, value in args.overrides:
            overrides[key] = value
        cfg = load_config(args.config, {k: _raw(v) for k, v in overrides.items()}, base=base)
    except ValueError as e:
        print(f"mallowspo-train: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        from .ds_config import build_train_ds_config
        from .launch import prepare_environment

        prepare_environment()
        world = int(os.environ.get("WORLD_SIZE", "1"))
        import torch

        print(json.dumps({"config": cfg.to_dict(), "deepspeed": build_train_ds_config(
            cfg, world, on_cpu=not torch.cuda.is_available())}, indent=2, default=str))
        return 0
    rank = int(os.environ.get("RANK", "0"))
    _quiet_libraries(rank == 0)
    from .demo import format_summary
    from .faults import NonFiniteError
    from .loop import train

    try:
        result = train(cfg)
    except (ValueError, NonFiniteError) as e:
        if os.environ.get("MALLOWSPO_FAST_DEBUG") == "1":
            raise
        print(f"mallowspo-train: error: {e}\n(set MALLOWSPO_FAST_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    if rank == 0:
        print(format_summary(result, cfg), flush=True)
    return 0


def _raw(value: object) -> object:
    """Command-line strings are parsed as YAML scalars by the config loader."""
    if isinstance(value, str):
        from .config import _parse_text

        return _parse_text(value)
    return value
