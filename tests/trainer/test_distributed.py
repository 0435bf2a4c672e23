"""Two CPU ranks under ZeRO-3 through the launchers (deepspeed and torchrun).

The two-rank run must train (finite, decreasing loss on the memorisable set) and must equal the
single-process run with the same global batch step by step: that checks the data sharding (of a map-style
and of a streamed split), the cross-rank metric averaging and the gradient reduction together.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainer_helpers import tiny_overrides, train_losses

from mallowspo_fast.trainer import load_config, train

REPO = Path(__file__).resolve().parents[2]
STEPS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(command: list[str], timeout: int = 240, *, ok: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # set by this test process's own single-rank group
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if ok:
        tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        assert proc.returncode == 0, f"launcher failed ({proc.returncode}):\n{tail}"
        assert "done at step" in proc.stdout, proc.stdout[-2000:]
    return proc


def _config(pairs_file: Path, tokenizer_dir: Path, out: Path, per_device: int, **extra) -> dict:
    return tiny_overrides(pairs_file, tokenizer_dir, out, max_steps=STEPS, per_device_train_batch_size=per_device,
                          export_model=True, zero_stage=3, **extra)


def _check_against_single_rank(two: Path, pairs_file: Path, tokenizer_dir: Path, tmp_path: Path, **extra) -> None:
    one = tmp_path / "one_rank"
    train(load_config(None, _config(pairs_file, tokenizer_dir, one, per_device=4, **extra)))
    got, want = train_losses(two), train_losses(one)
    assert sorted(got) == list(range(1, STEPS + 1))
    losses = [got[s] for s in sorted(got)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)
    assert sum(losses[-2:]) / 2 < losses[0] - 0.05, losses
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-5), step

    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(two, dtype=torch.float32).state_dict()
    b = AutoModelForCausalLM.from_pretrained(one, dtype=torch.float32).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4, msg=key)


def _write_yaml(cfg: dict, path: Path) -> Path:
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


@pytest.mark.distributed
def test_two_rank_zero3_with_deepspeed_launcher(pairs_file: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    two = tmp_path / "two_ranks"
    yaml_file = _write_yaml(_config(pairs_file, tokenizer_dir, two, per_device=2), tmp_path / "run.yaml")
    launcher = Path(sys.executable).parent / "deepspeed"
    _launch([str(launcher), "--num_gpus", "2", "--master_port", str(_free_port()), "--module",
             "mallowspo_fast.train", str(yaml_file)])
    _check_against_single_rank(two, pairs_file, tokenizer_dir, tmp_path)


@pytest.mark.distributed
def test_two_rank_zero3_chunked_logits_matches_the_normal_path(pairs_file: Path, tokenizer_dir: Path,
                                                               tmp_path: Path) -> None:
    """logits_mode=chunked on two ranks (the output weight, tied to the embeddings, sharded by ZeRO-3 and
    gathered inside the engine's forward and backward) against the one-rank normal path."""
    two = tmp_path / "two_ranks_chunked"
    cfg = _config(pairs_file, tokenizer_dir, two, per_device=2, logits_mode="chunked", logits_chunk_size=7)
    yaml_file = _write_yaml(cfg, tmp_path / "run.yaml")
    launcher = Path(sys.executable).parent / "deepspeed"
    _launch([str(launcher), "--num_gpus", "2", "--master_port", str(_free_port()), "--module",
             "mallowspo_fast.train", str(yaml_file)])
    _check_against_single_rank(two, pairs_file, tokenizer_dir, tmp_path)


@pytest.mark.distributed
def test_two_rank_zero3_streaming_matches_one_rank(pairs_file: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    """streaming=true on two ranks: each rank reads the whole stream and keeps its slices of every global
    batch; the 8 steps cross an epoch boundary (16 pairs, global batch 4) and a live reference engine scores
    each micro-batch."""
    two = tmp_path / "two_ranks_streaming"
    stream = dict(streaming=True, precompute_ref_log_probs=False)
    yaml_file = _write_yaml(_config(pairs_file, tokenizer_dir, two, per_device=2, **stream), tmp_path / "run.yaml")
    launcher = Path(sys.executable).parent / "deepspeed"
    _launch([str(launcher), "--num_gpus", "2", "--master_port", str(_free_port()), "--module",
             "mallowspo_fast.train", str(yaml_file)])
    _check_against_single_rank(two, pairs_file, tokenizer_dir, tmp_path, **stream)


@pytest.mark.distributed
def test_two_rank_stream_shorter_than_a_global_batch_fails_on_every_rank(pairs_file: Path, tokenizer_dir: Path,
                                                                        tmp_path: Path) -> None:
    cfg = _config(pairs_file, tokenizer_dir, tmp_path / "short", per_device=2, streaming=True,
                  precompute_ref_log_probs=False, max_train_samples=3)
    launcher = Path(sys.executable).parent / "deepspeed"
    proc = _launch([str(launcher), "--num_gpus", "2", "--master_port", str(_free_port()), "--module",
                    "mallowspo_fast.train", str(_write_yaml(cfg, tmp_path / "run.yaml"))], timeout=120, ok=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert output.count("yields 3 pairs, fewer than one global batch of 4") == 2, output[-3000:]  # both ranks


@pytest.mark.distributed
def test_two_rank_zero3_with_torchrun(pairs_file: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    two = tmp_path / "two_ranks"
    yaml_file = _write_yaml(_config(pairs_file, tokenizer_dir, two, per_device=2), tmp_path / "run.yaml")
    _launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
             str(_free_port()), "-m", "mallowspo_fast.train", str(yaml_file), "--zero_stage=3"])
    _check_against_single_rank(two, pairs_file, tokenizer_dir, tmp_path)
