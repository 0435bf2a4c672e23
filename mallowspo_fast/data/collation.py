"""Batches of token ids for the trainer: padded [2B, L] pairs, a padding-free packed layout, unpaired rows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..ops.logprobs import IGNORE_INDEX  # the one definition (re-exported by mallowspo_fast.data)

# Precomputed per-example reference values travel with the batch (trainer's precompute_ref_log_probs).
REF_PREFIX = "ref_"


def _ids(row: Mapping[str, Any], key: str, where: int) -> list[int]:
    try:
        value = row[key]
    except KeyError:
        raise ValueError(
            f"batch row {where} has no {key!r}; found keys {sorted(row)} "
            f"(collate the output of tokenize_preference_data)"
        ) from None
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise TypeError(
            f"batch row {where}: {key!r} must be a list of token ids, found {type(value).__name__}"
        )
    return list(value)


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def _check_rows(rows: Sequence[Mapping[str, Any]]) -> None:
    if not isinstance(rows, Sequence) or not rows:
        raise ValueError(f"expected a non-empty list of rows, found {rows!r:.80}")


def passthrough_columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """``index`` as int64 [B] and every ``ref_*`` column as float32 [B], when all rows have them."""
    out: dict[str, torch.Tensor] = {}
    keys = [k for k in rows[0] if k == "index" or k.startswith(REF_PREFIX)]
    for key in keys:
        values = [row.get(key) for row in rows]
        if any(v is None for v in values):
            missing = [i for i, v in enumerate(values) if v is None]
            raise ValueError(
                f"column {key!r} is missing (None) in batch rows {missing[:5]}: precomputed "
                f"columns must be filled for every row"
            )
        values = [v.item() if isinstance(v, torch.Tensor) else v for v in values]
        out[key] = torch.tensor(values, dtype=torch.int64 if key == "index" else torch.float32)
    return out


def _pad(sequences: Sequence[list[int]], length: int, value: int) -> torch.Tensor:
    out = torch.full((len(sequences), length), value, dtype=torch.int64)
    for i, seq in enumerate(sequences):
        if seq:
            out[i, : len(seq)] = torch.tensor(seq, dtype=torch.int64)
    return out


def _padded_batch(
    prompts: Sequence[list[int]],
    completions: Sequence[list[int]],
    pad_token_id: int,
    pad_to_multiple_of: int | None,
) -> dict[str, torch.Tensor]:
    sequences = [p + c for p, c in zip(prompts, completions)]
    length = _round_up(max(len(s) for s in sequences), pad_to_multiple_of)
    input_ids = _pad(sequences, length, pad_token_id)
    attention_mask = _pad([[1] * len(s) for s in sequences], length, 0)
    labels = _pad([[IGNORE_INDEX] * len(p) + c for p, c in zip(prompts, completions)], length, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _check_pad(pad_token_id: Any, pad_to_multiple_of: Any) -> None:
    if not isinstance(pad_token_id, int) or isinstance(pad_token_id, bool) or pad_token_id < 0:
        raise ValueError(
            f"pad_token_id must be a non-negative int, found {pad_token_id!r} "
            f"(set tokenizer.pad_token, e.g. to the eos token)"
        )
    if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
        raise ValueError(f"pad_to_multiple_of must be a positive int or None, found {pad_to_multiple_of!r}")


@dataclass
class PreferenceCollator:
    """Collate tokenised preference rows into one right-padded batch: all chosen rows, then all rejected.

    Input rows: ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (from tokenize_preference_data);
    optional ``index`` and ``ref_*`` columns. Output for B rows, L = the longest prompt+completion
    rounded up to ``pad_to_multiple_of``:

    - ``input_ids`` int64 [2B, L]: rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected; right
      padding with ``pad_token_id``.
    - ``attention_mask`` int64 [2B, L]: 1 on tokens, 0 on padding.
    - ``labels`` int64 [2B, L]: -100 on prompt and padding; ``labels[i, t] == input_ids[i, t]`` on
      completion tokens (not shifted: the consumer shifts, logits[:, :-1] predicting labels[:, 1:]).
    - ``index`` int64 [B] when the rows have it (the row's position in the tokenised dataset).
    - every ``ref_*`` column as float32 [B] (e.g. ``ref_chosen_logps``, ``ref_rejected_logps``,
      ``ref_chosen_entropy``, ``ref_rejected_entropy``) when the rows have it.

    Args:
        pad_token_id: id written on padding positions of ``input_ids`` (an int >= 0).
        pad_to_multiple_of: round L up to a multiple of this (None: no rounding).

    Raises:
        ValueError: a bad ``pad_token_id`` / ``pad_to_multiple_of``; when called, an empty list of rows
            or a row without ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids`` (naming the row).
        TypeError: ids that are not lists of ints (naming the row and the column).

    Examples:
        >>> collate = PreferenceCollator(tok.pad_token_id, pad_to_multiple_of=8)
        >>> loader = torch.utils.data.DataLoader(ids, batch_size=8, collate_fn=collate)
        >>> batch = next(iter(loader))            # batch["input_ids"].shape == (16, L)
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        _check_pad(self.pad_token_id, self.pad_to_multiple_of)

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        _check_rows(rows)
        prompts = [_ids(r, "prompt_ids", i) for i, r in enumerate(rows)]
        chosen = [_ids(r, "chosen_ids", i) for i, r in enumerate(rows)]
        rejected = [_ids(r, "rejected_ids", i) for i, r in enumerate(rows)]
        batch = _padded_batch(
            prompts + prompts, chosen + rejected, self.pad_token_id, self.pad_to_multiple_of
        )
        batch.update(passthrough_columns(rows))
        return batch


@dataclass
class PackedPreferenceCollator:
    """Padding-free layout: the 2B sequences (chosen first, then rejected) concatenated in one row.

    For attention implementations that take ``position_ids`` restarting per sequence (flash-attention
    varlen through `transformers`). Output, N = total tokens:

    - ``input_ids`` int64 [1, N], ``labels`` int64 [1, N] (-100 on prompt tokens, which include each
      sequence's first token, so no sequence is scored from its predecessor's last token).
    - ``position_ids`` int64 [1, N]: 0, 1, ... restarting at every sequence.
    - ``segment_ids`` int64 [1, N]: the sequence number of each token, 0..2B-1 (chosen b is b,
      rejected b is B + b); per-sequence sums are ``zeros(2B).index_add_(0, segment_ids[0], x)``.
    - ``cu_seq_lens`` int32 [2B + 1]: cumulative sequence lengths starting at 0.
    - with ``return_flash_attn_kwargs``: ``cu_seq_lens_q``/``cu_seq_lens_k`` (int32) and
      ``max_length_q``/``max_length_k`` (int), the keyword names `transformers` forwards to flash-attention.
    - ``index`` and ``ref_*`` as in :class:`PreferenceCollator`.

    Args:
        return_flash_attn_kwargs: also return the flash-attention keywords above.

    Raises:
        ValueError: an empty list of rows or a row without the id columns (naming the row).

    Examples:
        >>> batch = PackedPreferenceCollator(return_flash_attn_kwargs=True)(rows)
        >>> out = model(batch["input_ids"], position_ids=batch["position_ids"])
    """

    return_flash_attn_kwargs: bool = False

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        _check_rows(rows)
        prompts = [_ids(r, "prompt_ids", i) for i, r in enumerate(rows)]
        completions = [_ids(r, "chosen_ids", i) for i, r in enumerate(rows)]
        completions += [_ids(r, "rejected_ids", i) for i, r in enumerate(rows)]
        batch = pack_sequences(prompts + prompts, completions, self.return_flash_attn_kwargs)
        batch.update(passthrough_columns(rows))
        return batch


def pack_sequences(
    prompts: Sequence[list[int]], completions: Sequence[list[int]], return_flash_attn_kwargs: bool = False
) -> dict[str, Any]:
    """Concatenate prompt+completion sequences into the padding-free layout of PackedPreferenceCollator.

    Args:
        prompts: one list of prompt ids per sequence.
        completions: one list of completion ids per sequence (same count as ``prompts``).
        return_flash_attn_kwargs: also return ``cu_seq_lens_q/k`` and ``max_length_q/k``.

    Returns:
        A dict with ``input_ids``, ``labels``, ``position_ids``, ``segment_ids`` int64 [1, N] and
        ``cu_seq_lens`` int32 [S + 1] (S sequences), as described in :class:`PackedPreferenceCollator`.

    Raises:
        ValueError: a sequence with an empty prompt (packing needs a prompt token to separate
            sequences).
    """
    input_ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    segments: list[int] = []
    lengths: list[int] = []
    for s, (p, c) in enumerate(zip(prompts, completions)):
        if not p:
            raise ValueError(
                f"sequence {s} has an empty prompt: packing needs a prompt token to separate sequences"
            )
        n = len(p) + len(c)
        input_ids += p + c
        labels += [IGNORE_INDEX] * len(p) + c
        positions += range(n)
        segments += [s] * n
        lengths.append(n)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
    batch: dict[str, Any] = {
        "input_ids": torch.tensor([input_ids], dtype=torch.int64),
        "labels": torch.tensor([labels], dtype=torch.int64),
        "position_ids": torch.tensor([positions], dtype=torch.int64),
        "segment_ids": torch.tensor([segments], dtype=torch.int64),
        "cu_seq_lens": cu,
    }
    if return_flash_attn_kwargs:
        batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths))
    return batch


@dataclass
class UnpairedCollator:
    """Collate tokenised unpaired (KTO) rows: ``prompt_ids``, ``completion_ids``, ``label``.

    Output for B rows, right padded as in :class:`PreferenceCollator`:

    - ``input_ids``, ``attention_mask``, ``labels`` int64 [B, L]: prompt_b + completion_b.
    - ``label`` bool [B]: True for desirable completions.
    - with ``kl_rows`` (default) and B >= 2: ``kl_input_ids``, ``kl_attention_mask``, ``kl_labels``
      int64 [B, L']: prompt_b + completion_{(b-1) mod B}, mismatched pairs for KTO's KL estimate z0.
    - ``index`` and ``ref_*`` columns as in :class:`PreferenceCollator`.

    Args:
        pad_token_id: id written on padding positions.
        pad_to_multiple_of: round the lengths up to a multiple of this (None: no rounding).
        kl_rows: also build the mismatched KL rows.

    Raises:
        ValueError: bad padding arguments; when called, an empty list of rows or a row without the
            id columns.
        TypeError: a ``label`` that is not a bool (naming the row).

    Examples:
        >>> batch = UnpairedCollator(tok.pad_token_id)(rows)   # batch["label"]: bool [B]
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    kl_rows: bool = True

    def __post_init__(self) -> None:
        _check_pad(self.pad_token_id, self.pad_to_multiple_of)

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        _check_rows(rows)
        prompts = [_ids(r, "prompt_ids", i) for i, r in enumerate(rows)]
        completions = [_ids(r, "completion_ids", i) for i, r in enumerate(rows)]
        labels = []
        for i, r in enumerate(rows):
            value = r.get("label")
            if isinstance(value, torch.Tensor):
                value = value.item()
            if not isinstance(value, bool):
                raise TypeError(f"batch row {i}: 'label' must be a bool, found {value!r}")
            labels.append(value)
        batch = _padded_batch(prompts, completions, self.pad_token_id, self.pad_to_multiple_of)
        batch["label"] = torch.tensor(labels, dtype=torch.bool)
        if self.kl_rows and len(rows) >= 2:
            shifted = completions[-1:] + completions[:-1]
            kl = _padded_batch(prompts, shifted, self.pad_token_id, self.pad_to_multiple_of)
            batch.update({f"kl_{k}": v for k, v in kl.items()})
        batch.update(passthrough_columns(rows))
        return batch


def kl_completions(completions: Sequence[Sequence[int]], seed: int) -> list[list[int]]:
    """For each row, another row's completion: the mismatched pairs of KTO's KL estimate z0.

    Rows are visited in a ``randperm(N)`` order seeded with ``seed`` and each takes the completion of
    the row before it in that cycle (never its own for N >= 2). The pairing is fixed per dataset, like
    TRL's KL dataset, so it does not depend on batching or sharding; the random cycle keeps rows of one
    prompt (e.g. a split preference pair, stored side by side) from scoring each other's completion.

    Args:
        completions: the completion token ids of every row of a split (``completion_ids``).
        seed: seed of the permutation.

    Returns:
        One list of token ids per row, to store as the ``kl_completion_ids`` column read by
        :class:`KTOCollator`.

    Examples:
        >>> ds = ds.add_column("kl_completion_ids", kl_completions(ds["completion_ids"], seed=42))
    """
    perm = torch.randperm(len(completions), generator=torch.Generator().manual_seed(seed)).tolist()
    out: list[list[int]] = [[] for _ in completions]
    for j, i in enumerate(perm):
        out[i] = list(completions[perm[j - 1]])
    return out


@dataclass
class KTOCollator:
    """Collate unpaired (KTO) rows into one [2B, L] batch: the completions, then their KL rows.

    Rows 0..B-1 are prompt_b + completion_b, rows B..2B-1 prompt_b + kl_completion_b, right padded to
    one length so that a model scores both halves in a single forward (the trainer's layout; a
    :class:`PreferenceCollator` batch has the same shape). Input rows: ``prompt_ids``,
    ``completion_ids``, ``kl_completion_ids`` (from :func:`kl_completions`) and ``label``. Output:

    - ``input_ids``, ``attention_mask``, ``labels`` int64 [2B, L], as in :class:`UnpairedCollator`.
    - ``label`` bool [B]: True for desirable completions.
    - ``index`` and ``ref_*`` columns as in :class:`PreferenceCollator`.

    Args:
        pad_token_id: id written on padding positions.
        pad_to_multiple_of: round L up to a multiple of this (None: no rounding).

    Raises:
        ValueError: bad padding arguments; when called, an empty list of rows or a row without the
            id columns (``kl_completion_ids`` included).
        TypeError: a ``label`` that is not a bool, or ids that are not lists of ints (naming the row).

    Examples:
        >>> batch = KTOCollator(tok.pad_token_id)(rows)   # batch["input_ids"]: [2B, L]
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        self._collate = UnpairedCollator(self.pad_token_id, self.pad_to_multiple_of, kl_rows=False)

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self._collate(rows)
        missing = [i for i, r in enumerate(rows) if "kl_completion_ids" not in r]
        if missing:
            raise ValueError(f"batch rows {missing[:5]} have no 'kl_completion_ids' (the mismatched completion of "
                             "each row: add the column with kl_completions)")
        kl = self._collate([{"prompt_ids": r["prompt_ids"], "completion_ids": r["kl_completion_ids"],
                             "label": r["label"]} for r in rows])
        length = max(batch["input_ids"].shape[1], kl["input_ids"].shape[1])
        fill = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        for key, value in fill.items():
            a, b = (torch.nn.functional.pad(t[key], (0, length - t[key].shape[1]), value=value) for t in (batch, kl))
            batch[key] = torch.cat([a, b])
        return batch
