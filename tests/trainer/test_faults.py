"""Atomic checkpoints: a process SIGKILLed at each boundary of a save leaves the previous checkpoint usable
and ``resume_from_checkpoint: auto`` continues exactly; a checkpoint missing a file is detected before
DeepSpeed reads it, named, and the previous complete one is used.

Every run saves at each step with ``save_total_limit: 1`` (the strictest pruning); the killed runs die in the
save of step 2, so checkpoint-1 is the previous one. The runs are forked from one worker process
(``kill_worker.py``) so that they share the imports.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from trainer_helpers import tiny_overrides, train_losses

from mallowspo_fast.trainer import checkpoint, load_config, train
from mallowspo_fast.trainer.faults import SAVE_POINTS

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
COMMON = dict(max_steps=3, save_steps=1, save_total_limit=1, lr_scheduler_type="linear", warmup_steps=1,
              loss_type="mallows_theta", phi_star="auto")
KILL_STEP = 2
VISIBLE_AFTER = {"save:renamed", "save:latest_written"}  # the new checkpoint is complete and renamed


def _overrides(pairs_file: Path, tokenizer_dir: Path, out: Path, cache: Path, **extra) -> dict:
    return tiny_overrides(pairs_file, tokenizer_dir, out, ref_cache_dir=str(cache), **{**COMMON, **extra})


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One reference cache for every run of the module (same model, data and settings): one reference pass."""
    return tmp_path_factory.mktemp("ref_cache")


@pytest.fixture(scope="module")
def uninterrupted(pairs_file: Path, tokenizer_dir: Path, cache: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    train(load_config(None, _overrides(pairs_file, tokenizer_dir, out, cache)))
    return out


@pytest.fixture(scope="module")
def killed(pairs_file: Path, tokenizer_dir: Path, cache: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> dict[str, dict]:
    """One run per save boundary, each SIGKILLed there during the save of step 2."""
    root = tmp_path_factory.mktemp("killed")
    runs = [{"fault": f"{point}@{KILL_STEP}",
             "config": _overrides(pairs_file, tokenizer_dir, root / point.replace(":", "_"), cache)}
            for point in SAVE_POINTS]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "MALLOWSPO_FAST_FAULT")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(HERE / "kill_worker.py"), json.dumps(runs, default=str)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    out = {point: {**res, "out": Path(run["config"]["output_dir"])}
           for point, run, res in zip(SAVE_POINTS, runs, results)}
    # an untouched copy with two complete checkpoints, for the damaged-checkpoint tests
    shutil.copytree(out["save:latest_written"]["out"], root / "two_checkpoints")
    out["two_checkpoints"] = {"out": root / "two_checkpoints"}
    print("killed runs (seconds each):", {p: round(r["seconds"], 1) for p, r in out.items() if "seconds" in r})
    return out


@pytest.mark.parametrize("point", SAVE_POINTS)
def test_kill_during_a_save_keeps_the_previous_checkpoint_and_resumes_exactly(
        point: str, killed: dict, uninterrupted: Path, pairs_file: Path, tokenizer_dir: Path, cache: Path) -> None:
    run = killed[point]
    out = run["out"]
    assert run["ended"] == ["signal", signal.SIGKILL], run  # it really died there, mid-save
    visible = [p.name for p in checkpoint.list_checkpoints(out)]
    new_visible = point in VISIBLE_AFTER
    assert visible == (["checkpoint-1", "checkpoint-2"] if new_visible else ["checkpoint-1"])  # nothing pruned yet
    assert checkpoint.verify(out / "checkpoint-1") == []
    assert (out / "latest").read_text() == ("checkpoint-2" if point == "save:latest_written" else "checkpoint-1")
    assert (out / ".tmp-checkpoint-2").is_dir() != new_visible  # the partial save stays under its temporary name
    expected = out / ("checkpoint-2" if new_visible else "checkpoint-1")
    assert checkpoint.resolve_resume("auto", str(out)) == expected

    result = train(load_config(None, _overrides(pairs_file, tokenizer_dir, out, cache, resume_from_checkpoint="auto")))
    assert result.step == 3
    want, got = train_losses(uninterrupted), train_losses(out)
    assert sorted(got) == [1, 2, 3]  # the killed run's records up to its checkpoint, then the resumed ones
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), (point, step)
    assert want[3] != pytest.approx(want[2], abs=1e-4)  # the steps differ: equality is informative
    # the limit of 1 holds again and the temporary directory of the killed save is gone
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-3"]
    assert not [p for p in out.iterdir() if p.name.startswith(checkpoint.TMP_PREFIX)]
    assert (out / "latest").read_text() == "checkpoint-3" and checkpoint.verify(out / "checkpoint-3") == []


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_damaged_checkpoint_is_named_and_the_previous_one_is_used(
        damage: str, killed: dict, uninterrupted: Path, pairs_file: Path, tokenizer_dir: Path, cache: Path,
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "run"
    shutil.copytree(killed["two_checkpoints"]["out"], out)  # checkpoint-1 and a complete checkpoint-2
    (optim,) = (out / "checkpoint-2").glob("*optim_states.pt")
    if damage == "missing":
        optim.unlink()
        problem = f"missing {optim.name}"
    else:
        size = optim.stat().st_size
        os.truncate(optim, size // 2)
        problem = f"{optim.name} has {size // 2} bytes, expected {size}"
    with pytest.raises(ValueError, match=f"is not a complete checkpoint: {problem}"):
        train(load_config(None, _overrides(pairs_file, tokenizer_dir, out, cache,
                                           resume_from_checkpoint=str(out / "checkpoint-2"))))
    with caplog.at_level(logging.WARNING, logger="mallowspo_fast.trainer"):
        train(load_config(None, _overrides(pairs_file, tokenizer_dir, out, cache, resume_from_checkpoint="auto")))
    messages = [r.getMessage() for r in caplog.records]
    assert any("checkpoint-2" in m and problem in m and "not used" in m for m in messages), messages
    assert any("resuming from" in m and m.split("resuming from ")[1].startswith(str(out / "checkpoint-1"))
               for m in messages), messages
    want, got = train_losses(uninterrupted), train_losses(out)
    assert sorted(got) == [1, 2, 3]
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step


def test_checkpoint_without_manifest_is_incomplete(tmp_path: Path) -> None:
    (tmp_path / "checkpoint-5").mkdir()
    assert checkpoint.verify(tmp_path / "checkpoint-5") == ["no manifest.json (the save did not finish)"]
    assert checkpoint.resolve_resume("auto", str(tmp_path)) is None
    with pytest.raises(ValueError, match="no manifest.json"):
        checkpoint.resolve_resume(str(tmp_path / "checkpoint-5"), str(tmp_path))


def test_pruning_keeps_the_newest_verified_checkpoints(tmp_path: Path) -> None:
    """save_total_limit counts only checkpoints that pass verification: a damaged one never displaces the
    last good one; temporary directories of killed saves go; a newer checkpoint is not touched."""
    for step in (1, 2, 3, 4, 6):
        ckpt = tmp_path / f"checkpoint-{step}"
        ckpt.mkdir()
        (ckpt / "weights.pt").write_bytes(bytes([step]) * 100)
        (ckpt / checkpoint.MANIFEST).write_text(json.dumps(checkpoint.build_manifest(ckpt)))
    (tmp_path / "checkpoint-3" / "weights.pt").write_bytes(b"\0" * 100)  # same size, other bytes
    (tmp_path / ".tmp-checkpoint-5").mkdir()
    assert checkpoint.verify(tmp_path / "checkpoint-3") == ["weights.pt does not match its sha256 checksum"]
    checkpoint.prune(tmp_path, keep=2, newest=tmp_path / "checkpoint-4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
