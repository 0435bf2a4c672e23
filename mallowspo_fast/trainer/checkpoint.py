"""Checkpoints: DeepSpeed ``save_checkpoint`` plus the trainer state needed to continue exactly, written
atomically and verified before they are loaded.

Layout (the DeepSpeed layout, so ``zero_to_fp32.py`` works on it)::

    output_dir/latest                        tag of the newest complete checkpoint
    output_dir/zero_to_fp32.py               DeepSpeed's consolidation script
    output_dir/checkpoint-<step>/            model, optimizer and scheduler states of every rank
        rng_state_<rank>.pt                  python / numpy / torch (/ cuda) RNG state of each rank
        trainer_state.json                   step, epoch, consumed samples, config (readable)
        manifest.json                        every other file with its size (and sha256): written last

A save writes everything into ``output_dir/.tmp-checkpoint-<step>``, flushes each file to disk, writes the
manifest, and only then renames the directory to ``checkpoint-<step>`` and replaces ``latest``; older
checkpoints are pruned after that. A process killed at any point of a save therefore leaves the previous
checkpoints untouched, and at worst a temporary directory that resume ignores and the next save removes.

Before DeepSpeed reads a checkpoint, :func:`verify` checks it against its manifest (present files, sizes,
checksums of the files up to ``HASH_LIMIT`` bytes); ``resume_from_checkpoint: auto`` skips, with a warning
naming what is wrong, every checkpoint that fails and resumes from the newest one that passes.

The ``client_state`` stored by DeepSpeed holds the step, the data order position (epoch and step in epoch;
for a streamed split, epoch and rows read in the epoch), consumed samples, tokens seen and the resolved phi_star.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.tokenization import sha256_file
from .faults import FAULT_ENV, fault_point
from .launch import DistState, barrier

logger = logging.getLogger("mallowspo_fast.trainer")
_CKPT = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-"
MANIFEST = "manifest.json"
STATE_FILE = "trainer_state.json"
HASH_LIMIT = 64 * 2**20  # files up to this size get a sha256 in the manifest; larger ones their size only


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
    """checkpoint-N directories of ``output_dir``, oldest first (temporary directories excluded)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CKPT.match(p.name))]
    return [p for _, p in sorted(found)]


# ----------------------------------------------------------------------------------------------------
# files on disk
def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync_file(path)
    except OSError:  # some file systems cannot fsync a directory; the rename is still atomic
        pass


def _write_durably(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary name, flushed to disk before the rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def build_manifest(directory: Path) -> dict[str, Any]:
    """Size of every file of ``directory`` (relative paths) and the sha256 of those up to HASH_LIMIT bytes."""
    files = {}
    for p in _files(directory):
        if p.name == MANIFEST:
            continue
        size = p.stat().st_size
        files[p.relative_to(directory).as_posix()] = {"size": size, **({"sha256": sha256_file(p)}
                                                                        if size <= HASH_LIMIT else {})}
    return {"version": 1, "hash_limit": HASH_LIMIT, "files": files}


def verify(path: Path) -> list[str]:
    """What is wrong with the checkpoint at ``path`` (empty when it is complete): missing or unreadable
    manifest, missing files, wrong sizes, wrong checksums. A checkpoint written before manifests existed
    (``trainer_state.json`` and no manifest) passes with a warning."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        if (path / STATE_FILE).is_file():
            logger.warning("%s has no %s (written by an older version): its completeness is not verified",
                           path, MANIFEST)
            return []
        return [f"no {MANIFEST} (the save did not finish)"]
    try:
        files = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"unreadable {MANIFEST} ({e})"]
    problems = []
    for name, entry in files.items():
        p = path / name
        if not p.is_file():
            problems.append(f"missing {name}")
            continue
        size = p.stat().st_size
        if size != entry["size"]:
            problems.append(f"{name} has {size} bytes, expected {entry['size']}")
        elif "sha256" in entry and sha256_file(p) != entry["sha256"]:
            problems.append(f"{name} does not match its sha256 checksum")
    return problems


# ----------------------------------------------------------------------------------------------------
# resume
def resolve_resume(resume: str | None, output_dir: str) -> Path | None:
    """The checkpoint to resume from: None, 'auto' (newest complete one in output_dir) or a path.

    'auto' verifies the checkpoints newest first and skips, with a warning naming the problems, those that
    fail; a path that fails raises ValueError naming them."""
    if resume is None:
        return None
    if resume == "auto":
        skipped = []
        for path in reversed(list_checkpoints(output_dir)):
            problems = verify(path)
            if not problems:
                if skipped:
                    logger.warning("resuming from %s, the newest complete checkpoint (skipped: %s)", path,
                                   "; ".join(skipped))
                return path
            skipped.append(f"{path.name}: {', '.join(problems)}")
            logger.warning("checkpoint %s is incomplete or damaged, not used: %s", path, ", ".join(problems))
        if skipped:
            logger.warning("no complete checkpoint in %s (%s): starting from step 0", output_dir,
                           "; ".join(skipped))
        return None
    path = Path(resume)
    problems = verify(path)
    if not (path / STATE_FILE).is_file() and not problems:
        problems = [f"no {STATE_FILE}"]
    if problems:
        raise ValueError(f"resume_from_checkpoint={resume!r} is not a complete checkpoint: {', '.join(problems)} "
                         "(resume_from_checkpoint=auto falls back to the newest complete one)")
    return path


# ----------------------------------------------------------------------------------------------------
# save
class _FaultOnFirstFile:
    """Test hook (``save:engine_file``): wraps DeepSpeed's checkpoint engine to stop after its first file."""

    def __init__(self, inner: Any, step: int, rank: int) -> None:
        self.inner, self.step, self.rank = inner, step, rank

    def save(self, *args: Any, **kwargs: Any) -> Any:
        out = self.inner.save(*args, **kwargs)
        fault_point("save:engine_file", self.step, self.rank)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _engine_save(engine: Any, root: Path, tag: str, client_state: dict[str, Any], step: int, rank: int) -> None:
    if not os.environ.get(FAULT_ENV, "").startswith("save:engine_file@"):
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
        return
    inner = engine.checkpoint_engine
    engine.checkpoint_engine = _FaultOnFirstFile(inner, step, rank)
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    finally:
        engine.checkpoint_engine = inner


def save(engine: Any, output_dir: str, step: int, client_state: dict[str, Any], state: DistState,
         config: dict[str, Any], save_total_limit: int | None) -> Path:
    """Save on every rank (ZeRO shards) into a temporary directory, then make it visible atomically."""
    root = Path(output_dir)
    tag = f"checkpoint-{step}"
    final, tmp = root / tag, root / f"{TMP_PREFIX}{tag}"
    if state.is_main and tmp.exists():
        shutil.rmtree(tmp)  # left by a save that was killed
    barrier(state)
    _engine_save(engine, root, tmp.name, client_state, step, state.rank)
    fault_point("save:engine_saved", step, state.rank)
    torch.save(_rng_state(), tmp / f"rng_state_{state.rank}.pt")
    for p in _files(tmp):  # every rank flushes what it wrote (and, harmlessly, the others' files)
        _fsync_file(p)
    fault_point("save:rng_saved", step, state.rank)
    barrier(state)
    if state.is_main:
        summary = {k: v for k, v in client_state.items() if k != "order"}
        _write_durably(tmp / STATE_FILE, json.dumps({**summary, "config": config}, indent=2, default=str))
        fault_point("save:state_written", step, state.rank)
        _write_durably(tmp / MANIFEST, json.dumps(build_manifest(tmp), indent=1))
        _fsync_dir(tmp)
        fault_point("save:manifest_written", step, state.rank)
        _publish(root, tmp, final)
        fault_point("save:renamed", step, state.rank)
        _write_durably(root / "latest", tag)
        _fsync_dir(root)
        fault_point("save:latest_written", step, state.rank)
        prune(root, keep=save_total_limit, newest=final)
    barrier(state)
    return final


def _publish(root: Path, tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; a previous ``final`` (the same step saved again after resuming from an
    earlier checkpoint) is moved aside first and deleted once the new one is in place."""
    old = None
    if final.exists():
        old = root / f"{TMP_PREFIX}old-{final.name}"
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prune(root: Path, keep: int | None, newest: Path) -> None:
    """Delete temporary directories of killed saves and, with ``keep``, the checkpoints older than ``newest``
    except the newest ``keep - 1`` of them that pass :func:`verify`. ``newest`` (just written) is never
    deleted and this runs only after it is complete, so a save that did not finish never costs the last
    good one."""
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(TMP_PREFIX):
            shutil.rmtree(p, ignore_errors=True)
    if keep is None:
        return
    every = list_checkpoints(root)
    checkpoints = every[:every.index(newest)] if newest in every else []  # newer ones are left alone
    complete = [p for p in checkpoints if not verify(p)]
    kept = set(complete[-(keep - 1):]) if keep > 1 else set()
    for p in checkpoints:
        if p not in kept:
            shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# load
def check_compatible(path: Path, logits_mode: str) -> None:
    """Refuse, before DeepSpeed reads any tensor, a checkpoint whose module layout differs from this run's:
    ``logits_mode: chunked`` wraps the model (parameter names gain a ``model.`` prefix)."""
    saved = json.loads((path / STATE_FILE).read_text()).get("config", {})
    mode = saved.get("logits_mode", "logits")
    if mode != logits_mode:
        raise ValueError(
            f"{path} was saved with logits_mode={mode} and this run has logits_mode={logits_mode}: the "
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
