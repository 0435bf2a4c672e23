"""Data for the trainer: tokenizer, tokenised splits, the resumable training order and sharded passes.

Every rank runs the same number of forwards, or ZeRO-3 hangs:
- training drops the incomplete last global batch of each epoch (the order is reshuffled every epoch,
  so different pairs are left out), so all ranks see ``steps_per_epoch * gradient_accumulation_steps``
  micro-batches; a streamed split is read whole by every rank, which keeps its own slices of each
  global batch, so the ranks agree without talking;
- full passes (evaluation, reference precompute) pad the last round by wrapping around and mask the
  duplicates out when the per-example results are gathered.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch

from .. import data
from .config import TrainConfig
from .launch import DistState, barrier

logger = logging.getLogger("mallowspo_fast.trainer")
TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids", "index")
KTO_TOKEN_COLUMNS = ("prompt_ids", "completion_ids", "label", "index")


# ----------------------------------------------------------------------------------------------------
# tokenizer
def _tokenizer_key(dataset_name: str, split: str, vocab_size: int, column_mapping: dict | None) -> str:
    """What the trained tokenizer depends on: the data (a local file by its size and time) and its settings."""
    src = {"dataset": os.path.abspath(dataset_name) if os.path.exists(dataset_name) else dataset_name,
           "split": split, "vocab_size": vocab_size, "column_mapping": column_mapping}
    if os.path.isfile(dataset_name):
        st = os.stat(dataset_name)
        src["file"] = [st.st_size, int(st.st_mtime)]
    return hashlib.sha256(json.dumps(src, sort_keys=True).encode()).hexdigest()[:16]


def load_tokenizer(cfg: TrainConfig, state: DistState, raw_train: Any) -> Any:
    """The configured tokenizer, or one trained on the training texts (cached in output_dir/tokenizer)."""
    from transformers import AutoTokenizer

    source = cfg.tokenizer_name_or_path or cfg.model_name_or_path
    if source is None:  # train_tokenizer (validated)
        save_dir = Path(cfg.output_dir) / "tokenizer"
        key_file = save_dir / "mallowspo_tokenizer_key.txt"
        key = _tokenizer_key(cfg.dataset_name, cfg.dataset_train_split, cfg.tokenizer_vocab_size, cfg.column_mapping)
        if state.is_main and not (key_file.is_file() and key_file.read_text().strip() == key):
            logger.info("training a %d-token BPE tokenizer on the training texts", cfg.tokenizer_vocab_size)
            data.train_tokenizer(raw_train, cfg.tokenizer_vocab_size, save_dir=save_dir)
            key_file.write_text(key + "\n")
        barrier(state)
        source = str(save_dir)
    tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"the tokenizer at {source} has neither a pad token nor an eos token to pad with")
        tok.pad_token = tok.eos_token
    return tok


# ----------------------------------------------------------------------------------------------------
# splits
def load_raw_splits(cfg: TrainConfig) -> tuple[Any, Any]:
    """Normalised (not yet tokenised) train and eval splits. With ``streaming`` the training split is an
    IterableDataset and the eval split (``dataset_test_split``, or the first ``eval_size`` rows of the stream)
    is read into memory once: evaluation shards a split of known length over the ranks."""
    kwargs = dict(column_mapping=cfg.column_mapping, num_proc=cfg.dataset_num_proc, streaming=cfg.streaming)
    load = data.load_unpaired_data if cfg.is_kto else data.load_preference_data
    train = load(cfg.dataset_name, split=cfg.dataset_train_split, **kwargs)
    evals = None
    if cfg.dataset_test_split:
        evals = load(cfg.dataset_name, split=cfg.dataset_test_split, **kwargs)
    elif cfg.eval_ratio > 0 or cfg.eval_size > 0:
        train, evals = data.train_eval_split(train, eval_ratio=cfg.eval_ratio or None,
                                             eval_size=cfg.eval_size or None, seed=cfg.seed)
    if cfg.streaming:
        if cfg.max_train_samples is not None:
            train = train.take(cfg.max_train_samples)
        return train, None if evals is None else _in_memory(evals, cfg.max_eval_samples)
    if cfg.max_train_samples is not None and len(train) > cfg.max_train_samples:
        train = train.select(range(cfg.max_train_samples))
    if evals is not None and cfg.max_eval_samples is not None and len(evals) > cfg.max_eval_samples:
        evals = evals.select(range(cfg.max_eval_samples))
    return train, evals


def _in_memory(stream: datasets.IterableDataset, limit: int | None) -> datasets.Dataset:
    rows_ = list(stream if limit is None else stream.take(limit))
    if not rows_:
        raise ValueError("the evaluation split of the streamed dataset has no rows")
    return datasets.Dataset.from_list(rows_, on_mixed_types="use_json")


def tokenize(cfg: TrainConfig, ds: Any, tokenizer: Any) -> Any:
    """Token ids with ``index`` = the row's position (the key of precomputed reference values).

    KTO (unpaired) rows also get ``kl_completion_ids`` (``data.kl_completions``): the mismatched completion
    that the row's prompt is scored with for the KL estimate z0.
    """
    fn = data.tokenize_unpaired_data if cfg.is_kto else data.tokenize_preference_data
    columns = KTO_TOKEN_COLUMNS if cfg.is_kto else TOKEN_COLUMNS
    tok = fn(ds, tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
             truncation_mode=cfg.truncation_mode, num_proc=cfg.dataset_num_proc)
    if isinstance(tok, datasets.IterableDataset):
        return tok.select_columns(list(columns))  # index: position in the stream (kept rows)
    tok = tok.select_columns([c for c in columns if c in tok.column_names])
    if "index" not in tok.column_names or tok["index"] != list(range(len(tok))):
        if "index" in tok.column_names:
            tok = tok.remove_columns("index")
        tok = tok.add_column("index", list(range(len(tok))))
    if cfg.is_kto:
        if len(tok) < 2:
            raise ValueError(f"loss_type=kto needs at least 2 rows per split (the KL estimate pairs each prompt "
                             f"with another row's completion), found {len(tok)}")
        tok = tok.add_column("kl_completion_ids", data.kl_completions(tok["completion_ids"], cfg.kl_pairing_seed))
    return tok


def collator(cfg: TrainConfig, tokenizer: Any) -> Any:
    """The collator of the configured loss: paired (chosen rows, then rejected rows) or KTO's."""
    kind = data.KTOCollator if cfg.is_kto else data.PreferenceCollator
    return kind(tokenizer.pad_token_id, cfg.pad_to_multiple_of)


def dataset_fingerprint(ds: Any) -> str:
    """Identity of a tokenised split for cache keys: its `datasets` fingerprint plus a content sample."""
    h = hashlib.sha256(str(getattr(ds, "_fingerprint", "")).encode())
    h.update(str(len(ds)).encode())
    for i in sorted({0, len(ds) // 2, len(ds) - 1}):
        row = ds[i]
        h.update(json.dumps([row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids", "completion_ids", "label",
                                              "kl_completion_ids") if k in row]).encode())
    return h.hexdigest()[:16]


def rows(ds: Any, indices: list[int]) -> list[dict[str, Any]]:
    """Rows of a tokenised split, in the order of ``indices``."""
    cols = ds[indices]
    return [{k: cols[k][i] for k in cols} for i in range(len(indices))]


# ----------------------------------------------------------------------------------------------------
# training order
def _too_few(n: int, verb: str, micro: int, world: int, accumulation: int) -> ValueError:
    return ValueError(
        f"the training split {verb} {n} pairs, fewer than one global batch of {micro * world * accumulation} "
        f"(per_device_train_batch_size={micro} x world size {world} x gradient_accumulation_steps="
        f"{accumulation}); lower the batch size or add data"
    )


class TrainOrder:
    """Deterministic order: epoch e is ``randperm(n)`` seeded with ``seed + e``; optimizer step s of the
    epoch uses the global batch at ``s * global_batch``; micro-batch m of rank r is a contiguous slice of
    it. The state to resume is just (epoch, step in epoch)."""

    def __init__(self, n: int, micro: int, world: int, accumulation: int, seed: int) -> None:
        self.n, self.micro, self.world, self.accumulation, self.seed = n, micro, world, accumulation, seed
        self.global_batch = micro * world * accumulation
        self.steps_per_epoch = n // self.global_batch
        if self.steps_per_epoch == 0:
            raise _too_few(n, "has", micro, world, accumulation)
        self._epoch = -1
        self._perm: list[int] = []

    def micro_batch(self, epoch: int, step_in_epoch: int, micro_index: int, rank: int) -> list[int]:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm, self._epoch = torch.randperm(self.n, generator=g).tolist(), epoch
        start = step_in_epoch * self.global_batch + (micro_index * self.world + rank) * self.micro
        return self._perm[start:start + self.micro]


class MapBatches:
    """A map-style training split read in the :class:`TrainOrder`."""

    streaming = False

    def __init__(self, ds: Any, micro: int, world: int, accumulation: int, seed: int) -> None:
        self.ds, self.accumulation = ds, accumulation
        self.order = TrainOrder(len(ds), micro, world, accumulation, seed)
        self.global_batch, self.steps_per_epoch = self.order.global_batch, self.order.steps_per_epoch

    def micro_batches(self, step: int, rank: int) -> list[list[dict[str, Any]]]:
        """Rows of each micro-batch of ``rank`` for optimizer step ``step`` (0-based)."""
        epoch, s = divmod(step, self.steps_per_epoch)
        return [rows(self.ds, self.order.micro_batch(epoch, s, m, rank)) for m in range(self.accumulation)]

    def epoch_at(self, step: int) -> float:
        return step / self.steps_per_epoch

    def position(self, step: int) -> dict[str, Any]:
        """Client-state entries of the data position after ``step`` optimizer steps."""
        epoch, s = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "step_in_epoch": s, "order": {"seed": self.order.seed, "n": self.order.n,
                                                              "global_batch": self.global_batch}}

    def restore(self, client: dict[str, Any], step: int, where: Path) -> None:
        saved = client.get("order", {})
        _check_same_kind(saved, self.streaming, where)
        if saved.get("global_batch") != self.global_batch or saved.get("n") != self.order.n:
            raise ValueError(
                f"{where} was saved with a global batch of {saved.get('global_batch')} over {saved.get('n')} "
                f"pairs; this run has {self.global_batch} over {self.order.n}. Resume with the same data, world "
                "size, per_device_train_batch_size and gradient_accumulation_steps")


STREAM_SHUFFLE_BUFFER = 1000  # rows; the default buffer of datasets' IterableDataset.shuffle


class StreamBatches:
    """A streamed (iterable) training split, read one global batch per optimizer step.

    Every rank reads the whole stream in the same order (``IterableDataset.shuffle`` with ``seed`` and a
    buffer of ``STREAM_SHUFFLE_BUFFER`` rows, reshuffled every epoch by ``set_epoch``; 0 or 1: stream order)
    and keeps its micro-batches of each global batch, laid out as in :class:`TrainOrder`. When the stream
    runs out, the incomplete global batch is dropped and the next epoch starts. The state to resume is
    (epoch, rows read in the epoch); resuming re-reads the epoch's first rows to skip them.
    """

    streaming = True
    steps_per_epoch = None  # unknown until the stream has been read to its end

    def __init__(self, ds: datasets.IterableDataset, micro: int, world: int, accumulation: int, seed: int,
                 shuffle_buffer: int | None = None) -> None:
        self.micro, self.world, self.accumulation, self.seed = micro, world, accumulation, seed
        self.global_batch = micro * world * accumulation
        buffer = STREAM_SHUFFLE_BUFFER if shuffle_buffer is None else shuffle_buffer
        self.ds = ds.shuffle(seed=seed, buffer_size=buffer) if buffer > 1 else ds
        self.epoch = self.rows_in_epoch = self.steps_read = 0
        self._rows: Any = None  # iterator over the current epoch, at rows_in_epoch
        # Fail before any model is built (every rank reads the same rows, so every rank raises).
        head = list(itertools.islice(self._epoch(0), self.global_batch))
        if len(head) < self.global_batch:
            raise _too_few(len(head), "yields", micro, world, accumulation)

    def _epoch(self, epoch: int) -> Any:
        self.ds.set_epoch(epoch)
        return iter(self.ds)

    def _next_global_batch(self) -> list[dict[str, Any]]:
        while True:
            if self._rows is None:
                self._rows = itertools.islice(self._epoch(self.epoch), self.rows_in_epoch, None)
            batch = list(itertools.islice(self._rows, self.global_batch))
            if len(batch) == self.global_batch:
                self.rows_in_epoch += self.global_batch
                return batch
            if self.rows_in_epoch == 0:
                raise _too_few(len(batch), "yields", self.micro, self.world, self.accumulation)
            self.epoch, self.rows_in_epoch, self._rows = self.epoch + 1, 0, None

    def micro_batches(self, step: int, rank: int) -> list[list[dict[str, Any]]]:
        """Rows of each micro-batch of ``rank`` for optimizer step ``step``: the next global batch."""
        if step != self.steps_read:
            raise RuntimeError(f"a stream is read in order: step {step} asked for after {self.steps_read} steps")
        batch = self._next_global_batch()
        self.steps_read += 1
        starts = [(m * self.world + rank) * self.micro for m in range(self.accumulation)]
        return [batch[s:s + self.micro] for s in starts]

    def epoch_at(self, step: int) -> float:
        return float(self.epoch)  # passes over the stream completed (its length is unknown)

    def position(self, step: int) -> dict[str, Any]:
        return {"epoch": self.epoch, "rows_in_epoch": self.rows_in_epoch,
                "order": {"seed": self.seed, "global_batch": self.global_batch, "streaming": True}}

    def restore(self, client: dict[str, Any], step: int, where: Path) -> None:
        saved = client.get("order", {})
        _check_same_kind(saved, self.streaming, where)
        if saved.get("global_batch") != self.global_batch:
            raise ValueError(
                f"{where} was saved with a global batch of {saved.get('global_batch')} pairs; this run has "
                f"{self.global_batch}. Resume with the same world size, per_device_train_batch_size and "
                "gradient_accumulation_steps")
        self.epoch, self.rows_in_epoch = int(client["epoch"]), int(client["rows_in_epoch"])
        self.steps_read, self._rows = step, None
        if self.rows_in_epoch:
            logger.info("resuming the stream in epoch %d: its first %d rows are read again and skipped",
                        self.epoch, self.rows_in_epoch)


def _check_same_kind(saved_order: dict[str, Any], streaming: bool, where: Path) -> None:
    saved = bool(saved_order.get("streaming", False))
    if saved != streaming:
        raise ValueError(
            f"{where} was saved by a run with streaming={str(saved).lower()} and this run has "
            f"streaming={str(streaming).lower()}: the position in the data does not carry over; resume with "
            "the same streaming setting")


def train_batches(ds: Any, micro: int, world: int, accumulation: int, seed: int) -> MapBatches | StreamBatches:
    """The training split read in order: :class:`StreamBatches` for a stream, else :class:`MapBatches`."""
    kind = StreamBatches if isinstance(ds, datasets.IterableDataset) else MapBatches
    return kind(ds, micro, world, accumulation, seed)


def total_steps(max_steps: int, num_train_epochs: float, steps_per_epoch: int | None) -> int:
    """``max_steps`` when set (> 0), else ``ceil(num_train_epochs * steps_per_epoch)``, at least 1."""
    if max_steps > 0:
        return max_steps
    if steps_per_epoch is None:  # validated: streaming needs max_steps
        raise ValueError("a streamed training split needs max_steps >= 1 (its length is unknown)")
    return max(1, math.ceil(num_train_epochs * steps_per_epoch))


# ----------------------------------------------------------------------------------------------------
# full sharded passes
@dataclass
class Shard:
    """Batches of one rank for a full pass: same count on every rank, duplicates flagged."""

    batches: list[list[int]]
    n: int
    batch_size: int
    world: int


def shard(n: int, batch_size: int, state: DistState) -> Shard:
    per_round = batch_size * state.world_size
    rounds = max(1, math.ceil(n / per_round))
    out = []
    for r in range(rounds):
        start = r * per_round + state.rank * batch_size
        out.append([(start + j) % n for j in range(batch_size)])
    return Shard(out, n, batch_size, state.world_size)


def gather_examples(local: dict[str, list[torch.Tensor]], sh: Shard, state: DistState) -> dict[str, torch.Tensor]:
    """Per-example values of a full pass, in dataset order, on every rank (padding removed).

    ``local[key]`` holds one [batch_size] tensor per batch of ``sh`` (the same keys on every rank).
    """
    import torch.distributed as dist

    out = {}
    for key in sorted(local):
        mine = torch.cat(local[key]).reshape(len(sh.batches), sh.batch_size)
        if state.world_size > 1:
            parts = [torch.empty_like(mine) for _ in range(state.world_size)]
            dist.all_gather(parts, mine.contiguous())
            full = torch.stack(parts, dim=1)  # [rounds, world, batch]
        else:
            full = mine.unsqueeze(1)
        out[key] = full.reshape(-1)[: sh.n].cpu()
    return out
