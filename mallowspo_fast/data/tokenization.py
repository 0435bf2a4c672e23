"""Tokenisation of normalised preference / unpaired rows into prompt and completion ids.

Rules (see the README, Preference data):
- Conversational rows render with the tokenizer's chat template (ChatML when it has none): the prompt
  with ``add_generation_prompt=True``, the completion as the rest of the full conversation's text.
  Standard rows are plain text: prompt text, then completion text + EOS (unless it already ends so); the
  special tokens the tokenizer itself puts in front of a text (a BOS) lead the prompt.
- Prompt and prompt+completion are tokenised jointly; the completion ids are the joint ids after the
  prompt ids. Where BPE merges across the boundary the joint ids do not start with the prompt ids: the
  completion is then tokenised on its own (the text stays exact) and the row is counted and reported
  once per call.
- Truncation: ``max_prompt_length`` keeps the first (``truncation_mode="keep_start"``) or last
  (``"keep_end"``) prompt tokens. Then, with ``max_length``: in ``keep_start`` mode completions are cut
  at their end to fit and rows whose prompt alone fills ``max_length`` are dropped (counted); in
  ``keep_end`` mode the prompt loses its start so that the longer completion fits (at least one prompt
  token stays) and completions still too long are cut at their end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import datasets

from .distributed import main_process_first
from .loading import AnyDataset, _clip_procs
from .tokenizer import DEFAULT_CHAT_TEMPLATE

logger = logging.getLogger("mallowspo_fast.data")

TRUNCATION_MODES = ("keep_start", "keep_end")
IDS = datasets.List(datasets.Value("int32"))
_CONSUMED = (
    "prompt",
    "chosen",
    "rejected",
    "completion",
    "is_conversational",
    "tools",
    "chat_template_kwargs",
)
_CODE_HASH = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
_streaming_warned: set[str] = set()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A stable hash of everything that changes token ids (vocabulary, merges, specials, template)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [
        backend.to_str() if backend is not None else datasets.fingerprint.Hasher.hash(tokenizer),
        str(getattr(tokenizer, "chat_template", None)),
        json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str),
    ]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


def _prefix_special_ids(tokenizer: Any) -> list[int]:
    """Ids the tokenizer puts in front of every text by itself (a BOS), empty for most BPE tokenizers."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k : k + len(plain)] == plain:
            return list(full[:k])
    return []


def _check_args(
    tokenizer: Any, max_length: int | None, max_prompt_length: int | None, truncation_mode: str
) -> None:
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, found {truncation_mode!r}")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
        raise ValueError(f"max_length must be an int >= 2 or None, found {max_length!r}")
    if max_prompt_length is not None and (not isinstance(max_prompt_length, int) or max_prompt_length < 1):
        raise ValueError(f"max_prompt_length must be an int >= 1 or None, found {max_prompt_length!r}")
    if getattr(tokenizer, "eos_token", None) is None:
        raise ValueError("the tokenizer has no eos_token: standard rows need one to end completions")


class _RowTokenizer:
    """Renders and tokenises one batch of canonical rows (kept picklable for num_proc workers)."""

    def __init__(
        self, tokenizer: Any, max_length: int | None, max_prompt_length: int | None, truncation_mode: str
    ) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.truncation_mode = truncation_mode
        self.template = getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
        self.prefix = _prefix_special_ids(tokenizer)

    def _chat(self, messages: list, row_tools: Any, kwargs: Any, generation: bool) -> str:
        tools = json.loads(row_tools) if isinstance(row_tools, str) and row_tools.strip() else row_tools
        return self.tokenizer.apply_chat_template(
            messages,
            tools=tools or None,
            chat_template=self.template,
            add_generation_prompt=generation,
            tokenize=False,
            **(kwargs or {}),
        )

    def render(
        self, prompt: list, completions: Sequence[list], conversational: bool, tools: Any, kwargs: Any
    ) -> tuple[str, list[str]] | str:
        """(prompt text, completion texts), or the reason the row cannot be rendered."""
        if conversational:
            prompt_text = self._chat(prompt, tools, kwargs, True)
            texts = []
            for completion in completions:
                full = self._chat(prompt + completion, tools, kwargs, False)
                if not full.startswith(prompt_text):
                    return "chat template does not extend the prompt"
                texts.append(full[len(prompt_text) :])
            return prompt_text, texts
        eos = self.tokenizer.eos_token
        prompt_text = "".join(m["content"] for m in prompt)
        texts = []
        for completion in completions:
            text = "".join(m["content"] for m in completion)
            texts.append(text if text.endswith(eos) else text + eos)
        return prompt_text, texts

    def truncate(self, prompt_ids: list[int], completions: list[list[int]]) -> tuple[list, list] | str:
        keep_start = self.truncation_mode == "keep_start"
        mp, limit = self.max_prompt_length, self.max_length
        if mp is not None and len(prompt_ids) > mp:
            prompt_ids = prompt_ids[:mp] if keep_start else prompt_ids[-mp:]
        if limit is None:
            return prompt_ids, completions
        if keep_start and len(prompt_ids) >= limit:
            return "prompt fills max_length"
        if not keep_start:
            room = max(1, limit - max(len(c) for c in completions))
            prompt_ids = prompt_ids[-room:] if len(prompt_ids) > room else prompt_ids
        budget = limit - len(prompt_ids)
        return prompt_ids, [c[:budget] for c in completions]

    def __call__(self, batch: dict[str, list], completion_keys: Sequence[str]) -> dict[str, list]:
        n = len(batch["prompt"])
        tools = batch.get("tools", [None] * n)
        kwargs = batch.get("chat_template_kwargs", [None] * n)
        rendered = [
            self.render(
                batch["prompt"][i],
                [batch[k][i] for k in completion_keys],
                bool(batch["is_conversational"][i]),
                tools[i],
                kwargs[i],
            )
            for i in range(n)
        ]
        ok = [i for i, r in enumerate(rendered) if not isinstance(r, str)]
        tok = self.tokenizer
        prompt_ids = tok([rendered[i][0] for i in ok], add_special_tokens=False)["input_ids"] if ok else []
        joint = [
            tok([rendered[i][0] + rendered[i][1][j] for i in ok], add_special_tokens=False)["input_ids"]
            if ok
            else []
            for j in range(len(completion_keys))
        ]
        out: dict[str, list] = {"prompt_ids": [[] for _ in range(n)], "_drop": [""] * n, "_mismatch": [0] * n}
        for k in completion_keys:
            out[f"{k}_ids"] = [[] for _ in range(n)]
        for i, r in enumerate(rendered):
            if isinstance(r, str):
                out["_drop"][i] = r
        for slot, i in enumerate(ok):
            p = prompt_ids[slot]
            comps = []
            for j in range(len(completion_keys)):
                full = joint[j][slot]
                if full[: len(p)] == p:
                    comps.append(full[len(p) :])
                else:
                    out["_mismatch"][i] += 1
                    comps.append(tok(rendered[i][1][j], add_special_tokens=False)["input_ids"])
            conversational = bool(batch["is_conversational"][i])
            p = list(p) if conversational else self.prefix + list(p)
            if not p:
                out["_drop"][i] = "empty prompt"
                continue
            result = self.truncate(p, comps)
            if isinstance(result, str):
                out["_drop"][i] = result
                continue
            out["prompt_ids"][i] = result[0]
            for k, c in zip(completion_keys, result[1]):
                out[f"{k}_ids"][i] = c
        return out


def _streamed_row(row: dict, rows: _RowTokenizer, keys: Sequence[str]) -> dict:
    out = {k: v[0] for k, v in rows({k: [v] for k, v in row.items()}, keys).items()}
    events = (
        (out["_drop"], f"dropping rows: {out['_drop']}"),
        (out["_mismatch"], "BPE merges across the prompt/completion boundary: completion tokenised alone"),
    )
    for happened, message in events:
        if happened and message not in _streaming_warned:
            _streaming_warned.add(message)
            logger.warning("streamed rows, %s (warned once)", message)
    return out


# ----------------------------------------------------------------------------------------------------
# the on-disk cache of a map / filter result, with a key and checksums
CHECKSUM_SUFFIX = ".checksums.json"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (cache and checkpoint checksums)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cache_candidates(ds: datasets.Dataset, fingerprint: str) -> tuple[Path | None, list[Path]]:
    """The checksum file and the existing `datasets` cache files of the transform keyed ``fingerprint``
    (``cache-<fingerprint>.arrow`` or its ``_<rank>_of_<n>`` shards next to the input's files), or
    (None, []) when the input has no cache files (in memory) or caching is off."""
    if not ds.cache_files or not datasets.is_caching_enabled():
        return None, []
    directory = Path(ds.cache_files[0]["filename"]).parent
    files = sorted(directory.glob(f"cache-{fingerprint}*.arrow"))
    return directory / f"cache-{fingerprint}{CHECKSUM_SUFFIX}", files


def cache_problem(checksums: Path, files: list[Path], fingerprint: str) -> str | None:
    """Why the cache ``files`` of ``fingerprint`` cannot be used (None when they can): no checksum file,
    another key, a file missing from or unknown to the checksum file, a wrong size or sha256."""
    if not checksums.is_file():
        return f"no {checksums.name} (written by an older version, or the write was cut short)"
    try:
        saved = json.loads(checksums.read_text(encoding="utf-8"))
        key, expected = saved["key"], saved["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {checksums.name} ({e})"
    if key != fingerprint:
        return f"{checksums.name} is keyed {key!r}, expected {fingerprint!r}"
    for f in files:
        entry = expected.get(f.name)
        if entry is None:
            return f"{f.name} is not listed in {checksums.name} (a foreign file)"
        size = f.stat().st_size
        if size != entry["size"]:
            return f"{f.name} has {size} bytes, expected {entry['size']} (truncated or replaced)"
        if sha256_file(f) != entry["sha256"]:
            return f"{f.name} does not match its sha256 checksum (a foreign or damaged file)"
    return None


def _write_checksums(checksums: Path, result: datasets.Dataset, fingerprint: str) -> None:
    files = [Path(c["filename"]) for c in result.cache_files if Path(c["filename"]).name.startswith(
        f"cache-{fingerprint}")]
    if not files:
        return
    entries = {f.name: {"size": f.stat().st_size, "sha256": sha256_file(f)} for f in files}
    tmp = checksums.with_name(checksums.name + ".tmp")
    tmp.write_text(json.dumps({"key": fingerprint, "files": entries}, indent=1), encoding="utf-8")
    os.replace(tmp, checksums)


def verified_cache(ds: datasets.Dataset, fingerprint: str, load_from_cache_file: bool | None,
                   run: Callable[[bool | None], datasets.Dataset], what: str) -> datasets.Dataset:
    """``run(load_from_cache_file)`` (a ``Dataset.map`` / ``filter`` with ``new_fingerprint=fingerprint``)
    reading its `datasets` cache only after checking it against the key and checksums written with it.
    A truncated, foreign or unlisted cache file is reported, deleted and rebuilt, never read."""
    checksums, files = _cache_candidates(ds, fingerprint)
    if checksums is None or not files or load_from_cache_file is False:
        result = run(load_from_cache_file)
    else:
        problem = cache_problem(checksums, files, fingerprint)
        if problem is None:
            return run(load_from_cache_file)
        logger.warning("the %s cache in %s is not usable: %s; rebuilding it", what, checksums.parent, problem)
        for f in files:
            f.unlink(missing_ok=True)
        result = run(False)
    if checksums is not None:
        _write_checksums(checksums, result, fingerprint)
    return result


def _tokenize(
    ds: AnyDataset,
    tokenizer: Any,
    keys: Sequence[str],
    max_length: int | None,
    max_prompt_length: int | None,
    truncation_mode: str,
    num_proc: int | None,
    load_from_cache_file: bool | None,
) -> AnyDataset:
    _check_args(tokenizer, max_length, max_prompt_length, truncation_mode)
    rows = _RowTokenizer(tokenizer, max_length, max_prompt_length, truncation_mode)
    columns = ds.column_names
    sample_keys = columns if columns is not None else list(next(iter(ds.take(1))).keys())
    missing = [c for c in ("prompt", *keys, "is_conversational") if c not in sample_keys]
    if missing:
        raise ValueError(
            f"expected normalised rows (from load_preference_data / load_unpaired_data); "
            f"missing columns {missing}, found {sample_keys}"
        )
    consumed = [c for c in sample_keys if c in _CONSUMED]
    id_columns = ["prompt_ids", *(f"{k}_ids" for k in keys)]

    if isinstance(ds, datasets.IterableDataset):
        out = ds.map(_streamed_row, remove_columns=consumed, fn_kwargs={"rows": rows, "keys": keys})
        out = out.filter(lambda drop: not drop, input_columns="_drop").remove_columns(["_drop", "_mismatch"])
        if "index" not in sample_keys:
            out = out.map(lambda _, i: {"index": i}, with_indices=True)
        return out

    kept = {k: v for k, v in ds.features.items() if k not in consumed}
    features = datasets.Features(
        {
            **kept,
            **{c: IDS for c in id_columns},
            "_drop": datasets.Value("string"),
            "_mismatch": datasets.Value("int32"),
        }
    )
    fingerprint = datasets.fingerprint.Hasher.hash(
        (
            ds._fingerprint,
            tokenizer_fingerprint(tokenizer),
            tuple(keys),
            max_length,
            max_prompt_length,
            truncation_mode,
            _CODE_HASH,
        )
    )
    with main_process_first("tokenize"):
        mapped = verified_cache(
            ds,
            fingerprint,
            load_from_cache_file,
            lambda load: ds.map(
                rows,
                batched=True,
                remove_columns=consumed,
                features=features,
                fn_kwargs={"completion_keys": keys},
                num_proc=_clip_procs(num_proc, len(ds)),
                new_fingerprint=fingerprint,
                load_from_cache_file=load,
                desc="Tokenising",
            ),
            "tokenised data",
        )
    mismatches = sum(mapped["_mismatch"])
    if mismatches:
        logger.warning(
            "%d completion(s) in %d rows: BPE merges across the prompt/completion boundary; "
            "these completions were tokenised on their own",
            mismatches,
            len(ds),
        )
    drops = Counter(d for d in mapped["_drop"] if d)
    if drops:
        logger.warning(
            "dropped %d of %d rows at tokenisation: %s",
            sum(drops.values()),
            len(ds),
            ", ".join(f"{n} {reason}" for reason, n in drops.most_common()),
        )
        if sum(drops.values()) == len(ds):
            raise ValueError(
                f"every row was dropped at tokenisation ({dict(drops)}); "
                f"max_length={max_length}, max_prompt_length={max_prompt_length}"
            )
        kept_fp = datasets.fingerprint.Hasher.hash((fingerprint, "kept rows"))
        with main_process_first("tokenize"):
            mapped = verified_cache(
                mapped,
                kept_fp,
                load_from_cache_file,
                lambda load: mapped.filter(
                    lambda drop: not drop, input_columns="_drop", new_fingerprint=kept_fp, load_from_cache_file=load
                ),
                "tokenised data (kept rows)",
            )
    mapped = mapped.remove_columns(["_drop", "_mismatch"])
    if "index" not in mapped.column_names:
        mapped = mapped.add_column(
            "index",
            list(range(len(mapped))),
            new_fingerprint=datasets.fingerprint.Hasher.hash((fingerprint, "index")),
        )
    return mapped


def tokenize_preference_data(
    ds: AnyDataset,
    tokenizer: Any,
    *,
    max_length: int | None = 1024,
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_start",
    num_proc: int | None = None,
    load_from_cache_file: bool | None = None,
) -> AnyDataset:
    """Tokenise normalised preference rows (the output of :func:`load_preference_data`).

    Args:
        ds: rows with ``prompt``, ``chosen``, ``rejected``, ``is_conversational`` (optional ``tools``,
            ``chat_template_kwargs``); a Dataset or a streamed IterableDataset.
        tokenizer: a `transformers` tokenizer with an eos_token.
        max_length: limit on prompt + completion tokens (None: no limit).
        max_prompt_length: limit on prompt tokens (None: no limit).
        truncation_mode: ``"keep_start"`` or ``"keep_end"`` (module docstring).
        num_proc: processes for ``Dataset.map``; results are cached by the `datasets` fingerprint of the
            input, the tokenizer and these arguments; under torch.distributed rank 0 computes first.
        load_from_cache_file: passed to ``Dataset.map`` (None: the `datasets` default).

    Returns:
        The dataset with ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (completion ids, EOS / end of
        turn included) and ``index`` (position in the result, unless the input has one), plus the
        passthrough columns; the text columns are removed. Dropped rows are counted in a warning.

    Raises:
        ValueError: an unknown ``truncation_mode``, a ``max_length`` below 2 or ``max_prompt_length``
            below 1, a tokenizer without an EOS token, rows missing the normalised columns, or every
            row dropped by truncation.

    Examples:
        >>> ids = tokenize_preference_data(ds, tok, max_length=1024, max_prompt_length=512)
        >>> batch = PreferenceCollator(tok.pad_token_id)([ids[0], ids[1]])
    """
    return _tokenize(
        ds,
        tokenizer,
        ("chosen", "rejected"),
        max_length,
        max_prompt_length,
        truncation_mode,
        num_proc,
        load_from_cache_file,
    )


def tokenize_unpaired_data(
    ds: AnyDataset,
    tokenizer: Any,
    *,
    max_length: int | None = 1024,
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_start",
    num_proc: int | None = None,
    load_from_cache_file: bool | None = None,
) -> AnyDataset:
    """The unpaired analogue of :func:`tokenize_preference_data`: ``prompt_ids``, ``completion_ids``,
    ``label`` and ``index``.

    Args:
        ds: rows with ``prompt``, ``completion``, ``label``, ``is_conversational`` (the output of
            :func:`load_unpaired_data`).
        tokenizer: a `transformers` tokenizer with an eos_token.
        max_length: limit on prompt + completion tokens (None: no limit).
        max_prompt_length: limit on prompt tokens (None: no limit).
        truncation_mode: ``"keep_start"`` or ``"keep_end"``.
        num_proc: processes for ``Dataset.map``.
        load_from_cache_file: passed to ``Dataset.map``.

    Returns:
        The dataset with ``prompt_ids``, ``completion_ids``, ``label``, ``index`` and the passthrough
        columns.

    Raises:
        ValueError: as :func:`tokenize_preference_data`.

    Examples:
        >>> ids = tokenize_unpaired_data(load_unpaired_data("kto.json"), tok, max_length=1024)
    """
    return _tokenize(
        ds,
        tokenizer,
        ("completion",),
        max_length,
        max_prompt_length,
        truncation_mode,
        num_proc,
        load_from_cache_file,
    )
