"""A rank that dies or hangs in a two-rank ZeRO-3 run: the whole job exits non-zero in bounded time (the
``deepspeed`` launcher stops the other ranks when one exits with an error; a hung rank trips the collective
timeout ``ddp_timeout``), and resuming from the last checkpoint reproduces an uninterrupted run step by step.

The fault points are in ``mallowspo_fast.trainer.faults``: a rank prints the time, then SIGKILLs (or
SIGSTOPs) itself between a forward and its backward. The timeouts of ``subprocess.run`` are hang guards.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from trainer_helpers import read_metrics, tiny_overrides

from mallowspo_fast.trainer import checkpoint, load_config, train

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = Path(sys.executable).parent / "deepspeed"
SETTINGS = dict(max_steps=4, save_steps=2, zero_stage=3, lr_scheduler_type="linear", warmup_steps=1)
# compared step by step: every logged metric but the timing / memory ones
SKIPPED_KEYS = {"tokens_per_second", "peak_memory_mb", "epoch", "step"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(cfg: dict, tmp_path: Path, fault: dict[str, str], timeout: int) -> tuple[subprocess.CompletedProcess,
                                                                                     float]:
    """Two CPU ranks through the deepspeed launcher; returns the process and the wall time at exit."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "MALLOWSPO_FAST_FAULT",
                                                            "MALLOWSPO_FAST_FAULT_SIGNAL")}
    env.update(fault, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run_yaml = tmp_path / f"run_{len(list(tmp_path.glob('run_*.yaml')))}.yaml"
    run_yaml.write_text(json.dumps(cfg))  # JSON is YAML
    proc = subprocess.run([str(LAUNCHER), "--num_gpus", "2", "--master_port", str(_free_port()), "--module",
                           "mallowspo_fast.train", str(run_yaml)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return proc, time.time()


def _fault_time(output: str) -> float:
    found = re.findall(r"MALLOWSPO_FAST_FAULT: SIG\w+ at \S+ on rank 1, time ([0-9.]+)", output)
    assert len(found) == 1, output[-3000:]
    return float(found[0])


def _metrics_by_step(out: Path) -> dict[int, dict[str, float]]:
    return {r["step"]: {k: v for k, v in r.items() if k not in SKIPPED_KEYS}
            for r in read_metrics(out) if "loss" in r}


@pytest.mark.distributed
def test_killed_rank_fails_the_job_promptly_and_resume_matches_an_uninterrupted_run(
        pairs_file: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "two_ranks"
    cfg = tiny_overrides(pairs_file, tokenizer_dir, out, per_device_train_batch_size=2, ddp_timeout=60, **SETTINGS)
    proc, ended = _launch(cfg, tmp_path, {"MALLOWSPO_FAST_FAULT": "step:forward@3:1"}, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    exit_seconds = ended - _fault_time(output)
    print(f"killed rank: the job exited {exit_seconds:.1f} s after the SIGKILL (return code {proc.returncode})")
    assert exit_seconds < 60, output[-3000:]  # generous: the launcher reacts in about a second when idle
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-2"]
    assert checkpoint.verify(out / "checkpoint-2") == []
    assert sorted(_metrics_by_step(out)) == [1, 2]

    proc, _ = _launch(dict(cfg, resume_from_checkpoint="auto"), tmp_path, {}, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr or (out / "checkpoint-4").is_dir()

    # the uninterrupted reference: one rank with the same global batch (4), equal to two ranks step by step
    one = tmp_path / "one_rank"
    train(load_config(None, tiny_overrides(pairs_file, tokenizer_dir, one, per_device_train_batch_size=4,
                                           **SETTINGS)))
    got, want = _metrics_by_step(out), _metrics_by_step(one)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for step in got:
        assert got[step].keys() == want[step].keys(), step
        for key, value in want[step].items():
            assert isinstance(value, (int, float)) and math.isfinite(value), (step, key, value)
            assert got[step][key] == pytest.approx(value, rel=1e-4, abs=1e-5), (step, key)
    assert want[3]["loss"] != pytest.approx(want[2]["loss"], abs=1e-4)  # the steps differ


@pytest.mark.distributed
def test_hung_rank_trips_the_collective_timeout(pairs_file: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    """Rank 1 freezes (SIGSTOP) mid-step: rank 0 waits in a collective no longer than ddp_timeout, fails, and the
    launcher takes the frozen rank down with it."""
    timeout_s = 20
    cfg = tiny_overrides(pairs_file, tokenizer_dir, tmp_path / "hang", per_device_train_batch_size=2,
                         ddp_timeout=timeout_s, **dict(SETTINGS, max_steps=2, save_steps=0))
    proc, ended = _launch(cfg, tmp_path, {"MALLOWSPO_FAST_FAULT": "step:forward@2:1",
                                          "MALLOWSPO_FAST_FAULT_SIGNAL": "SIGSTOP"}, timeout=400)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    exit_seconds = ended - _fault_time(output)
    print(f"hung rank: the job exited {exit_seconds:.1f} s after the SIGSTOP (ddp_timeout={timeout_s})")
    assert timeout_s <= exit_seconds < timeout_s + 120, output[-3000:]  # the timeout, not a hang
