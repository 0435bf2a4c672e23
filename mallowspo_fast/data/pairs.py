"""Preference-pair generation: from scored responses, from single responses, validation, JSONL export."""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REJECTION_STRATEGIES = ("perturb", "truncate", "shuffle")
FILLERS = ("um", "like", "basically", "I guess", "maybe", "sort of", "you know")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass
class PreferencePair:
    """One comparison; :meth:`to_dict` gives the standard ``{"prompt", "chosen", "rejected"}`` row.

    Args:
        prompt: the prompt text.
        chosen: the preferred response.
        rejected: the other response.
        chosen_score: the chosen response's score, when it came from scores.
        rejected_score: the rejected response's score.
        metadata: extra fields, written as ``meta_<key>`` columns.
    """

    prompt: str
    chosen: str
    rejected: str
    chosen_score: float | None = None
    rejected_score: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, include_scores: bool = True) -> dict[str, Any]:
        row: dict[str, Any] = {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}
        if include_scores:
            row.update(chosen_score=self.chosen_score, rejected_score=self.rejected_score)
            row.update({f"meta_{k}": v for k, v in self.metadata.items()})
        return row


def _field(record: Mapping[str, Any], key: str, i: int, kind: type | tuple) -> Any:
    if not isinstance(record, Mapping):
        raise TypeError(f"record {i}: expected a dict, found {type(record).__name__}")
    if key not in record:
        raise ValueError(f"record {i} has no {key!r}; found keys {sorted(record)}")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise TypeError(f"record {i}: {key!r} must be {names}, found {type(value).__name__} ({value!r:.60})")
    return value


def pairs_from_scored(
    records: Iterable[Mapping[str, Any]],
    *,
    prompt_key: str = "prompt",
    response_key: str = "response",
    score_key: str = "score",
    score_fn: Callable[[str, str], float] | None = None,
    min_score_gap: float = 0.0,
    pairs_per_prompt: int = 1,
) -> list[PreferencePair]:
    """Pairs from several scored responses per prompt: best vs worst, then 2nd best vs 2nd worst, ...

    Records are grouped by prompt (first-appearance order); identical responses count once (the higher
    score). A pair is kept when its score gap is strictly greater than ``min_score_gap`` (ties never
    make a pair). ``score_fn(prompt, response)`` scores records instead of ``score_key`` (e.g. a rubric
    or a judge). Missing or non-finite scores raise ValueError naming the record.

    Args:
        records: dicts with a prompt, a response and (without ``score_fn``) a score.
        prompt_key: the prompt's key in a record.
        response_key: the response's key.
        score_key: the score's key (ignored with ``score_fn``).
        score_fn: ``score_fn(prompt, response) -> float`` instead of the stored score.
        min_score_gap: keep a pair only when its score gap is strictly greater (>= 0).
        pairs_per_prompt: pairs taken per prompt at most (>= 1).

    Returns:
        The pairs, as :class:`PreferencePair` with their scores.

    Raises:
        ValueError: a bad ``pairs_per_prompt`` / ``min_score_gap``, a record without a key, or a
            non-finite score (naming the record).
        TypeError: a record that is not a dict, or a field of the wrong type (naming the record).

    Examples:
        >>> pairs = pairs_from_scored(records, min_score_gap=0.5, pairs_per_prompt=1)
        >>> write_pairs_jsonl(pairs, "pairs.jsonl")
    """
    if pairs_per_prompt < 1:
        raise ValueError(f"pairs_per_prompt must be >= 1, found {pairs_per_prompt}")
    if min_score_gap < 0 or math.isnan(min_score_gap):
        raise ValueError(f"min_score_gap must be >= 0, found {min_score_gap}")
    groups: dict[str, dict[str, float]] = {}
    for i, record in enumerate(records):
        prompt = _field(record, prompt_key, i, str)
        response = _field(record, response_key, i, str)
        score = (
            score_fn(prompt, response) if score_fn is not None else _field(record, score_key, i, (int, float))
        )
        score = float(score)
        if not math.isfinite(score):
            raise ValueError(f"record {i}: score must be finite, found {score}")
        responses = groups.setdefault(prompt, {})
        responses[response] = max(score, responses.get(response, -math.inf))
    pairs = []
    for prompt, responses in groups.items():
        ranked = sorted(responses.items(), key=lambda kv: kv[1], reverse=True)
        for k in range(min(pairs_per_prompt, len(ranked) // 2)):
            (best, s_best), (worst, s_worst) = ranked[k], ranked[-1 - k]
            if s_best - s_worst > min_score_gap:
                pairs.append(PreferencePair(prompt, best, worst, s_best, s_worst, {"source": "scored"}))
    return pairs


def _truncate(text: str, ratio: float) -> str:
    words = text.split(" ")
    keep = min(len(words) - 1, max(1, int(len(words) * ratio)))
    return " ".join(words[:keep]) if keep >= 1 else text


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``: split after '.', '!' or '?' followed by whitespace.

    Args:
        text: the text to split (stripped first).

    Returns:
        The sentences, their end punctuation kept.

    Examples:
        >>> split_sentences("One. Two! Three?")
        ['One.', 'Two!', 'Three?']
    """
    return _SENTENCE_END.split(text.strip())


def _shuffle(text: str, rng: random.Random) -> str:
    units = split_sentences(text)
    joiner = " "
    if len(units) < 2:
        units = text.split(" ")
    if len(set(units)) < 2:
        return text
    original = list(units)
    for _ in range(8):
        rng.shuffle(units)
        if units != original:
            break
    if units == original:
        units = units[1:] + units[:1]
    return joiner.join(units)


def _perturb(text: str, rng: random.Random, rate: float) -> str:
    words = text.split(" ")
    out: list[str] = []
    for w in words:
        roll = rng.random()
        if roll < rate / 2 and len(words) > 3:
            continue  # dropped word
        out.append(w)
        if roll > 1 - rate:
            out.append(rng.choice(FILLERS))
    if out == words:
        out.insert(rng.randrange(len(out) + 1), rng.choice(FILLERS))
    return " ".join(out)


def pairs_from_single(
    records: Iterable[Mapping[str, Any]],
    *,
    strategy: str = "perturb",
    seed: int = 0,
    prompt_key: str = "prompt",
    response_key: str = "response",
    truncate_ratio: float = 1 / 3,
    perturb_rate: float = 0.2,
) -> list[PreferencePair]:
    """Pairs from one good response per prompt, the rejected response made from the chosen one.

    Strategies: ``"perturb"`` (drop words, insert fillers at rate ``perturb_rate``), ``"truncate"``
    (keep the first ``truncate_ratio`` of the words), ``"shuffle"`` (reorder sentences, or words for a
    single sentence). Deterministic for a given ``seed`` and record order. A response that cannot be
    changed (one word) yields an identical pair, which :func:`validate_pairs` removes.

    Args:
        records: dicts with a prompt and one good response.
        strategy: ``"perturb"``, ``"truncate"`` or ``"shuffle"``.
        seed: seed of the random changes.
        prompt_key: the prompt's key in a record.
        response_key: the response's key.
        truncate_ratio: fraction of the words kept by ``"truncate"``, in (0, 1).
        perturb_rate: rate of dropped words and inserted fillers for ``"perturb"``, in (0, 1].

    Returns:
        One :class:`PreferencePair` per record (``metadata={"source": strategy}``).

    Raises:
        ValueError: an unknown strategy, a rate out of range, or a record without a key.
        TypeError: a record that is not a dict, or a field that is not a string.

    Examples:
        >>> pairs = pairs_from_single(records, strategy="shuffle", seed=1)
        >>> kept, removed = validate_pairs(pairs, min_chars=10)
    """
    if strategy not in REJECTION_STRATEGIES:
        raise ValueError(f"strategy must be one of {REJECTION_STRATEGIES}, found {strategy!r}")
    if not 0.0 < truncate_ratio < 1.0:
        raise ValueError(f"truncate_ratio must be in (0, 1), found {truncate_ratio}")
    if not 0.0 < perturb_rate <= 1.0:
        raise ValueError(f"perturb_rate must be in (0, 1], found {perturb_rate}")
    rng = random.Random(seed)
    pairs = []
    for i, record in enumerate(records):
        prompt = _field(record, prompt_key, i, str)
        chosen = _field(record, response_key, i, str)
        if strategy == "truncate":
            rejected = _truncate(chosen, truncate_ratio)
        elif strategy == "shuffle":
            rejected = _shuffle(chosen, rng)
        else:
            rejected = _perturb(chosen, rng, perturb_rate)
        pairs.append(PreferencePair(prompt, chosen, rejected, metadata={"source": strategy}))
    return pairs


def validate_pairs(
    pairs: Sequence[PreferencePair],
    *,
    min_chars: int = 1,
    max_chars: int | None = None,
) -> tuple[list[PreferencePair], Counter]:
    """Keep pairs with a prompt, responses of ``min_chars``..``max_chars`` characters (stripped) and
    chosen != rejected.

    Args:
        pairs: the pairs to check.
        min_chars: shortest response kept, in characters after stripping.
        max_chars: longest response kept (None: no limit).

    Returns:
        ``(kept, removed)``: the kept pairs and a ``Counter`` of removed pairs by reason.

    Examples:
        >>> kept, removed = validate_pairs(pairs, min_chars=10, max_chars=4000)
        >>> removed                    # Counter({'chosen == rejected': 2})
    """
    kept, removed = [], Counter()
    for pair in pairs:
        chosen, rejected = pair.chosen.strip(), pair.rejected.strip()
        if not pair.prompt.strip():
            removed["empty prompt"] += 1
        elif chosen == rejected:
            removed["chosen == rejected"] += 1
        elif min(len(chosen), len(rejected)) < min_chars:
            removed[f"response shorter than {min_chars} chars"] += 1
        elif max_chars is not None and max(len(chosen), len(rejected)) > max_chars:
            removed[f"response longer than {max_chars} chars"] += 1
        else:
            kept.append(pair)
    return kept, removed


def write_pairs_jsonl(
    pairs: Iterable[PreferencePair], path: str | os.PathLike, *, include_scores: bool = True
) -> int:
    """Write pairs as JSONL in the standard explicit-prompt format (it loads back as ``standard_explicit``).

    Args:
        pairs: the pairs to write.
        path: the output file; its folder is created if needed.
        include_scores: also write ``chosen_score``, ``rejected_score`` and the ``meta_*`` fields.

    Returns:
        The number of lines written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for pair in pairs:
            f.write(json.dumps(pair.to_dict(include_scores), ensure_ascii=False) + "\n")
            n += 1
    return n
