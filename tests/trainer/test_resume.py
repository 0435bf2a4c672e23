"""Exact resume: from a checkpoint path, and 'auto' after a SIGTERM that saved and stopped the run."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from trainer_helpers import read_metrics, tiny_overrides, train_losses

from mallowspo_fast.trainer import load_config, train

# Warmup + linear decay: the resumed run must also restore the scheduler and the optimizer moments.
COMMON = dict(max_steps=6, save_steps=3, lr_scheduler_type="linear", warmup_steps=2, loss_type="mallows_theta",
              phi_star="auto")


@pytest.fixture(scope="module")
def uninterrupted(pairs_file: Path, tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    result = train(load_config(None, tiny_overrides(pairs_file, tokenizer_dir, out, **COMMON)))
    assert result.step == 6 and result.stopped_by is None
    return out


def test_resume_from_a_checkpoint_reproduces_the_next_steps(uninterrupted: Path, pairs_file: Path,
                                                            tokenizer_dir: Path, tmp_path: Path) -> None:
    ckpt = uninterrupted / "checkpoint-3"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["step_in_epoch"], state["consumed_samples"]) == (3, 0, 3, 12)
    resumed = tmp_path / "resumed"
    train(load_config(None, tiny_overrides(pairs_file, tokenizer_dir, resumed, resume_from_checkpoint=str(ckpt),
                                           **COMMON)))
    want, got = train_losses(uninterrupted), train_losses(resumed)
    assert sorted(got) == [4, 5, 6]
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step
    assert want[4] != pytest.approx(want[3], abs=1e-4)  # the steps differ: equality is informative


def test_sigterm_saves_and_auto_resume_continues_exactly(uninterrupted: Path, pairs_file: Path, tokenizer_dir: Path,
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mallowspo_fast.trainer import loop

    calls = []
    real = loop.peak_memory_mb

    def signal_at_step_2(device):  # called once per logging step (logging_steps=1)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(device)

    monkeypatch.setattr(loop, "peak_memory_mb", signal_at_step_2)
    out = tmp_path / "run"
    cfg = tiny_overrides(pairs_file, tokenizer_dir, out, export_model=True, **COMMON)
    first = train(load_config(None, cfg))
    assert first.stopped_by == "SIGTERM" and first.step == 2
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    assert first.model_dir is None and not (out / "config.json").exists()  # no export after a stop
    assert signal.getsignal(signal.SIGTERM) is not None  # handler restored (not left pointing at the run)

    monkeypatch.setattr(loop, "peak_memory_mb", real)
    second = train(load_config(None, dict(cfg, resume_from_checkpoint="auto")))
    assert second.step == 6 and second.stopped_by is None
    want, got = train_losses(uninterrupted), train_losses(out)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]  # the log continues in place, each step once
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_auto_resume_without_checkpoint_starts_fresh(pairs_file: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    result = train(load_config(None, tiny_overrides(pairs_file, tokenizer_dir, tmp_path / "fresh", max_steps=1,
                                                    resume_from_checkpoint="auto")))
    assert result.step == 1


def test_resume_with_another_global_batch_is_refused(uninterrupted: Path, pairs_file: Path, tokenizer_dir: Path,
                                                     tmp_path: Path) -> None:
    cfg = tiny_overrides(pairs_file, tokenizer_dir, tmp_path / "other", **dict(COMMON, per_device_train_batch_size=2),
                         resume_from_checkpoint=str(uninterrupted / "checkpoint-3"))
    with pytest.raises(ValueError, match="saved with a global batch of 4 over 16 pairs; this run has 2 over 16"):
        train(load_config(None, cfg))
