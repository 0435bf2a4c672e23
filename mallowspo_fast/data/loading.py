"""Loading preference and unpaired data from files, folders, `save_to_disk` output or the hub."""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import datasets

from .distributed import main_process_first
from .formats import (
    PAIRED_FIELDS,
    PAIRED_FORMATS,
    UNPAIRED_FIELDS,
    UNPAIRED_FORMATS,
    RowFormat,
    detect_format,
    normalise_row,
    skip_category,
)
from .raw_rows import dataset_from_rows, load_data_file, unreadable_as_value_error

logger = logging.getLogger("mallowspo_fast.data")

AnyDataset = datasets.Dataset | datasets.IterableDataset
FILE_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "csv",
    ".arrow": "arrow",
    ".txt": "text",
}
MESSAGE = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})
_SAMPLE_ROWS = 16
# Cached map results must be invalidated when the normalisation code changes.
_CODE_HASH = hashlib.sha256(
    b"".join((Path(__file__).parent / f).read_bytes() for f in ("formats.py", "loading.py"))
).hexdigest()[:16]
_streaming_warned: set[str] = set()


@dataclass
class DataReport:
    """What loading did: the detected format and the rows skipped, by reason.

    Returned by :func:`normalise_dataset`; ``summary()`` gives the text the loaders log.

    Attributes:
        format: name of the detected format (a row of :data:`PAIRED_FORMATS` / :data:`UNPAIRED_FORMATS`).
        num_input_rows: rows read (None for a stream, checked as it is read).
        num_rows: rows kept (None for a stream).
        skipped: reason -> number of rows skipped for it.
        first_skipped: reason -> indices of the first rows skipped for it.
    """

    format: str
    num_input_rows: int | None
    num_rows: int | None
    skipped: dict[str, int] = field(default_factory=dict)
    first_skipped: dict[str, list[int]] = field(default_factory=dict)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        if self.num_input_rows is None:
            return f"format {self.format} (streaming: rows are checked as they are read)"
        lines = [f"format {self.format}: {self.num_rows} of {self.num_input_rows} rows kept"]
        for reason, count in sorted(self.skipped.items(), key=lambda kv: -kv[1]):
            rows = ", ".join(map(str, self.first_skipped.get(reason, [])))
            lines.append(f"  skipped {count} row(s): {reason} (first rows: {rows})")
        return "\n".join(lines)


class Splits(NamedTuple):
    """A training split and an optional evaluation split (``Splits(train, eval)``, a named tuple).

    Attributes:
        train: the training rows (a ``datasets.Dataset`` or, streamed, an ``IterableDataset``).
        eval: the evaluation rows, or None when no evaluation split was asked for.
    """

    train: AnyDataset
    eval: AnyDataset | None


# ----------------------------------------------------------------------------------------------------
# raw loading
def bundled_dataset_path(name: str = "dpo_en_demo.json") -> str:
    """Path of a data file shipped with the package (``mallowspo_fast/resources``).

    Args:
        name: file name; the default is the 300 ShareGPT pairs of the offline demo.

    Returns:
        The absolute path, as a string.

    Raises:
        FileNotFoundError: no bundled file of that name (the message lists the available ones).

    Examples:
        >>> ds = load_preference_data(bundled_dataset_path())
    """
    path = Path(__file__).resolve().parent.parent / "resources" / name
    if not path.is_file():
        available = sorted(p.name for p in path.parent.glob("*.json*")) if path.parent.is_dir() else []
        raise FileNotFoundError(f"no bundled dataset named {name!r} in {path.parent}; available: {available}")
    return str(path)


def _is_saved_dataset(path: Path) -> bool:
    return any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def load_raw_dataset(
    source: Any,
    *,
    split: str | None = "train",
    streaming: bool = False,
    name: str | None = None,
    **load_kwargs: Any,
) -> AnyDataset:
    """A `datasets` dataset as stored, before format detection.

    ``source`` is a Dataset / IterableDataset / DatasetDict, a list of dicts, a data file (json, jsonl,
    parquet, csv, tsv, arrow), a folder of data files, a ``save_to_disk`` folder, or a hub name (loaded
    with ``datasets.load_dataset``; ``name`` is the hub configuration). ``split`` accepts slicing such as
    ``"train[:10%]"`` wherever `datasets` does.

    Args:
        source: what to load (see above).
        split: the split to return (None: a ``DatasetDict`` source is returned whole).
        streaming: return an ``IterableDataset`` read lazily.
        name: the hub configuration (``datasets.load_dataset(source, name)``).
        **load_kwargs: passed to ``datasets.load_dataset``.

    Returns:
        A ``datasets.Dataset`` (or ``IterableDataset`` when streaming) with the stored columns.

    Raises:
        FileNotFoundError: a path that looks local but does not exist (it is not sent to the hub).
        ValueError: a file `datasets` cannot parse, or a split that does not exist.
    """
    if isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in source:
            raise ValueError(f"split {split!r} not in the dataset; available splits: {sorted(source)}")
        source = source[split]
    if isinstance(source, datasets.Dataset):
        return source.to_iterable_dataset() if streaming else source
    if isinstance(source, datasets.IterableDataset):
        return source
    if isinstance(source, list):
        bad = next((i for i, r in enumerate(source) if not isinstance(r, Mapping)), None)
        if bad is not None:
            raise TypeError(f"a list source must hold dict rows; row {bad} is a {type(source[bad]).__name__}")
        ds = dataset_from_rows(source)
        return ds.to_iterable_dataset() if streaming else ds
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"source must be a path, a hub name, a list of dicts or a datasets object, "
            f"found {type(source).__name__}"
        )
    path = Path(source).expanduser()
    if path.is_dir() and _is_saved_dataset(path):
        loaded = datasets.load_from_disk(str(path))
        return load_raw_dataset(loaded, split=split, streaming=streaming)
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"{path}: unknown data file type {path.suffix!r}; expected one of {sorted(FILE_BUILDERS)}"
            )
        if builder == "csv" and path.suffix.lower() == ".tsv":
            load_kwargs.setdefault("delimiter", "\t")
        loaded = load_data_file(path, builder, split, streaming, load_kwargs)
        return load_raw_dataset(loaded, split=None) if isinstance(loaded, list) else loaded
    if path.is_dir():
        with unreadable_as_value_error(path):
            return datasets.load_dataset(str(path), split=split, streaming=streaming, **load_kwargs)
    text = str(source)
    if path.suffix.lower() in FILE_BUILDERS or text.startswith((".", "/", "~")):
        raise FileNotFoundError(f"no such data file or folder: {path}")
    # Anything else is a hub dataset name: the real load_dataset path (cached or downloaded).
    return datasets.load_dataset(text, name, split=split, streaming=streaming, **load_kwargs)


# ----------------------------------------------------------------------------------------------------
# normalisation
def _columns(ds: AnyDataset, sample: Sequence[Mapping[str, Any]]) -> list[str]:
    if ds.column_names is not None:
        return list(ds.column_names)
    return list(dict.fromkeys(k for row in sample for k in row))


def _sample(ds: AnyDataset) -> list[dict[str, Any]]:
    if isinstance(ds, datasets.IterableDataset):
        return list(ds.take(_SAMPLE_ROWS))
    return [ds[i] for i in range(min(_SAMPLE_ROWS, len(ds)))]


def apply_column_mapping(
    ds: AnyDataset, column_mapping: Mapping[str, str] | None, fields: Sequence[str]
) -> AnyDataset:
    """Rename source columns to canonical names: ``{"prompt": "question", "chosen": "response_j"}``."""
    if not column_mapping:
        return ds
    if not isinstance(column_mapping, Mapping):
        raise TypeError(
            f"column_mapping must map canonical names to column names, found {type(column_mapping).__name__}"
        )
    columns = _columns(ds, _sample(ds))
    unknown = [k for k in column_mapping if k not in fields]
    if unknown:
        hint = " (the mapping goes canonical name -> your column)" if set(unknown) <= set(columns) else ""
        raise ValueError(f"column_mapping keys must be among {list(fields)}, found {unknown}{hint}")
    missing = {k: v for k, v in column_mapping.items() if v not in columns}
    if missing:
        raise ValueError(
            f"column_mapping names columns that do not exist: {missing}; columns found: {columns}"
        )
    renames = {src: dst for dst, src in column_mapping.items() if src != dst}
    clashes = [dst for src, dst in renames.items() if dst in columns and dst not in renames]
    if clashes:
        raise ValueError(
            f"column_mapping would overwrite existing columns {clashes}; columns found: {columns}"
        )
    return ds.rename_columns(renames) if renames else ds


def _output_features(ds: datasets.Dataset, fmt: RowFormat, paired: bool) -> datasets.Features:
    kept = {k: v for k, v in ds.features.items() if k not in fmt.columns}
    canonical = (
        {"prompt": MESSAGE, "chosen": MESSAGE, "rejected": MESSAGE}
        if paired
        else {"prompt": MESSAGE, "completion": MESSAGE, "label": datasets.Value("bool")}
    )
    return datasets.Features(
        {**kept, **canonical, "is_conversational": datasets.Value("bool"), "_skip": datasets.Value("string")}
    )


def _placeholder(paired: bool) -> dict[str, Any]:
    """The values a skipped row carries until it is filtered out (typed like a real row)."""
    if paired:
        return {"prompt": [], "chosen": [], "rejected": [], "is_conversational": False}
    return {"prompt": [], "completion": [], "label": False, "is_conversational": False}


def _normalise_batch(batch: dict[str, list], fmt: RowFormat, paired: bool) -> dict:
    keys = ("prompt", "chosen", "rejected") if paired else ("prompt", "completion", "label")
    out: dict[str, list] = {k: [] for k in (*keys, "is_conversational", "_skip")}
    names = list(batch)
    for j in range(len(batch[names[0]])):
        row, reason = normalise_row(fmt, {k: batch[k][j] for k in names})
        if row is None:
            row = _placeholder(paired)
        for k in (*keys, "is_conversational"):
            out[k].append(row[k])
        out["_skip"].append(reason or "")
    return out


def _normalise_one(row: dict, index: int, fmt: RowFormat, paired: bool, strict: bool) -> dict:
    out, reason = normalise_row(fmt, row)
    if out is None:
        if strict:
            raise ValueError(f"row {index}: {reason} (format {fmt.name}; strict mode, streamed dataset)")
        category = skip_category(reason)
        if category not in _streaming_warned:
            _streaming_warned.add(category)
            logger.warning("skipping streamed rows: %s (warned once per reason)", reason)
        out = _placeholder(paired)
    return {**out, "_skip": reason or ""}


def normalise_dataset(
    ds: AnyDataset,
    *,
    paired: bool = True,
    column_mapping: Mapping[str, str] | None = None,
    strict: bool = False,
    num_proc: int | None = None,
) -> tuple[AnyDataset, DataReport]:
    """Detect the format of ``ds`` and convert its rows to the canonical layout.

    Returns the dataset (same kind as the input) and a :class:`DataReport`. Malformed rows are skipped
    and counted by reason, or raise ValueError naming the row in strict mode; an empty result raises.

    Args:
        ds: raw rows, e.g. from :func:`load_raw_dataset`.
        paired: detect among the paired formats (True) or the unpaired (KTO) ones.
        column_mapping: canonical name -> column of ``ds`` (see :func:`load_preference_data`).
        strict: raise at the first malformed row instead of skipping it.
        num_proc: processes for the map.

    Returns:
        ``(dataset, report)``: the canonical rows and a :class:`DataReport`.

    Raises:
        ValueError: no format matches (the message lists the columns found and every format tried), a
            bad column mapping, a malformed row in strict mode, or no row left.

    Examples:
        >>> ds, report = normalise_dataset(load_raw_dataset("pairs.jsonl"))
        >>> print(report.summary())
    """
    fields = PAIRED_FIELDS if paired else UNPAIRED_FIELDS
    ds = apply_column_mapping(ds, column_mapping, fields)
    sample = _sample(ds)
    if not sample:
        raise ValueError("the dataset has no rows")
    fmt = detect_format(_columns(ds, sample), sample, PAIRED_FORMATS if paired else UNPAIRED_FORMATS)
    consumed = [c for c in fmt.columns if c in _columns(ds, sample)]

    if isinstance(ds, datasets.IterableDataset):
        out = ds.map(
            _normalise_one,
            with_indices=True,
            remove_columns=consumed,
            fn_kwargs={"fmt": fmt, "paired": paired, "strict": strict},
        )
        out = out.filter(lambda skip: not skip, input_columns="_skip").remove_columns("_skip")
        return out, DataReport(fmt.name, None, None)

    fingerprint = datasets.fingerprint.Hasher.hash((ds._fingerprint, fmt.name, paired, _CODE_HASH))
    with main_process_first("normalise"):
        mapped = ds.map(
            _normalise_batch,
            batched=True,
            remove_columns=consumed,
            features=_output_features(ds, fmt, paired),
            num_proc=_clip_procs(num_proc, len(ds)),
            fn_kwargs={"fmt": fmt, "paired": paired},
            new_fingerprint=fingerprint,
            desc=f"Normalising {fmt.name} rows",
        )
    skips = mapped["_skip"]
    bad = [i for i, s in enumerate(skips) if s]
    report = DataReport(fmt.name, len(ds), len(ds) - len(bad))
    if bad and strict:
        raise ValueError(f"row {bad[0]}: {skips[bad[0]]} (format {fmt.name}; strict mode)")
    for i in bad:
        category = skip_category(skips[i])
        report.skipped[category] = report.skipped.get(category, 0) + 1
        report.first_skipped.setdefault(category, [])
        if len(report.first_skipped[category]) < 5:
            report.first_skipped[category].append(i)
    if not report.num_rows:
        raise ValueError(f"no usable rows left after skipping malformed ones:\n{report.summary()}")
    if bad:
        logger.warning("%s", report.summary())
        mapped = mapped.filter(
            lambda skip: not skip, input_columns="_skip", num_proc=_clip_procs(num_proc, len(ds))
        )
    return mapped.remove_columns("_skip"), report


def _clip_procs(num_proc: int | None, n: int) -> int | None:
    procs = min(num_proc or 1, n)
    return procs if procs > 1 else None


# ----------------------------------------------------------------------------------------------------
# public loaders
def load_preference_data(
    source: Any,
    *,
    column_mapping: Mapping[str, str] | None = None,
    split: str | None = "train",
    strict: bool = False,
    streaming: bool = False,
    num_proc: int | None = None,
    name: str | None = None,
    **load_kwargs: Any,
) -> AnyDataset:
    """Load paired preference data normalised to conversational explicit-prompt rows.

    Args:
        source: a data file (json, jsonl, parquet, csv, tsv), a folder of data files, a ``save_to_disk``
            folder, a hub name, a list of dicts, or a `datasets` object.
        column_mapping: canonical name -> column, e.g. ``{"prompt": "question", "chosen": "response_j",
            "rejected": "response_k"}``. Canonical names: prompt, chosen, rejected, conversations, system.
        split: the split to load (slicing like ``"train[:100]"`` works for files and the hub).
        strict: raise ValueError on the first malformed row (with its index) instead of skipping it.
        streaming: return an ``IterableDataset`` read lazily (rows are checked as they stream).
        num_proc: processes for the normalisation map.
        name: the hub configuration (``datasets.load_dataset(source, name)``).
        **load_kwargs: passed to ``datasets.load_dataset``.

    Returns:
        A dataset with ``prompt``, ``chosen``, ``rejected`` (lists of ``{"role", "content"}``),
        ``is_conversational`` (False: render as plain text + EOS) and every other source column.

    Raises:
        ValueError: unknown format (listing the columns found and the formats tried), a bad column
            mapping, a malformed row in strict mode, or no rows left after skipping malformed ones.
        FileNotFoundError: a local-looking path that does not exist.

    Examples:
        >>> ds = load_preference_data("se.parquet", column_mapping={"prompt": "question",
        ...                           "chosen": "response_j", "rejected": "response_k"})
        >>> row = ds[0]              # row["prompt"]: a list of {"role", "content"} messages
    """
    with main_process_first("load"):
        raw = load_raw_dataset(source, split=split, streaming=streaming, name=name, **load_kwargs)
    ds, report = normalise_dataset(
        raw, paired=True, column_mapping=column_mapping, strict=strict, num_proc=num_proc
    )
    logger.info("%s: %s", source if isinstance(source, (str, os.PathLike)) else "dataset", report.summary())
    return ds


def load_unpaired_data(
    source: Any,
    *,
    column_mapping: Mapping[str, str] | None = None,
    split: str | None = "train",
    strict: bool = False,
    streaming: bool = False,
    num_proc: int | None = None,
    name: str | None = None,
    **load_kwargs: Any,
) -> AnyDataset:
    """Load unpaired (KTO) data as rows ``prompt``, ``completion`` (message lists), ``label`` (bool).

    Accepts ``{"prompt", "completion", "label"}`` (strings or message lists) and ``{"messages",
    "label"}`` (the trailing assistant message(s) are the completion). Arguments as in
    :func:`load_preference_data`; canonical names for the mapping: prompt, completion, label, messages,
    system (e.g. ``{"label": "kto_tag"}``).

    Args:
        source: as in :func:`load_preference_data`.
        column_mapping: canonical name -> column.
        split: the split to load.
        strict: raise on the first malformed row instead of skipping it.
        streaming: return an ``IterableDataset`` read lazily.
        num_proc: processes for the normalisation map.
        name: the hub configuration.
        **load_kwargs: passed to ``datasets.load_dataset``.

    Returns:
        A dataset with ``prompt``, ``completion`` (message lists), ``label`` (bool),
        ``is_conversational`` and the other source columns.

    Raises:
        ValueError: paired data or another unknown layout (listing the columns found and expected), a
            label that is not a boolean in strict mode, or no row left.

    Examples:
        >>> ds = load_unpaired_data("kto.json", column_mapping={"label": "kto_tag"})
    """
    with main_process_first("load"):
        raw = load_raw_dataset(source, split=split, streaming=streaming, name=name, **load_kwargs)
    ds, report = normalise_dataset(
        raw, paired=False, column_mapping=column_mapping, strict=strict, num_proc=num_proc
    )
    logger.info("%s: %s", source if isinstance(source, (str, os.PathLike)) else "dataset", report.summary())
    return ds


def unpair_preference_data(ds: datasets.Dataset) -> datasets.Dataset:
    """Unpaired rows from normalised pairs: each chosen becomes a True row, each rejected a False row.

    Args:
        ds: output of :func:`load_preference_data` (not streamed).

    Returns:
        A dataset of 2·len(ds) rows ``prompt``, ``completion``, ``label``, ``is_conversational``: all
        chosen rows first, then all rejected ones.

    Raises:
        ValueError: ``ds`` lacks the normalised ``prompt`` / ``chosen`` / ``rejected`` columns.
    """
    missing = {"prompt", "chosen", "rejected"} - set(ds.column_names)
    if missing:
        raise ValueError(
            f"expected normalised preference rows; missing columns {sorted(missing)} among {ds.column_names}"
        )

    def split_rows(batch: dict[str, list]) -> dict[str, list]:
        n = len(batch["prompt"])
        return {
            "prompt": batch["prompt"] * 2,
            "completion": batch["chosen"] + batch["rejected"],
            "label": [True] * n + [False] * n,
            "is_conversational": batch["is_conversational"] * 2,
        }

    return ds.map(split_rows, batched=True, remove_columns=ds.column_names)


def train_eval_split(
    ds: AnyDataset,
    *,
    eval_ratio: float | None = None,
    eval_size: int | None = None,
    seed: int = 0,
) -> Splits:
    """Hold out an evaluation split, by ratio (shuffled with ``seed``) or by a count of rows.

    A streamed dataset can only be split by ``eval_size``: its first rows become the eval split.

    Args:
        ds: the rows to split.
        eval_ratio: fraction in (0, 1) held out (at least one row); give this or ``eval_size``.
        eval_size: number of rows held out.
        seed: seed of the shuffle before a map-style split.

    Returns:
        :class:`Splits` ``(train, eval)``.

    Raises:
        ValueError: both or neither of ``eval_ratio`` / ``eval_size``, a value out of range, a ratio
            on a streamed dataset, or an eval split that would leave no training row.

    Examples:
        >>> train, eval = train_eval_split(ds, eval_ratio=0.05, seed=0)
    """
    if (eval_ratio is None) == (eval_size is None):
        raise ValueError(
            f"give exactly one of eval_ratio and eval_size, found eval_ratio={eval_ratio}, "
            f"eval_size={eval_size}"
        )
    if eval_ratio is not None and not 0.0 < eval_ratio < 1.0:
        raise ValueError(f"eval_ratio must be in (0, 1), found {eval_ratio}")
    if eval_size is not None and eval_size < 1:
        raise ValueError(f"eval_size must be >= 1, found {eval_size}")
    if isinstance(ds, datasets.IterableDataset):
        if eval_size is None:
            raise ValueError(
                "a streamed dataset has no length: split it with eval_size (a row count) "
                "or give an eval_source file"
            )
        return Splits(ds.skip(eval_size), ds.take(eval_size))
    n = len(ds)
    n_eval = eval_size if eval_size is not None else max(1, round(n * eval_ratio))
    if n_eval >= n:
        raise ValueError(f"the eval split ({n_eval} rows) would leave no training rows out of {n}")
    parts = ds.train_test_split(test_size=n_eval, shuffle=True, seed=seed)
    return Splits(parts["train"], parts["test"])


def load_preference_splits(
    source: Any,
    *,
    eval_source: Any = None,
    eval_ratio: float | None = None,
    eval_size: int | None = None,
    seed: int = 0,
    unpaired: bool = False,
    **kwargs: Any,
) -> Splits:
    """Training and evaluation data: from a second source, by ratio / count, or no eval split at all.

    ``kwargs`` go to :func:`load_preference_data` (or :func:`load_unpaired_data` when ``unpaired``)
    for both sources.

    Args:
        source: the training data (any source :func:`load_preference_data` takes).
        eval_source: separate evaluation data; exclusive with ``eval_ratio`` / ``eval_size``.
        eval_ratio: fraction of the training rows held out (see :func:`train_eval_split`).
        eval_size: number of training rows held out.
        seed: seed of the held-out sample.
        unpaired: load unpaired (KTO) rows instead of pairs.
        **kwargs: passed to the loader for both sources.

    Returns:
        :class:`Splits` ``(train, eval)``; ``eval`` is None when no evaluation data was asked for.

    Raises:
        ValueError: ``eval_source`` together with a ratio or size, and whatever the loader raises.

    Examples:
        >>> train, eval = load_preference_splits("pairs.jsonl", eval_ratio=0.05, seed=0)
    """
    loader = load_unpaired_data if unpaired else load_preference_data
    train = loader(source, **kwargs)
    if eval_source is not None:
        if eval_ratio is not None or eval_size is not None:
            raise ValueError("give either eval_source or eval_ratio/eval_size, not both")
        return Splits(train, loader(eval_source, **kwargs))
    if eval_ratio is None and eval_size is None:
        return Splits(train, None)
    return train_eval_split(train, eval_ratio=eval_ratio, eval_size=eval_size, seed=seed)


def count_labels(ds: datasets.Dataset) -> Counter:
    """Desirable / undesirable counts of unpaired rows (KTO weights them by these)."""
    return Counter(ds["label"])
