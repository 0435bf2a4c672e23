"""The embedded default (``mallowspo-train --demo``), shrunk by key=value overrides to a few steps."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from mallowspo_fast.trainer import cli
from mallowspo_fast.trainer.demo import format_summary, wilson_interval


def test_demo_runs_end_to_end_with_overrides(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo"
    status = cli.main(["--demo", f"output_dir={out}", "max_steps=3", "sft_warmup_steps=2", "tokenizer_vocab_size=400",
                       "max_train_samples=48", "max_eval_samples=8", "max_length=64", "max_prompt_length=32",
                       "model_config.hidden_size=32", "eval_steps=null", "disable_tqdm=true"])
    assert status == 0
    summary = capsys.readouterr().out
    for text in ("done at step 3/3", "eval: loss", "reward accuracy", "eval reward accuracy over 8 pairs: 95% interval",
                 "dispersion: phi_star", "(auto)",
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


@pytest.mark.parametrize(("k", "n", "low", "high"), [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605),
                                                     (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)])
def test_wilson_interval_matches_newcombe(k: int, n: int, low: float, high: float) -> None:
    """Newcombe (1998), Statistics in Medicine 17:857, the score method on his four examples (4 decimals)."""
    assert wilson_interval(k / n, n) == pytest.approx((low, high), abs=5e-5)


def _summary(accuracy: float, eval_examples: int | None) -> str:
    result = SimpleNamespace(
        stopped_by=None, step=99, total_steps=99, seconds=40.0, train_metrics={"loss": 0.2, "rewards/accuracies": 0.97},
        eval_metrics={"eval_loss": 0.94, "eval_rewards/accuracies": accuracy, "eval_rewards/margins": 0.01},
        eval_examples=eval_examples, phi_star=None, model_dir=None, checkpoint_dir=None, metrics_path=None,
        curves_path=None)
    return format_summary(result, SimpleNamespace(loss_types=["mallows_theta"], beta=0.1, phi_star=0.29))


@pytest.mark.parametrize(("accuracy", "n", "line"), [
    (16 / 30, 30, "eval reward accuracy over 30 pairs: 95% interval [0.36, 0.70] (Wilson), not distinguishable "
                  "from chance (0.5)"),
    (0.6, 30, "over 30 pairs: 95% interval [0.42, 0.75] (Wilson), not distinguishable from chance (0.5)"),
    (0.6, 1000, "over 1000 pairs: 95% interval [0.57, 0.63] (Wilson), above chance (0.5)"),
    (29 / 30, 30, "over 30 pairs: 95% interval [0.83, 0.99] (Wilson), above chance (0.5)"),
    (0.1, 30, "over 30 pairs: 95% interval [0.03, 0.26] (Wilson), below chance (0.5)"),
])
def test_summary_puts_the_eval_accuracy_against_chance(accuracy: float, n: int, line: str) -> None:
    lines = _summary(accuracy, n).split("\n")
    at = next(i for i, x in enumerate(lines) if x.startswith("  eval: loss"))
    assert line in lines[at + 1]


def test_summary_without_an_eval_size_has_no_interval() -> None:
    assert "95% interval" not in _summary(0.5, None) and "eval: loss 0.9400" in _summary(0.5, None)
    with pytest.raises(ValueError, match="expected n >= 1"):
        wilson_interval(0.5, 0)


def test_training_page_quotes_the_interval_it_computes() -> None:
    """docs/training.md: the interval of 0.5 over the demo's 30 eval pairs and the counts that clear chance."""
    page = " ".join((Path(__file__).resolve().parents[2] / "docs" / "training.md").read_text(encoding="utf-8").split())
    low, high = wilson_interval(0.5, 30)
    assert f"exactly 0.5 has the interval [{low:.2f}, {high:.2f}]" in page
    clears = [k for k in range(31) if not wilson_interval(k / 30, 30)[0] <= 0.5 <= wilson_interval(k / 30, 30)[1]]
    assert clears == [*range(0, 10), *range(21, 31)]
    assert "only 21 or more right (or 9 or fewer) clear chance" in page
