"""Hypothesis profiles of the fuzz tests, a hang guard and the shared tokenizer.

Every fuzz test exists twice (``fuzz_helpers.fuzz_pair``): the default variant runs under the profile
``mallowspo-fuzz`` (a bounded number of examples, fast enough for the default suite), the ``slow``-marked
variant under ``mallowspo-fuzz-slow`` (``pytest -m slow tests/fuzz``). The profiles are registered in
``fuzz_helpers`` under their own names, so the rest of the suite keeps Hypothesis' defaults. Hypothesis'
deadline is off (a loaded 2-core machine makes per-example timing meaningless); the hang guard below
fails a test whose examples together run longer than ``HANG_GUARD_S``.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import datasets
import pytest
from fuzz_helpers import FUZZ_PROFILE, HANG_GUARD_S, SLOW_PROFILE

datasets.disable_progress_bars()
datasets.logging.set_verbosity_error()
logging.getLogger("mallowspo_fast.data").setLevel(logging.ERROR)


class HangError(AssertionError):
    """A fuzz test ran past its hang guard."""


@pytest.fixture(autouse=True)
def hang_guard(request: pytest.FixtureRequest):
    """SIGALRM fails a test that hangs (an endless loop in the code under test), with its traceback."""
    limit = HANG_GUARD_S[SLOW_PROFILE if request.node.get_closest_marker("slow") else FUZZ_PROFILE]

    def on_alarm(signum, frame):
        raise HangError(f"{request.node.nodeid} ran longer than its hang guard of {limit} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(limit)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="session")
def fuzz_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """A 512-token byte-level BPE trained on the bundled demo data (no downloads)."""
    from transformers import AutoTokenizer

    from mallowspo_fast import data

    path: Path = tmp_path_factory.mktemp("fuzz_tokenizer")
    data.train_tokenizer(data.bundled_dataset_path(), 512, save_dir=path)
    return AutoTokenizer.from_pretrained(str(path))
