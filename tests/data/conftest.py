"""Fixtures of the data tests: the real data bundled in the repository and tokenizers trained once per session."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from mallowspo_fast import data

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def dpo_demo() -> Path:
    """The 300 real ShareGPT pairs the package ships (LLaMA-Factory's dpo_en_demo)."""
    return Path(data.bundled_dataset_path("dpo_en_demo.json"))


@pytest.fixture(scope="session")
def kto_demo() -> Path:
    """LLaMA-Factory's kto_en_demo (real unpaired rows), kept with the tests."""
    return FIXTURES / "kto_en_demo.json"


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
