"""The reference model: precomputed per-example values (cached on disk) or a live inference engine.

Precompute: one pass over a split before training writes, per pair, the reference log-probs and mean
token entropies of chosen and rejected (and the token counts); for KTO, per row, those of the completion
and of its KL completion (the pairing is fixed per split at tokenisation, so a row's KL row is known before
training, and the two halves of a ``data.KTOCollator`` batch land in the two columns). The pass runs on the
policy engine itself before its first step (reference = initial policy) or on a temporary engine for
``ref_model_name_or_path``, so no reference model is held during training. Results are cached under
``ref_cache_dir`` keyed by a hash of the model identity, the tokenised data and the settings that change the
values (for KTO also the KL pairing's seed).

Live: the reference has its own DeepSpeed inference engine (ZeRO-3 when training is ZeRO-3, parameters
optionally offloaded to CPU) and runs one no-grad forward per training micro-batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import losses
from . import batches
from .launch import DistState, any_rank, barrier
from .step import ReferenceBatch, forward_logprobs, to_device

logger = logging.getLogger("mallowspo_fast.trainer")
_FIELDS = ("chosen_logps", "rejected_logps", "chosen_entropy", "rejected_entropy", "chosen_num_tokens",
           "rejected_num_tokens")


@dataclass
class ReferenceTable:
    """Reference values of every pair of a split, [N] each (float32; token counts int64). For KTO the
    ``chosen_*`` columns hold each row's completion and the ``rejected_*`` columns its KL completion, as the
    two halves of a live KTO forward do (:meth:`ReferenceBatch.from_forward`)."""

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_entropy: torch.Tensor
    rejected_entropy: torch.Tensor
    chosen_num_tokens: torch.Tensor
    rejected_num_tokens: torch.Tensor
    vocab_size: int

    def batch(self, index: torch.Tensor, device: torch.device) -> ReferenceBatch:
        idx = index.cpu()
        return ReferenceBatch(self.chosen_logps[idx].to(device), self.rejected_logps[idx].to(device),
                              self.chosen_entropy[idx].to(device), self.rejected_entropy[idx].to(device),
                              self.vocab_size)

    def pair_entropy(self) -> torch.Tensor:
        return losses.pair_entropy(self.chosen_entropy, self.rejected_entropy, self.vocab_size)

    def empty_pairs(self) -> torch.Tensor:
        return losses.empty_response_pairs(self.chosen_num_tokens, self.rejected_num_tokens)

    def auto_phi_star(self) -> float:
        """φ* making the mean dispersion weight 1 over this split (spec §2, phi_star='auto')."""
        return losses.auto_phi_star(self.pair_entropy(), empty_pairs=self.empty_pairs())

    def to_dict(self) -> dict[str, Any]:
        return {**{f: getattr(self, f) for f in _FIELDS}, "vocab_size": self.vocab_size}


def model_identity(source: str | None, model_config: dict | None, seed: int, init_state: str | None = None) -> dict:
    """What determines the reference weights: a directory (with its weight files' sizes and times), or a
    fresh config and seed."""
    if source is not None:
        ident: dict[str, Any] = {"source": os.path.abspath(source) if os.path.isdir(source) else source}
        if os.path.isdir(source):
            ident["files"] = sorted(
                (f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in Path(source).iterdir()
                if f.suffix in (".safetensors", ".bin", ".json") and f.is_file()
            )
        return ident
    return {"model_config": model_config, "seed": seed, "init": init_state}


def cache_key(identity: dict, data_fingerprint: str, split: str, *, bf16: bool, max_length: int | None,
              max_prompt_length: int | None, truncation_mode: str, kl_pairing_seed: int | None = None) -> str:
    """The cache key of a split's reference values: the model, the tokenised data and the settings that
    change the values (``kl_pairing_seed``: KTO only, it decides which completion each row's KL row scores)."""
    settings = {
        "model": identity, "data": data_fingerprint, "split": split, "bf16": bf16,
        "max_length": max_length, "max_prompt_length": max_prompt_length,
        "truncation_mode": truncation_mode, "version": 1,
    }
    if kl_pairing_seed is not None:
        settings["kl_pairing_seed"] = kl_pairing_seed
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:20]


@torch.no_grad()
def compute_table(model: Any, ds: Any, collator: Any, state: DistState, *, batch_size: int, backend: str,
                  progress_bar: bool, desc: str = "reference pass") -> ReferenceTable:
    """Reference values for every row of ``ds`` (sharded over ranks in batches of ``batch_size`` per rank,
    gathered on every rank); ``backend`` is the config's ``logprob_backend``."""
    was_training = model.training
    model.eval()
    sh = batches.shard(len(ds), batch_size, state)
    local: dict[str, list[torch.Tensor]] = {f: [] for f in _FIELDS}
    vocab = 0
    bar = _progress(len(sh.batches), desc) if progress_bar and state.is_main else None
    for indices in sh.batches:
        batch = to_device(collator(batches.rows(ds, indices)), state.device)
        out = forward_logprobs(model, batch, backend=backend)
        vocab = out.vocab_size
        for name, value in (("logps", out.logps), ("entropy", out.entropy), ("num_tokens", out.num_tokens)):
            w, r = value.detach().chunk(2)
            local[f"chosen_{name}"].append(w)
            local[f"rejected_{name}"].append(r)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    model.train(was_training)
    full = batches.gather_examples(local, sh, state)
    return ReferenceTable(**{f: full[f].float() if "num_tokens" not in f else full[f].long() for f in _FIELDS},
                          vocab_size=vocab)


def _progress(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def table_checksum(values: dict[str, Any]) -> str:
    """sha256 over the fields of a reference table (names, dtypes, shapes, bytes) and its vocabulary size."""
    h = hashlib.sha256()
    for f in _FIELDS:
        t = values[f].detach().cpu().contiguous()
        h.update(f"{f}:{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.numpy().tobytes())
    h.update(str(int(values["vocab_size"])).encode())
    return h.hexdigest()


def read_cached_table(path: Path, key: str, rows: int) -> ReferenceTable | str:
    """The table cached at ``path``, or why it cannot be used: unreadable (e.g. truncated), another key
    (a foreign file), missing fields, a checksum mismatch, or a row count that is not the split's."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any failure to read means the file is unusable: rebuild it
        return f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if not isinstance(saved, dict):
        return f"not a reference table (a {type(saved).__name__})"
    if saved.get("key") != key:
        return f"keyed {saved.get('key')!r}, expected {key!r} (a file of another model, data or settings)"
    missing = [f for f in (*_FIELDS, "vocab_size", "checksum") if f not in saved]
    if missing:
        return f"missing fields {missing}"
    if saved["checksum"] != table_checksum(saved):
        return "its values do not match their sha256 checksum"
    if len(saved["chosen_logps"]) != rows:
        return f"{len(saved['chosen_logps'])} rows, the split has {rows}"
    return ReferenceTable(**{f: saved[f] for f in _FIELDS}, vocab_size=int(saved["vocab_size"]))


def load_or_compute(model_fn: Any, ds: Any, collator: Any, state: DistState, key: str, desc: str, *,
                    cache_dir: str, **pass_settings: Any) -> ReferenceTable:
    """The table cached in ``cache_dir`` for ``key``, or compute it with ``model_fn()`` and cache it (rank 0
    writes); ``pass_settings`` are the keyword arguments of :func:`compute_table`.

    The file carries its key and a checksum of its values; a file that cannot be read, belongs to another
    key or fails its checksum is reported and rebuilt (every rank agrees before the collective pass)."""
    path = Path(cache_dir) / f"reference_{key}.pt"
    cached: ReferenceTable | str | None = read_cached_table(path, key, len(ds)) if path.is_file() else None
    if isinstance(cached, str):
        logger.warning("reference cache %s is not usable: %s; recomputing it", path, cached)
    if not any_rank(not isinstance(cached, ReferenceTable), state):
        logger.info("reference values for %s loaded from %s", desc, path)
        return cached
    table = compute_table(model_fn(), ds, collator, state, desc=desc, **pass_settings)
    if state.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        values = {**table.to_dict(), "vocab_size": torch.tensor(table.vocab_size)}
        torch.save({**values, "key": key, "checksum": table_checksum(values)}, tmp)
        os.replace(tmp, path)
    barrier(state)
    return table


class LiveReference:
    """A reference engine evaluated on each training batch (no gradients, no optimizer)."""

    def __init__(self, engine: Any, backend: str) -> None:
        self.engine = engine
        self.backend = backend
        self.engine.eval()

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor]) -> ReferenceBatch:
        return ReferenceBatch.from_forward(forward_logprobs(self.engine, batch, backend=self.backend))
