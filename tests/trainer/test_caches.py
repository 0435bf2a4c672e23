"""Corrupted caches: the tokenised dataset cache and the precomputed-reference cache carry a key and a
checksum; a truncated or foreign file is detected, reported and rebuilt, never silently used."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from trainer_helpers import memorisable_pairs, tiny_overrides, train_losses

from mallowspo_fast import data
from mallowspo_fast.data.tokenization import CHECKSUM_SUFFIX


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _on_disk(rows: list[dict], folder: Path) -> datasets.Dataset:
    """Normalised rows saved and reloaded, so that `datasets` caches transforms next to them."""
    data.load_preference_data(rows).save_to_disk(str(folder))
    return datasets.load_from_disk(str(folder))


def _tokenise(ds: datasets.Dataset, tokenizer) -> datasets.Dataset:
    return data.tokenize_preference_data(ds, tokenizer, max_length=32, max_prompt_length=16)


def _cache_file(ds: datasets.Dataset, out: datasets.Dataset) -> Path:
    files = [Path(c["filename"]) for c in out.cache_files if Path(c["filename"]).parent == Path(
        ds.cache_files[0]["filename"]).parent and Path(c["filename"]).name.startswith("cache-")]
    assert len(files) == 1, out.cache_files
    return files[0]


def _rows(ds: datasets.Dataset) -> list[dict]:
    return [dict(r) for r in ds]


def test_tokenised_cache_is_reused_when_intact(tmp_path: Path, tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    ds = _on_disk(memorisable_pairs(), tmp_path / "raw")
    first = _tokenise(ds, tokenizer)
    cache = _cache_file(ds, first)
    checksums = json.loads(cache.with_name(cache.stem + CHECKSUM_SUFFIX).read_text())
    assert list(checksums["files"]) == [cache.name] and checksums["files"][cache.name]["size"] == cache.stat().st_size
    stamp = cache.stat().st_mtime_ns
    with caplog.at_level(logging.WARNING, logger="mallowspo_fast.data"):
        again = _tokenise(ds, tokenizer)
    assert cache.stat().st_mtime_ns == stamp  # read, not rewritten
    assert not [r for r in caplog.records if "not usable" in r.message]
    assert _rows(again) == _rows(first)


@pytest.mark.parametrize("damage", ["truncated", "foreign", "no checksums"])
def test_damaged_tokenised_cache_is_reported_and_rebuilt(damage: str, tmp_path: Path, tokenizer,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    ds = _on_disk(memorisable_pairs(), tmp_path / "raw")
    first = _tokenise(ds, tokenizer)
    cache = _cache_file(ds, first)
    want = _rows(first)
    if damage == "truncated":
        blob = cache.read_bytes()
        cache.write_bytes(blob[: len(blob) // 2])
        expected = "bytes, expected"
    elif damage == "foreign":
        # a valid cache of the same schema with other rows (the pairs reversed), under this cache's name
        other_raw = _on_disk([{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in memorisable_pairs()],
                             tmp_path / "other")
        other = _tokenise(other_raw, tokenizer)
        shutil.copyfile(_cache_file(other_raw, other), cache)
        impostor = list(datasets.Dataset.from_file(str(cache))["chosen_ids"])
        assert impostor != [r["chosen_ids"] for r in want]  # a valid file with other rows
        expected = "sha256"
    else:
        cache.with_name(cache.stem + CHECKSUM_SUFFIX).unlink()
        expected = CHECKSUM_SUFFIX
    del first
    with caplog.at_level(logging.WARNING, logger="mallowspo_fast.data"):
        rebuilt = _tokenise(ds, tokenizer)
    warnings = [r.message for r in caplog.records if "not usable" in r.message]
    assert len(warnings) == 1 and expected in warnings[0], warnings
    assert _rows(rebuilt) == want
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mallowspo_fast.data"):
        assert _rows(_tokenise(ds, tokenizer)) == want  # the rebuilt cache passes its check
    assert not [r for r in caplog.records if "not usable" in r.message]


# ----------------------------------------------------------------------------------------------------
# the precomputed-reference cache, through the trainer
def _train(pairs_file: Path, tokenizer_dir: Path, out: Path, cache: Path) -> dict[int, float]:
    from mallowspo_fast.trainer import load_config, train

    train(load_config(None, tiny_overrides(pairs_file, tokenizer_dir, out, max_steps=2, ref_cache_dir=str(cache),
                                           loss_type="mallows_theta", phi_star="auto")))
    return train_losses(out)


@pytest.fixture(scope="module")
def reference_run(pairs_file: Path, tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("refcache")
    losses = _train(pairs_file, tokenizer_dir, root / "first", root / "cache")
    (table,) = sorted((root / "cache").glob("reference_*.pt"))
    return root, losses, table


@pytest.mark.parametrize("damage", ["truncated", "foreign key", "values changed"])
def test_damaged_reference_cache_is_reported_and_rebuilt(damage: str, reference_run, pairs_file: Path,
                                                         tokenizer_dir: Path, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    root, want, table = reference_run
    cache = tmp_path / "cache"
    cache.mkdir()
    target = cache / table.name
    saved = torch.load(table, weights_only=True)
    if damage == "truncated":
        blob = table.read_bytes()
        target.write_bytes(blob[: len(blob) * 2 // 3])
        expected = "unreadable"
    elif damage == "foreign key":
        # the file of another model or data set, renamed to this key: same length, other values
        torch.save({**saved, "chosen_logps": saved["chosen_logps"] - 3.0, "key": "0" * 20}, target)
        expected = "keyed '00000000000000000000'"
    else:
        torch.save({**saved, "chosen_logps": saved["chosen_logps"] - 3.0}, target)  # checksum left as it was
        expected = "sha256"
    with caplog.at_level(logging.WARNING, logger="mallowspo_fast.trainer"):
        got = _train(pairs_file, tokenizer_dir, tmp_path / "run", cache)
    warnings = [r.getMessage() for r in caplog.records if "reference cache" in r.getMessage()]
    assert len(warnings) == 1 and expected in warnings[0], warnings
    assert got == pytest.approx(want, rel=1e-6, abs=1e-7)  # the rebuilt values, not the damaged ones
    rebuilt = torch.load(target, weights_only=True)
    torch.testing.assert_close(rebuilt["chosen_logps"], saved["chosen_logps"], rtol=0, atol=0)
    assert rebuilt["checksum"] == saved["checksum"]


def test_reference_cache_is_reused_when_intact(reference_run, pairs_file: Path, tokenizer_dir: Path,
                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, want, table = reference_run
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copyfile(table, cache / table.name)
    from mallowspo_fast.trainer import reference

    def no_pass(*args, **kwargs):
        raise AssertionError("the intact cache should have been read, not recomputed")

    monkeypatch.setattr(reference, "compute_table", no_pass)
    assert _train(pairs_file, tokenizer_dir, tmp_path / "run", cache) == pytest.approx(want, rel=1e-6, abs=1e-7)
