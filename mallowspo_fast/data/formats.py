"""Format detection and row normalisation.

Every accepted layout of preference data is turned into one canonical row::

    {"prompt":   [{"role": ..., "content": ...}, ...],
     "chosen":   [{"role": "assistant", "content": ...}, ...],
     "rejected": [{"role": "assistant", "content": ...}, ...],
     "is_conversational": bool}

``is_conversational`` records how the row will be rendered by the tokeniser: True means the chat template,
False means plain text (prompt text followed by the completion text and EOS), as for the standard
string formats. Unpaired rows use ``completion`` and ``label`` instead of ``chosen`` and ``rejected``.

A row normaliser returns ``(row, None)`` or ``(None, reason)``: malformed rows are skipped and counted
by reason (see :mod:`mallowspo_fast.data.loading`), or raise in strict mode.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Messages = list[dict[str, str]]
RowResult = tuple[dict[str, Any] | None, str | None]

KNOWN_ROLES = ("system", "developer", "user", "assistant", "tool")
# ShareGPT / LLaMA-Factory speaker names and other common aliases.
ROLE_ALIASES = {
    "human": "user",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "observation": "tool",
    "function_call": "assistant",
}

# Canonical column names a column mapping may target.
PAIRED_FIELDS = ("prompt", "chosen", "rejected", "conversations", "system", "tools")
UNPAIRED_FIELDS = ("prompt", "completion", "label", "messages", "system", "tools")

_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ \t]?")
_HH_START = re.compile(r"^\s*(Human|Assistant):")


class RowError(ValueError):
    """A malformed row; the message is the reason used in skip summaries."""


@dataclass(frozen=True)
class RowFormat:
    """A detectable layout: the columns it needs, how to recognise a row, how to normalise one."""

    name: str
    required: tuple[str, ...]
    matches: Callable[[Mapping[str, Any]], bool]
    normalise: Callable[[Mapping[str, Any]], dict[str, Any]]
    consumed: tuple[str, ...] = field(default=())

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.required + self.consumed))


# ----------------------------------------------------------------------------------------------------
# messages
def _is_message_list(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(isinstance(m, Mapping) for m in value)


def _message(raw: Mapping[str, Any], where: str) -> dict[str, str]:
    # Keys holding None count as absent: Arrow gives every message of a column the union of the keys.
    if raw.get("role") is not None or raw.get("content") is not None:
        role, content = raw.get("role"), raw.get("content")
    elif raw.get("from") is not None or raw.get("value") is not None:
        role, content = raw.get("from"), raw.get("value")
    else:
        raise RowError(
            f"malformed message ({where}: no role/content or from/value keys, found {sorted(raw)})"
        )
    if not isinstance(role, str):
        raise RowError(f"unknown role ({where}: expected a string, found {type(role).__name__})")
    if not isinstance(content, str):
        raise RowError(f"non-string content ({where}: found {type(content).__name__})")
    role = ROLE_ALIASES.get(role.strip().lower(), role.strip().lower())
    if role not in KNOWN_ROLES:
        raise RowError(f"unknown role ({where}: {raw.get('role', raw.get('from'))!r})")
    return {"role": role, "content": content}


def to_messages(value: Any, where: str, default_role: str) -> Messages:
    """A list of messages from a message list, a single message dict or a plain string."""
    if value is None:
        raise RowError(f"missing value ({where})")
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, Mapping):
        return [_message(value, where)]
    if isinstance(value, list):
        if not value:
            raise RowError(f"empty message list ({where})")
        return [
            _message(m, f"{where}[{i}]") if isinstance(m, Mapping) else _bad_message(m, where, i)
            for i, m in enumerate(value)
        ]
    raise RowError(f"non-string content ({where}: found {type(value).__name__})")


def _bad_message(m: Any, where: str, i: int) -> dict[str, str]:
    raise RowError(f"non-string content ({where}[{i}]: expected a message dict, found {type(m).__name__})")


def _check_completion(messages: Messages, where: str) -> Messages:
    if not any(m["content"].strip() for m in messages):
        raise RowError(f"empty response ({where})")
    if messages[0]["role"] != "assistant":
        raise RowError(
            f"completion does not start with an assistant message ({where}: {messages[0]['role']!r})"
        )
    return messages


def _check_prompt(messages: Messages) -> Messages:
    if not any(m["content"].strip() for m in messages):
        raise RowError("empty prompt")
    return messages


def _check_pair(chosen: Messages, rejected: Messages) -> None:
    if [m["content"].strip() for m in chosen] == [m["content"].strip() for m in rejected]:
        raise RowError("chosen == rejected")


# ----------------------------------------------------------------------------------------------------
# implicit prompts
def looks_like_hh(text: Any) -> bool:
    """Anthropic HH strings: '\\n\\nHuman: ...\\n\\nAssistant: ...'."""
    return isinstance(text, str) and bool(_HH_START.match(text)) and "Assistant:" in text


def parse_hh(text: str, where: str = "text") -> Messages:
    """Split an Anthropic HH transcript into user/assistant turns.

    A trailing empty assistant turn (an explicit prompt ending in "Assistant:") is dropped.

    Args:
        text: ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` (the leading blank lines may be missing).
        where: what the text is, for error messages (e.g. ``"row 3, chosen"``).

    Returns:
        A list of ``{"role": "user" | "assistant", "content": str}`` messages, contents stripped.

    Raises:
        ValueError: text before the first ``Human:`` turn, or no turn at all (naming ``where``).

    Examples:
        >>> parse_hh("\\n\\nHuman: Hi\\n\\nAssistant: Hello!")
        [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello!'}]
    """
    body = "\n\n" + text.lstrip() if not text.startswith("\n\n") else text
    parts = _HH_TURN.split(body)
    if parts[0].strip():
        raise RowError(f"malformed Anthropic HH text ({where}: text before the first 'Human:' turn)")
    turns = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        turns.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    if turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
        turns.pop()
    if not turns:
        raise RowError(f"malformed Anthropic HH text ({where}: no Human/Assistant turns)")
    return turns


def split_common_prefix(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Longest common prefix as the prompt, backed off to a word boundary.

    The whitespace at the boundary goes to the completions (BPE vocabularies hold " word" tokens), and
    the boundary backs off further while either completion would be empty.

    Args:
        chosen: the full chosen text (prompt included).
        rejected: the full rejected text.

    Returns:
        ``(prompt, chosen_completion, rejected_completion)``; the prompt may be empty.

    Examples:
        >>> split_common_prefix("The sky is blue today.", "The sky is green today.")
        ('The sky is', ' blue today.', ' green today.')
    """
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1

    def at_boundary(k: int) -> bool:
        return all(k == len(s) or s[k].isspace() for s in (chosen, rejected))

    k = n
    while k > 0 and not (at_boundary(k) and k < len(chosen) and k < len(rejected)):
        k -= 1
    while k > 0 and chosen[k - 1].isspace():
        k -= 1
    return chosen[:k], chosen[k:], rejected[k:]


def split_common_messages(chosen: Messages, rejected: Messages) -> tuple[Messages, Messages, Messages]:
    """Shared leading messages as the prompt; the prompt ends before the first differing assistant turn."""
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    # The completion starts at an assistant turn: move the boundary back over shared assistant turns.
    while k > 0 and (k >= len(chosen) or chosen[k]["role"] != "assistant"):
        k -= 1
    return chosen[:k], chosen[k:], rejected[k:]


# ----------------------------------------------------------------------------------------------------
# paired row normalisers
def _extras(row: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise RowError(f"non-string content (system: found {type(system).__name__})")
    out["_system"] = system or None
    return out


def _with_system(prompt: Messages, system: str | None) -> Messages:
    if system and (not prompt or prompt[0]["role"] != "system"):
        return [{"role": "system", "content": system}, *prompt]
    return prompt


def _finish_pair(
    prompt: Messages, chosen: Messages, rejected: Messages, conversational: bool, system: str | None
) -> dict[str, Any]:
    prompt = _check_prompt(_with_system(prompt, system))
    chosen = _check_completion(chosen, "chosen")
    rejected = _check_completion(rejected, "rejected")
    _check_pair(chosen, rejected)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "is_conversational": conversational}


def _standard_explicit(row: Mapping[str, Any], chosen_key: str = "chosen", rejected_key: str = "rejected"):
    system = _extras(row)["_system"]
    prompt, chosen, rejected = row["prompt"], row[chosen_key], row[rejected_key]
    for name, value in (("prompt", prompt), (chosen_key, chosen), (rejected_key, rejected)):
        if value is None:
            raise RowError(f"missing value ({name})")
        if not isinstance(value, str):
            raise RowError(f"non-string content ({name}: found {type(value).__name__})")
    if looks_like_hh(prompt):
        turns = parse_hh(prompt, "prompt")
        return _finish_pair(turns, [_assistant(chosen)], [_assistant(rejected)], True, system)
    return _finish_pair(
        [{"role": "user", "content": prompt}],
        [_assistant(chosen, strip=False)],
        [_assistant(rejected, strip=False)],
        bool(system),
        system,
    )


def _assistant(text: str, strip: bool = True) -> dict[str, str]:
    return {"role": "assistant", "content": text.strip() if strip else text}


def _standard_implicit(row: Mapping[str, Any]):
    system = _extras(row)["_system"]
    chosen, rejected = row["chosen"], row["rejected"]
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if value is None:
            raise RowError(f"missing value ({name})")
        if not isinstance(value, str):
            raise RowError(f"non-string content ({name}: found {type(value).__name__})")
    if looks_like_hh(chosen) and looks_like_hh(rejected):
        prompt, c, r = split_common_messages(parse_hh(chosen, "chosen"), parse_hh(rejected, "rejected"))
        if not c or not r:
            raise RowError("empty response (chosen and rejected share every turn)")
        return _finish_pair(prompt, c, r, True, system)
    prompt, c, r = split_common_prefix(chosen, rejected)
    if not prompt.strip():
        raise RowError("empty prompt (chosen and rejected share no prefix)")
    return _finish_pair(
        [{"role": "user", "content": prompt}],
        [_assistant(c, strip=False)],
        [_assistant(r, strip=False)],
        bool(system),
        system,
    )


def _conversational_explicit(row: Mapping[str, Any]):
    system = _extras(row)["_system"]
    prompt = to_messages(row["prompt"], "prompt", "user")
    chosen = to_messages(row["chosen"], "chosen", "assistant")
    rejected = to_messages(row["rejected"], "rejected", "assistant")
    return _finish_pair(prompt, chosen, rejected, True, system)


def _conversational_implicit(row: Mapping[str, Any]):
    system = _extras(row)["_system"]
    chosen = to_messages(row["chosen"], "chosen", "assistant")
    rejected = to_messages(row["rejected"], "rejected", "assistant")
    prompt, c, r = split_common_messages(chosen, rejected)
    if not c or not r:
        raise RowError("chosen == rejected")
    if not any(m["content"].strip() for m in _with_system(prompt, system)):
        raise RowError("empty prompt (chosen and rejected share no leading non-empty message)")
    return _finish_pair(prompt, c, r, True, system)


def _sharegpt(row: Mapping[str, Any]):
    system = _extras(row)["_system"]
    prompt = to_messages(row["conversations"], "conversations", "user")
    chosen = to_messages(row["chosen"], "chosen", "assistant")
    rejected = to_messages(row["rejected"], "rejected", "assistant")
    return _finish_pair(prompt, chosen, rejected, True, system)


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _first_present(row: Mapping[str, Any], *keys: str) -> Any:
    for k in keys:
        if row.get(k) is not None:
            return row[k]
    return None


PAIRED_FORMATS: tuple[RowFormat, ...] = (
    RowFormat(
        "sharegpt",
        ("conversations", "chosen", "rejected"),
        lambda r: _is_message_list(r["conversations"]),
        _sharegpt,
        ("system",),
    ),
    RowFormat(
        "conversational_explicit",
        ("prompt", "chosen", "rejected"),
        lambda r: _is_message_list(r["prompt"]) or _is_message_list(r["chosen"]),
        _conversational_explicit,
        ("system",),
    ),
    RowFormat(
        "anthropic_hh_explicit",
        ("prompt", "chosen", "rejected"),
        lambda r: _is_str(r["prompt"]) and looks_like_hh(r["prompt"]),
        _standard_explicit,
        ("system",),
    ),
    RowFormat(
        "standard_explicit",
        ("prompt", "chosen", "rejected"),
        lambda r: _is_str(_first_present(r, "prompt", "chosen", "rejected")),
        _standard_explicit,
        ("system",),
    ),
    RowFormat(
        "winner_loser",
        ("prompt", "winner", "loser"),
        lambda r: _is_str(_first_present(r, "prompt", "winner", "loser")),
        lambda r: _standard_explicit(r, "winner", "loser"),
        ("system",),
    ),
    RowFormat(
        "conversational_implicit",
        ("chosen", "rejected"),
        lambda r: _is_message_list(r["chosen"]),
        _conversational_implicit,
        ("system",),
    ),
    RowFormat(
        "anthropic_hh",
        ("chosen", "rejected"),
        lambda r: looks_like_hh(r["chosen"]),
        _standard_implicit,
        ("system",),
    ),
    RowFormat(
        "standard_implicit",
        ("chosen", "rejected"),
        lambda r: _is_str(_first_present(r, "chosen", "rejected")),
        _standard_implicit,
        ("system",),
    ),
)


# ----------------------------------------------------------------------------------------------------
# unpaired row normalisers
def _label(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):  # 1.0: Arrow makes a column of 1 and 0.5 floats
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise RowError(f"label must be a boolean (found {value!r})")


def _unpaired_standard(row: Mapping[str, Any]):
    system = _extras(row)["_system"]
    prompt, completion = row["prompt"], row["completion"]
    conversational = _is_message_list(prompt) or _is_message_list(completion) or bool(system)
    if isinstance(prompt, str) and looks_like_hh(prompt):
        p, conversational = parse_hh(prompt, "prompt"), True
    else:
        p = to_messages(prompt, "prompt", "user")
    c = to_messages(completion, "completion", "assistant")
    return _finish_unpaired(p, c, _label(row["label"]), conversational, system)


def _unpaired_messages(row: Mapping[str, Any]):
    system = _extras(row)["_system"]
    messages = to_messages(row["messages"], "messages", "user")
    if not isinstance(row["messages"], list):
        raise RowError("malformed message (messages: expected a list of {role, content} dicts)")
    k = len(messages)
    while k > 0 and messages[k - 1]["role"] == "assistant":
        k -= 1
    if k == len(messages):
        raise RowError(
            f"empty response (messages: last role is {messages[-1]['role']!r}, expected 'assistant')"
        )
    return _finish_unpaired(messages[:k], messages[k:], _label(row["label"]), True, system)


def _finish_unpaired(
    prompt: Messages, completion: Messages, label: bool, conversational: bool, system: str | None
) -> dict[str, Any]:
    prompt = _check_prompt(_with_system(prompt, system))
    completion = _check_completion(completion, "completion")
    return {"prompt": prompt, "completion": completion, "label": label, "is_conversational": conversational}


UNPAIRED_FORMATS: tuple[RowFormat, ...] = (
    RowFormat(
        "unpaired_messages",
        ("messages", "label"),
        lambda r: isinstance(r["messages"], list),
        _unpaired_messages,
        ("system",),
    ),
    RowFormat(
        "unpaired_conversational",
        ("prompt", "completion", "label"),
        lambda r: _is_message_list(r["prompt"]) or _is_message_list(r["completion"]),
        _unpaired_standard,
        ("system",),
    ),
    RowFormat(
        "unpaired_standard",
        ("prompt", "completion", "label"),
        lambda r: _is_str(_first_present(r, "prompt", "completion")),
        _unpaired_standard,
        ("system",),
    ),
)


# ----------------------------------------------------------------------------------------------------
# detection
def detect_format(
    columns: Sequence[str], sample: Sequence[Mapping[str, Any]], formats: Sequence[RowFormat]
) -> RowFormat:
    """The first format whose columns are present and which recognises the first non-empty sample row.

    Raises ValueError listing the columns found and the formats tried.
    """
    cols = set(columns)
    candidates = [f for f in formats if set(f.required) <= cols]
    for fmt in candidates:
        for row in sample:
            if all(row.get(c) is None for c in fmt.required):
                continue
            try:
                if fmt.matches(row):
                    return fmt
            except (KeyError, TypeError):
                pass
            break
    tried = "; ".join(f"{f.name} ({', '.join(f.required)})" for f in formats)
    reason = "no format has all its columns" if not candidates else "the first rows match none of them"
    raise ValueError(
        f"cannot detect the data format: {reason}. Columns found: {sorted(cols)}. Formats tried: {tried}. "
        "Rename columns with column_mapping={'prompt': 'question', 'chosen': 'response_j', ...}."
    )


def normalise_row(fmt: RowFormat, row: Mapping[str, Any]) -> RowResult:
    """(canonical row, None) or (None, reason) for a malformed row."""
    try:
        return fmt.normalise(row), None
    except RowError as err:
        return None, str(err)


def skip_category(reason: str) -> str:
    """The summary bucket of a skip reason ("empty response (chosen)" -> "empty response")."""
    return reason.split(" (")[0]
