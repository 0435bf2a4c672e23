"""Checkpoints: DeepSpeed ``save_checkpoint`` plus the trainer state needed to continue exactly.

Layout (the DeepSpeed layout, so ``zero_to_fp32.py`` works on it)::

    output_dir/latest                        tag of the newest checkpoint (written by DeepSpeed)
    output_dir/zero_to_fp32.py               DeepSpeed's consolidation script
    output_dir/checkpoint-<step>/            model, optimizer and scheduler states of every rank
        rng_state_<rank>.pt                  python / numpy / torch (/ cuda) RNG state of each rank
        trainer_state.json                   step, epoch, consumed samples, config (readable)

The ``client_state`` stored by DeepSpeed holds the step, the data order position (epoch and step in epoch;
for a streamed split, epoch and rows read in the epoch), consumed samples, tokens seen and the resolved phi_star.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .launch import DistState, barrier

logger = logging.getLogger("mallowspo_fast.trainer")
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """checkpoint-N directories of ``output_dir``, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CKPT.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str | None, output_dir: str) -> Path | None:
    """The checkpoint to resume from: None, 'auto' (newest complete one in output_dir) or a path."""
    if resume is None:
        return None
    if resume == "auto":
        complete = [p for p in list_checkpoints(output_dir) if (p / "trainer_state.json").is_file()]
        return complete[-1] if complete else None
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise ValueError(f"resume_from_checkpoint={resume!r} is not a complete checkpoint directory "
                         "(no trainer_state.json)")
    return path


def save(engine: Any, output_dir: str, step: int, client_state: dict[str, Any], state: DistState,
         config: dict[str, Any], save_total_limit: int | None) -> Path:
    """Save on every rank (ZeRO shards), then the readable state; rotate old checkpoints."""
    tag = f"checkpoint-{step}"
    path = Path(output_dir) / tag
    engine.save_checkpoint(output_dir, tag=tag, client_state=client_state)
    torch.save(_rng_state(), path / f"rng_state_{state.rank}.pt")
    barrier(state)
    if state.is_main:
        # Written last: a checkpoint without it is incomplete and skipped by resume 'auto'.
        summary = {k: v for k, v in client_state.items() if k != "order"}
        (path / "trainer_state.json").write_text(json.dumps({**summary, "config": config}, indent=2, default=str))
        if save_total_limit is not None:
            for old in list_checkpoints(output_dir)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    barrier(state)
    return path


def check_compatible(path: Path, cfg: Any) -> None:
    """Refuse, before DeepSpeed reads any tensor, a checkpoint whose module layout differs from this run's:
    ``logits_mode: chunked`` wraps the model (parameter names gain a ``model.`` prefix)."""
    saved = json.loads((path / "trainer_state.json").read_text()).get("config", {})
    mode = saved.get("logits_mode", "logits")
    if mode != cfg.logits_mode:
        raise ValueError(
            f"{path} was saved with logits_mode={mode} and this run has logits_mode={cfg.logits_mode}: the "
            "engine's module layout differs. Resume with the same mode (the exported Hugging Face model loads "
            "in either)")


def load(engine: Any, path: Path, state: DistState) -> dict[str, Any]:
    """Restore the engine (model, optimizer, scheduler) and this rank's RNG; return the client state."""
    load_path, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
    if load_path is None:
        raise ValueError(f"DeepSpeed could not load the checkpoint at {path}")
    rng = path / f"rng_state_{state.rank}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    else:
        logger.warning("no RNG state for rank %d in %s (saved with another world size?)", state.rank, path)
    return client_state


class StopSignal:
    """SIGTERM / SIGINT set a flag that the loop reads between optimizer steps; a second SIGINT raises."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave the handlers alone
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
