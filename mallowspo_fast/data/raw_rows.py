"""Rows to a `datasets` table exactly as given, and data files read with errors that name the file.

`datasets` alone loses information in three ways that the loaders must not: ``Dataset.from_list`` keeps
only the keys of the first row; a column whose type changes between rows is stored as JSON text, and
strings that happen to be valid JSON ("0", '"hi"') are then decoded; and its JSON reader fails on
integers beyond 64 bits with a message that does not name the file.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa


def dataset_from_rows(rows: Sequence[Mapping[str, Any]]) -> datasets.Dataset:
    """A Dataset holding exactly the given rows. Every row gets every key (``from_list`` takes the columns
    of the first row only). A column whose values Arrow cannot hold in one type is stored as JSON text,
    encoded here: `datasets` would keep a string that is valid JSON ("0", '"hi"') as is and decode it."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    columns = {k: [r.get(k) for r in rows] for k in keys}
    mixed = []
    for k, values in columns.items():
        try:
            pa.array(values)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            mixed.append(k)
    if not mixed:
        return datasets.Dataset.from_dict(columns)
    plain = datasets.Dataset.from_dict({k: v for k, v in columns.items() if k not in mixed})
    features = datasets.Features({k: plain.features[k] if k not in mixed else datasets.Json() for k in keys})
    for k in mixed:
        columns[k] = [None if v is None else json.dumps(_json_number_safe(v)) for v in columns[k]]
    return datasets.Dataset.from_dict(columns, features=features)


def _json_number_safe(value: Any) -> Any:
    """Integers beyond 64 bits become floats (the JSON text decoder of `datasets` reads no larger ones and
    would keep their text as a string instead)."""
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        return float(value) if abs(value) < 2**1023 else math.copysign(math.inf, value)
    if isinstance(value, Mapping):
        return {k: _json_number_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_number_safe(v) for v in value]
    return value


def read_json_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON Lines file or of a JSON array of objects (ValueError naming the line or row)."""
    text = path.read_text(encoding="utf-8")
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()
        ]
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, Mapping)), None)
    if bad is not None:
        raise ValueError(f"{path}: row {bad} is a {type(rows[bad]).__name__}, expected a JSON object")
    return rows


@contextlib.contextmanager
def unreadable_as_value_error(path: Path):
    """A file `datasets` cannot parse (a broken JSON line, a line that is not an object) raises ValueError
    naming the file and the parser's reason."""
    try:
        yield
    except (datasets.exceptions.DatasetGenerationError, pa.ArrowException, ValueError) as err:
        cause = err.__cause__ or err
        raise ValueError(f"{path}: cannot read the data file ({type(cause).__name__}: {cause})") from err


def load_data_file(path: Path, builder: str, split: str | None, streaming: bool, load_kwargs: dict[str, Any]):
    """``datasets.load_dataset(builder, data_files=path)``, or the rows themselves (a list) for a JSON file
    `datasets` cannot hold exactly: columns whose type changes between rows (stored as JSON text, whose
    strings would be decoded) or integers beyond 64 bits (which its reader refuses)."""
    exact_json = builder == "json" and not streaming and split in (None, "train") and not load_kwargs
    try:
        with unreadable_as_value_error(path):
            ds = datasets.load_dataset(builder, data_files=str(path), split=split, streaming=streaming,
                                       **load_kwargs)
    except ValueError:
        if not exact_json:
            raise
        return read_json_rows(path)
    if exact_json and "Json(" in repr(ds.features):
        return read_json_rows(path)
    return ds
