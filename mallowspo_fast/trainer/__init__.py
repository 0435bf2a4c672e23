"""The lean DeepSpeed trainer: config, engine setup, loop, checkpoints, logging, CLI.

    from mallowspo_fast.trainer import load_config, train
    cfg = load_config("run.yaml", ["learning_rate=1e-6"])   # validated before anything loads
    result = train(cfg)                                     # TrainResult (paths, final metrics)

``train`` is imported lazily: building a config needs neither DeepSpeed nor transformers' models.
"""

from typing import Any

from .config import TrainConfig, build_config, load_config

__all__ = ["TrainConfig", "build_config", "load_config", "train", "TrainResult"]


def __getattr__(name: str) -> Any:
    if name in ("train", "TrainResult"):
        from . import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
