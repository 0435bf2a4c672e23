"""Fixtures of the data tests: the real data beside the repository and tokenizers trained once per session."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from mallowspo_fast import data

# ../shared/data beside the repository (CI checks it out there too).
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED_DATA / "dpo_en_demo.json").is_file():
        raise FileNotFoundError(f"expected the shared data at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def dpo_demo(shared_dir: Path) -> Path:
    return shared_dir / "dpo_en_demo.json"


@pytest.fixture(scope="session")
def kto_demo(shared_dir: Path) -> Path:
    return shared_dir / "kto_en_demo.json"


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 512-token byte-level BPE trained on the bundled demo data, saved once per session."""
    path = tmp_path_factory.mktemp("tokenizer")
    data.train_tokenizer(data.bundled_dataset_path(), 512, save_dir=path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="session")
def demo_pairs(dpo_demo: Path):
    return data.load_preference_data(dpo_demo)


@pytest.fixture
def data_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger="mallowspo_fast.data")
    return caplog
