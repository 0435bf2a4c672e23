"""Training on a streamed split (``streaming: true``): the order, the map-style equivalence, eval, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import pytest
from trainer_helpers import memorisable_pairs, read_metrics, tiny_overrides, train_losses, write_jsonl

from mallowspo_fast.trainer import batches, load_config, train

# A reference-based loss on a stream: live reference engine and a numeric phi_star (validated).
STREAM = dict(streaming=True, precompute_ref_log_probs=False)


def _stream(n: int) -> datasets.IterableDataset:
    return datasets.Dataset.from_list([{"i": k} for k in range(n)]).to_iterable_dataset()


def _read(reader: batches.StreamBatches, steps: range, rank: int) -> list[list[list[int]]]:
    return [[[r["i"] for r in micro] for micro in reader.micro_batches(s, rank)] for s in steps]


def test_stream_order_epochs_rank_slices_and_resume() -> None:
    # 10 rows, global batch 4 = 1 pair x 2 ranks x 2 micro-batches: 2 steps per epoch, 2 rows dropped.
    ranks = [batches.StreamBatches(_stream(10), 1, 2, 2, seed=3) for _ in range(2)]
    got = [_read(b, range(6), rank) for rank, b in enumerate(ranks)]
    steps = []
    for s in range(6):
        # micro-batch m of rank r is row (m * world + r) of the global batch, as in TrainOrder
        rows = [got[r][s][m][0] for m in range(2) for r in range(2)]
        assert len(set(rows)) == 4, (s, rows)
        steps.append(rows)
    epochs = [steps[0] + steps[1], steps[2] + steps[3], steps[4] + steps[5]]
    assert all(len(set(e)) == 8 for e in epochs)  # no row twice within an epoch
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]  # reshuffled every epoch
    assert (ranks[0].epoch, ranks[0].rows_in_epoch) == (2, 8)

    # Resume after step 3 (epoch 1, 4 rows read): the next steps are the same.
    first = batches.StreamBatches(_stream(10), 1, 2, 2, seed=3)
    _read(first, range(3), 0)
    client = first.position(3)
    assert (client["epoch"], client["rows_in_epoch"]) == (1, 4)
    resumed = batches.StreamBatches(_stream(10), 1, 2, 2, seed=3)
    resumed.restore(client, 3, Path("checkpoint-3"))
    assert _read(resumed, range(3, 6), 0) == got[0][3:]


def test_stream_shorter_than_one_global_batch_fails_at_once() -> None:
    with pytest.raises(ValueError, match="yields 3 pairs, fewer than one global batch of 4"):
        batches.StreamBatches(_stream(3), 2, 1, 2, seed=0)


def test_eval_size_holds_out_the_head_of_a_stream_or_a_random_sample(pairs_file: Path, tokenizer_dir: Path,
                                                                     tmp_path: Path) -> None:
    prompts = [r["prompt"] for r in memorisable_pairs()]
    cfg = load_config(None, tiny_overrides(pairs_file, tokenizer_dir, tmp_path, eval_size=3, max_eval_samples=2,
                                           max_train_samples=5, **STREAM))
    train_split, eval_split = batches.load_raw_splits(cfg)
    assert isinstance(train_split, datasets.IterableDataset) and isinstance(eval_split, datasets.Dataset)
    assert [r["prompt"][0]["content"] for r in eval_split] == prompts[:2]
    assert [r["prompt"][0]["content"] for r in train_split] == prompts[3:8]

    folder = tmp_path / "splits"
    folder.mkdir()
    write_jsonl(memorisable_pairs()[:12], folder / "train.jsonl")
    write_jsonl(memorisable_pairs()[12:], folder / "test.jsonl")
    cfg = load_config(None, tiny_overrides(folder, tokenizer_dir, tmp_path, dataset_test_split="test", **STREAM))
    train_split, eval_split = batches.load_raw_splits(cfg)  # the test split is streamed too, then kept in memory
    assert isinstance(eval_split, datasets.Dataset)
    assert [r["prompt"][0]["content"] for r in eval_split] == prompts[12:]

    train_split, eval_split = batches.load_raw_splits(load_config(None, tiny_overrides(pairs_file, tokenizer_dir,
                                                                                 tmp_path, eval_size=3)))
    held_out = [r["prompt"][0]["content"] for r in eval_split]
    assert len(held_out) == 3 and len(train_split) == 13 and held_out != prompts[:3]
    assert not set(held_out) & {r["prompt"][0]["content"] for r in train_split}


def test_streamed_run_equals_the_map_style_run_in_the_same_order(pairs_file: Path, tokenizer_dir: Path,
                                                                 tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Shuffling off for the stream (file order); the map-style file is laid out so that its shuffled
    order (TrainOrder, epoch 0) is the same file order. Two micro-batches per step check the slicing."""
    common = dict(max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                  precompute_ref_log_probs=False)
    pairs = memorisable_pairs()
    order = batches.TrainOrder(len(pairs), 2, 1, 2, seed=7)
    perm = [i for s in range(4) for m in range(2) for i in order.micro_batch(0, s, m, 0)]
    laid_out: list = [None] * len(pairs)
    for position, row in zip(perm, pairs):
        laid_out[position] = row
    map_file = write_jsonl(laid_out, tmp_path / "laid_out.jsonl")
    want = train_losses(train(load_config(None, tiny_overrides(map_file, tokenizer_dir, tmp_path / "map",
                                                               **common))).output_dir)

    monkeypatch.setattr(batches, "STREAM_SHUFFLE_BUFFER", 0)
    got = train_losses(train(load_config(None, tiny_overrides(pairs_file, tokenizer_dir, tmp_path / "stream",
                                                              streaming=True, **common))).output_dir)
    assert sorted(got) == [1, 2, 3, 4]
    assert got[1] == pytest.approx(math.log(2), abs=1e-5)
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step
    assert got[4] != pytest.approx(got[1], abs=1e-2)  # training moved: the comparison is not vacuous


# 16 pairs, 2 held out for eval: 14 streamed, 3 steps per epoch (2 rows dropped), so step 4 is in epoch 1.
RESUME = dict(max_steps=6, save_steps=2, lr_scheduler_type="linear", warmup_steps=2, eval_size=2, **STREAM)


@pytest.fixture(scope="module")
def uninterrupted(pairs_file: Path, tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stream_uninterrupted")
    assert train(load_config(None, tiny_overrides(pairs_file, tokenizer_dir, out, **RESUME))).step == 6
    return out


def test_streamed_resume_reproduces_the_next_steps(uninterrupted: Path, pairs_file: Path, tokenizer_dir: Path,
                                                   tmp_path: Path) -> None:
    ckpt = uninterrupted / "checkpoint-4"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["rows_in_epoch"], state["consumed_samples"]) == (4, 1, 4, 16)
    resumed = tmp_path / "resumed"
    train(load_config(None, tiny_overrides(pairs_file, tokenizer_dir, resumed, resume_from_checkpoint=str(ckpt),
                                           **RESUME)))
    want, got = train_losses(uninterrupted), train_losses(resumed)
    assert sorted(got) == [5, 6]
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step
    assert want[5] != pytest.approx(want[4], abs=1e-4)  # the steps differ: equality is informative
    want_eval, got_eval = ([r for r in read_metrics(out) if "eval_loss" in r][-1] for out in (uninterrupted, resumed))
    assert math.isfinite(got_eval["eval_loss"])
    assert got_eval["eval_loss"] == pytest.approx(want_eval["eval_loss"], rel=1e-6)


def test_resume_across_streaming_settings_is_refused(uninterrupted: Path, pairs_file: Path, tokenizer_dir: Path,
                                                     tmp_path: Path) -> None:
    cfg = tiny_overrides(pairs_file, tokenizer_dir, tmp_path / "map", **dict(RESUME, streaming=False),
                         resume_from_checkpoint=str(uninterrupted / "checkpoint-4"))
    with pytest.raises(ValueError, match="saved by a run with streaming=true and this run has streaming=false"):
        train(load_config(None, cfg))


def test_too_short_stream_fails_before_the_model_is_built(pairs_file: Path, tokenizer_dir: Path,
                                                          tmp_path: Path) -> None:
    cfg = tiny_overrides(pairs_file, tokenizer_dir, tmp_path / "out", max_train_samples=3, **STREAM)
    with pytest.raises(ValueError, match="yields 3 pairs, fewer than one global batch of 4"):
        train(load_config(None, cfg))
