"""Data for the trainer: tokenizer, tokenised splits, the resumable training order and sharded passes.

Every rank runs the same number of forwards, or ZeRO-3 hangs:
- training drops the incomplete last global batch of each epoch (the order is reshuffled every epoch,
  so different pairs are left out), so all ranks see ``steps_per_epoch * gradient_accumulation_steps``
  micro-batches;
- full passes (evaluation, reference precompute) pad the last round by wrapping around and mask the
  duplicates out when the per-example results are gathered.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import data as D
from .config import TrainConfig
from .launch import DistState, barrier

logger = logging.getLogger("mallowspo_fast.trainer")
TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids", "index")


# ----------------------------------------------------------------------------------------------------
# tokenizer
def _tokenizer_key(cfg: TrainConfig) -> str:
    src = {"dataset": os.path.abspath(cfg.dataset_name) if os.path.exists(cfg.dataset_name) else cfg.dataset_name,
           "split": cfg.dataset_train_split, "vocab_size": cfg.tokenizer_vocab_size,
           "column_mapping": cfg.column_mapping}
    if os.path.isfile(cfg.dataset_name):
        st = os.stat(cfg.dataset_name)
        src["file"] = [st.st_size, int(st.st_mtime)]
    return hashlib.sha256(json.dumps(src, sort_keys=True).encode()).hexdigest()[:16]


def load_tokenizer(cfg: TrainConfig, state: DistState, raw_train: Any) -> Any:
    """The configured tokenizer, or one trained on the training texts (cached in output_dir/tokenizer)."""
    from transformers import AutoTokenizer

    source = cfg.tokenizer_name_or_path or cfg.model_name_or_path
    if source is None:  # train_tokenizer (validated)
        save_dir = Path(cfg.output_dir) / "tokenizer"
        key_file = save_dir / "mallowspo_tokenizer_key.txt"
        key = _tokenizer_key(cfg)
        if state.is_main and not (key_file.is_file() and key_file.read_text().strip() == key):
            logger.info("training a %d-token BPE tokenizer on the training texts", cfg.tokenizer_vocab_size)
            D.train_tokenizer(raw_train, cfg.tokenizer_vocab_size, save_dir=save_dir)
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
    """Normalised (not yet tokenised) train and eval splits."""
    kwargs = dict(column_mapping=cfg.column_mapping, num_proc=cfg.dataset_num_proc)
    train = D.load_preference_data(cfg.dataset_name, split=cfg.dataset_train_split, **kwargs)
    evals = None
    if cfg.dataset_test_split:
        evals = D.load_preference_data(cfg.dataset_name, split=cfg.dataset_test_split, **kwargs)
    elif cfg.eval_ratio > 0:
        train, evals = D.train_eval_split(train, eval_ratio=cfg.eval_ratio, seed=cfg.seed)
    if cfg.max_train_samples is not None and len(train) > cfg.max_train_samples:
        train = train.select(range(cfg.max_train_samples))
    if evals is not None and cfg.max_eval_samples is not None and len(evals) > cfg.max_eval_samples:
        evals = evals.select(range(cfg.max_eval_samples))
    return train, evals


def tokenize(cfg: TrainConfig, ds: Any, tokenizer: Any) -> Any:
    """Token ids with ``index`` = the row's position (the key of precomputed reference values)."""
    tok = D.tokenize_preference_data(ds, tokenizer, max_length=cfg.max_length,
                                     max_prompt_length=cfg.max_prompt_length, truncation_mode=cfg.truncation_mode,
                                     num_proc=cfg.dataset_num_proc)
    tok = tok.select_columns([c for c in TOKEN_COLUMNS if c in tok.column_names])
    if "index" not in tok.column_names or tok["index"] != list(range(len(tok))):
        if "index" in tok.column_names:
            tok = tok.remove_columns("index")
        tok = tok.add_column("index", list(range(len(tok))))
    return tok


def dataset_fingerprint(ds: Any) -> str:
    """Identity of a tokenised split for cache keys: its `datasets` fingerprint plus a content sample."""
    h = hashlib.sha256(str(getattr(ds, "_fingerprint", "")).encode())
    h.update(str(len(ds)).encode())
    for i in sorted({0, len(ds) // 2, len(ds) - 1}):
        row = ds[i]
        h.update(json.dumps([row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]]).encode())
    return h.hexdigest()[:16]


def rows(ds: Any, indices: list[int]) -> list[dict[str, Any]]:
    """Rows of a tokenised split, in the order of ``indices``."""
    cols = ds[indices]
    return [{k: cols[k][i] for k in cols} for i in range(len(indices))]


# ----------------------------------------------------------------------------------------------------
# training order
class TrainOrder:
    """Deterministic order: epoch e is ``randperm(n)`` seeded with ``seed + e``; optimizer step s of the
    epoch uses the global batch at ``s * global_batch``; micro-batch m of rank r is a contiguous slice of
    it. The state to resume is just (epoch, step in epoch)."""

    def __init__(self, n: int, micro: int, world: int, accumulation: int, seed: int) -> None:
        self.n, self.micro, self.world, self.accumulation, self.seed = n, micro, world, accumulation, seed
        self.global_batch = micro * world * accumulation
        self.steps_per_epoch = n // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training split has {n} pairs, fewer than one global batch of {self.global_batch} "
                f"(per_device_train_batch_size={micro} x world size {world} x gradient_accumulation_steps="
                f"{accumulation}); lower the batch size or add data"
            )
        self._epoch = -1
        self._perm: list[int] = []

    def micro_batch(self, epoch: int, step_in_epoch: int, micro_index: int, rank: int) -> list[int]:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm, self._epoch = torch.randperm(self.n, generator=g).tolist(), epoch
        start = step_in_epoch * self.global_batch + (micro_index * self.world + rank) * self.micro
        return self._perm[start:start + self.micro]


def total_steps(cfg: TrainConfig, order: TrainOrder) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.num_train_epochs * order.steps_per_epoch))


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
