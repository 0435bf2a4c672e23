"""Shared pieces of the trainer tests: a memorisable preference set, a tiny tokenizer and model config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Short, distinct pairs a 1-2 layer model can learn to rank within a few steps.
_ITEMS = [
    ("red", "apple", "stone"), ("blue", "sky", "mud"), ("green", "grass", "coal"), ("white", "snow", "ink"),
    ("yellow", "sun", "night"), ("black", "night", "snow"), ("orange", "carrot", "pea"), ("pink", "rose", "moss"),
    ("brown", "soil", "cloud"), ("grey", "rock", "flame"), ("gold", "coin", "leaf"), ("silver", "moon", "tar"),
    ("purple", "plum", "lime"), ("cyan", "sea", "sand"), ("tan", "bread", "ice"), ("navy", "ocean", "butter"),
]


def memorisable_pairs() -> list[dict[str, str]]:
    """16 pairs in the standard explicit format: the chosen answer names a thing of that colour."""
    return [{"prompt": f"Name something {c}:", "chosen": f" {good}", "rejected": f" {bad}"} for c, good, bad in _ITEMS]


def memorisable_unpaired() -> list[dict[str, Any]]:
    """The pairs of :func:`memorisable_pairs` as 32 unpaired (KTO) rows, interleaved: good answer label
    true, bad answer label false."""
    out: list[dict[str, Any]] = []
    for pair in memorisable_pairs():
        out.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        out.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    return out


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


TINY_MODEL = {
    "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
    "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64,
    "tie_word_embeddings": True,
}


def tiny_overrides(data_file: Path, tokenizer_dir: Path, output_dir: Path, **extra: Any) -> dict[str, Any]:
    """Config keys of a fast CPU run on the memorisable set (override any of them with ``extra``)."""
    cfg = {
        "model_config": dict(TINY_MODEL),
        "tokenizer_name_or_path": str(tokenizer_dir),
        "dataset_name": str(data_file),
        "output_dir": str(output_dir),
        "max_length": 32,
        "max_prompt_length": 16,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "learning_rate": 5e-3,
        "lr_scheduler_type": "constant",
        "max_steps": 6,
        "logging_steps": 1,
        "save_steps": 0,
        "beta": 0.5,
        "loss_type": "sigmoid",
        "disable_tqdm": True,
        "plot_curves": False,
        "export_model": False,
        "report_to": "none",
        "seed": 7,
    }
    cfg.update(extra)
    return cfg


def read_metrics(output_dir: Path) -> list[dict[str, Any]]:
    path = Path(output_dir) / "logs" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_losses(output_dir: Path) -> dict[int, float]:
    """Training loss by step (logging_steps=1 in these tests)."""
    return {r["step"]: r["loss"] for r in read_metrics(output_dir) if "loss" in r and r.get("phase") != "sft"}
