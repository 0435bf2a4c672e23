"""Sources (files, folders, save_to_disk, hub names), splits and streaming."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

from mallowspo_fast import data

ROWS = [
    {"prompt": f"Question {i}?", "chosen": f" Answer {i}.", "rejected": f" Wrong {i}.", "id": i}
    for i in range(10)
]


def _write(path, kind, rows=ROWS):
    if kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    elif kind == "parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif kind == "csv":
        datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
    return path


@pytest.mark.parametrize("kind", ["json", "jsonl", "parquet", "csv"])
def test_local_files(tmp_path, kind):
    path = _write(tmp_path / f"pairs.{kind}", kind)
    ds = data.load_preference_data(path)
    assert ds.num_rows == 10
    assert ds[3]["prompt"] == [{"role": "user", "content": "Question 3?"}]
    assert ds[3]["chosen"] == [{"role": "assistant", "content": " Answer 3."}]
    assert ds["id"] == list(range(10))


def test_folder_of_files_and_split_slicing(tmp_path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    _write(folder / "train.jsonl", "jsonl", ROWS[:6])
    _write(folder / "test.jsonl", "jsonl", ROWS[6:])
    assert data.load_preference_data(folder)["id"] == list(range(6))
    assert data.load_preference_data(folder, split="test")["id"] == [6, 7, 8, 9]
    assert data.load_preference_data(folder / "train.jsonl", split="train[:2]")["id"] == [0, 1]


def test_save_to_disk_dataset_and_dict(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert data.load_preference_data(tmp_path / "ds").num_rows == 10
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS[:4]), "test": datasets.Dataset.from_list(ROWS[4:])}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert data.load_preference_data(tmp_path / "dd", split="test").num_rows == 6
    with pytest.raises(
        ValueError, match=r"split 'validation' not in the dataset; available splits: \['test', 'train'\]"
    ):
        data.load_preference_data(tmp_path / "dd", split="validation")


def test_hub_name_goes_through_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = data.load_preference_data("org/some-preferences", split="train[:5]", name="default")
    assert ds.num_rows == 10
    assert calls == [("org/some-preferences", "default", {"split": "train[:5]", "streaming": False})]


@pytest.mark.parametrize("source", ["./missing.jsonl", "missing.parquet", "/no/such/dir"])
def test_missing_local_path_is_not_sent_to_the_hub(source):
    with pytest.raises(FileNotFoundError, match="no such data file or folder"):
        data.load_preference_data(source)


def test_unknown_file_type(tmp_path):
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(ValueError, match=r"unknown data file type '\.xml'"):
        data.load_preference_data(tmp_path / "x.xml")


def test_bad_source_type():
    with pytest.raises(TypeError, match="found int"):
        data.load_preference_data(42)


def test_train_eval_split_by_ratio_is_seeded_and_disjoint():
    ds = data.load_preference_data(ROWS)
    train, ev = data.train_eval_split(ds, eval_ratio=0.3, seed=1)
    assert (train.num_rows, ev.num_rows) == (7, 3)
    assert sorted([*train["id"], *ev["id"]]) == list(range(10))
    assert data.train_eval_split(ds, eval_ratio=0.3, seed=1).eval["id"] == ev["id"]
    assert data.train_eval_split(ds, eval_size=2).eval.num_rows == 2


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({}, "exactly one"),
        ({"eval_ratio": 0.1, "eval_size": 1}, "exactly one"),
        ({"eval_ratio": 1.5}, r"eval_ratio must be in \(0, 1\)"),
        ({"eval_size": 10}, "no training rows"),
    ],
    ids=["none", "both", "ratio-range", "too-big"],
)
def test_train_eval_split_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.train_eval_split(data.load_preference_data(ROWS), **kwargs)


def test_splits_from_a_second_file(tmp_path):
    train_path = _write(tmp_path / "train.jsonl", "jsonl", ROWS[:8])
    eval_path = _write(tmp_path / "eval.json", "json", ROWS[8:])
    splits = data.load_preference_splits(train_path, eval_source=eval_path)
    assert (splits.train.num_rows, splits.eval.num_rows) == (8, 2)
    assert data.load_preference_splits(train_path).eval is None
    assert data.load_preference_splits(train_path, eval_ratio=0.25).eval.num_rows == 2
    with pytest.raises(ValueError, match="not both"):
        data.load_preference_splits(train_path, eval_source=eval_path, eval_ratio=0.1)


def test_streaming_rows_match_in_memory(dpo_demo, demo_pairs):
    stream = data.load_preference_data(dpo_demo, streaming=True)
    assert isinstance(stream, datasets.IterableDataset)
    first = list(stream.take(3))
    for i, row in enumerate(first):
        assert {k: row[k] for k in ("prompt", "chosen", "rejected")} == {
            k: demo_pairs[i][k] for k in ("prompt", "chosen", "rejected")
        }


def test_streaming_skips_malformed_rows_and_strict_raises(tmp_path, data_log):
    rows = [dict(ROWS[0]), {"prompt": "q", "chosen": " same", "rejected": " same"}, dict(ROWS[1])]
    path = _write(tmp_path / "s.jsonl", "jsonl", rows)
    stream = data.load_preference_data(path, streaming=True)
    assert [r["id"] for r in stream] == [0, 1]
    with pytest.raises(ValueError, match="chosen == rejected"):
        list(data.load_preference_data(path, streaming=True, strict=True))


def test_streaming_split_by_count(dpo_demo):
    stream = data.load_preference_data(dpo_demo, streaming=True)
    with pytest.raises(ValueError, match="eval_size"):
        data.train_eval_split(stream, eval_ratio=0.1)
    train, ev = data.train_eval_split(stream, eval_size=2)
    assert len(list(ev)) == 2
    assert next(iter(train))["chosen"] == data.load_preference_data(dpo_demo)[2]["chosen"]


def test_streaming_feeds_a_dataloader_for_max_steps(dpo_demo, tokenizer):
    """A training loop bounded by max_steps over a streamed, lazily tokenised dataset."""
    stream = data.load_preference_data(dpo_demo, streaming=True)
    tokenised = data.tokenize_preference_data(stream, tokenizer, max_length=64)
    loader = torch.utils.data.DataLoader(
        tokenised, batch_size=2, collate_fn=data.PreferenceCollator(tokenizer.pad_token_id)
    )
    max_steps, seen = 3, []
    for step, batch in enumerate(loader):
        if step == max_steps:
            break
        assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 64
        seen.append(batch["index"].tolist())
    assert seen == [[0, 1], [2, 3], [4, 5]]
