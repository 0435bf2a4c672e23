"""The embedded default (``mallowspo-train --demo``), shrunk by key=value overrides to a few steps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mallowspo_fast.trainer import cli


def test_demo_runs_end_to_end_with_overrides(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo"
    status = cli.main(["--demo", f"output_dir={out}", "max_steps=3", "sft_warmup_steps=2", "tokenizer_vocab_size=400",
                       "max_train_samples=48", "max_eval_samples=8", "max_length=64", "max_prompt_length=32",
                       "model_config.hidden_size=32", "eval_steps=null", "disable_tqdm=true"])
    assert status == 0
    summary = capsys.readouterr().out
    for text in ("done at step 3/3", "eval: loss", "reward accuracy", "dispersion: phi_star", "(auto)",
                 f"model (Hugging Face format): {out}", "curves:"):
        assert text in summary, text
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert (out / "sft_warmup" / "config.json").is_file()
    assert (out / "config.json").is_file() and (out / "training_curves.png").is_file()
    records = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    sft = [r for r in records if r.get("phase") == "sft"]
    assert sft and all(math.isfinite(r["sft_loss"]) for r in sft)
    evals = [r for r in records if "eval_loss" in r]
    assert len(evals) == 1 and math.isfinite(evals[0]["eval_rewards/accuracies"])
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["hidden_size"] == 32
