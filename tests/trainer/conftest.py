"""Fixtures of the trainer tests (tiny data, tokenizer; CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
from trainer_helpers import memorisable_pairs, write_jsonl


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(memorisable_pairs(), tmp_path_factory.mktemp("data") / "pairs.jsonl")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, pairs_file: Path) -> Path:
    from mallowspo_fast import data

    out = tmp_path_factory.mktemp("tokenizer")
    data.train_tokenizer(str(pairs_file), 300, save_dir=out, min_frequency=1)
    return out
