"""Fuzzed rows for every data format, through loading, format detection, normalisation and tokenisation.

Each example is a small dataset: a well-formed first row (detection reads the first rows), then a mix of
well-formed rows, rows with one field replaced by junk that no format accepts, and chosen == rejected
pairs. Well-formed rows must come out with exactly their content (and their token ids must decode back
to the rendered text); broken rows must be skipped and counted (lenient) or raise ValueError naming the
row and the field (strict). Any other exception fails the test.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fuzz_helpers import CLEAR_ERRORS, fuzz_pair, json_junk
from hypothesis import assume
from hypothesis import strategies as st

from mallowspo_fast import data
from mallowspo_fast.data.formats import looks_like_hh

# Printable text of any script, no control characters (those are covered by the junk strategies), and
# none of the markers that change a row's meaning (HH speaker tags, the tokenizer's special tokens).
_MARKERS = re.compile(r"Human:|Assistant:|<\|")
text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=12).filter(
    lambda s: s.strip() != "" and not _MARKERS.search(s)
)
ROLE_SPELLINGS = {"user": ("user", "User", "human", " HUMAN "), "system": ("system",), "assistant": ("assistant",)}


@dataclass
class Case:
    """One generated row and what loading must make of it (None: it must be rejected)."""

    row: dict[str, Any]
    expected: dict[str, Any] | None
    field: str | None = None  # the field a rejected row broke


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def asst(content: str) -> list[dict[str, str]]:
    return [msg("assistant", content)]


@st.composite
def prompt_messages(draw) -> tuple[list[dict], list[dict]]:
    """(raw messages with role aliases, normalised messages): optional system, then user/assistant turns
    ending with a user turn."""
    turns = draw(st.integers(0, 2))
    norm = [msg("system", draw(text))] if draw(st.booleans()) else []
    for _ in range(turns):
        norm += [msg("user", draw(text)), msg("assistant", draw(text))]
    norm.append(msg("user", draw(text)))
    raw = [msg(draw(st.sampled_from(ROLE_SPELLINGS[m["role"]])), m["content"]) for m in norm]
    return raw, norm


@st.composite
def two_answers(draw) -> tuple[str, str]:
    chosen, rejected = draw(text), draw(text)
    assume(chosen.strip() != rejected.strip())
    return chosen, rejected


@st.composite
def good_row(draw, fmt: str) -> Case:
    c, r = draw(two_answers())
    if fmt in ("standard_explicit", "winner_loser"):
        p = draw(text)
        keys = ("chosen", "rejected") if fmt == "standard_explicit" else ("winner", "loser")
        row = {"prompt": p, keys[0]: c, keys[1]: r}
        system = draw(st.none() | text)
        prompt = [msg("user", p)]
        if system is not None:
            row["system"] = system
            prompt = [msg("system", system), *prompt]
        return Case(row, {"prompt": prompt, "chosen": asst(c), "rejected": asst(r), "conv": system is not None})
    if fmt == "anthropic_hh_explicit":
        p = draw(text)
        row = {"prompt": f"\n\nHuman: {p}\n\nAssistant:", "chosen": " " + c, "rejected": " " + r}
        return Case(row, {"prompt": [msg("user", p.strip())], "chosen": asst(c.strip()),
                          "rejected": asst(r.strip()), "conv": True})
    if fmt == "anthropic_hh":
        p = draw(text)
        row = {"chosen": f"\n\nHuman: {p}\n\nAssistant: {c}", "rejected": f"\n\nHuman: {p}\n\nAssistant: {r}"}
        return Case(row, {"prompt": [msg("user", p.strip())], "chosen": asst(c.strip()),
                          "rejected": asst(r.strip()), "conv": True})
    if fmt == "standard_implicit":
        shared = draw(text).strip()
        row = {"chosen": f"{shared} {c}", "rejected": f"{shared} {r}"}
        assume(not looks_like_hh(row["chosen"]))
        return Case(row, {"implicit": (row["chosen"], row["rejected"]), "conv": False})
    raw, norm = draw(prompt_messages())
    if fmt == "conversational_explicit":
        single = draw(st.booleans())  # a single message dict is accepted for a completion
        row = {"prompt": raw, "chosen": asst(c)[0] if single else asst(c), "rejected": asst(r)}
        return Case(row, {"prompt": norm, "chosen": asst(c), "rejected": asst(r), "conv": True})
    if fmt == "conversational_implicit":
        row = {"chosen": raw + asst(c), "rejected": raw + asst(r)}
        return Case(row, {"prompt": norm, "chosen": asst(c), "rejected": asst(r), "conv": True})
    if fmt == "sharegpt":
        if draw(st.booleans()):  # ShareGPT keys, or role/content (both accepted; rows may mix them)
            share = [{"from": m["role"].replace("user", "human"), "value": m["content"]} for m in norm]
            row = {"conversations": share, "chosen": {"from": "gpt", "value": c},
                   "rejected": {"from": "gpt", "value": r}}
        else:
            row = {"conversations": [dict(m) for m in norm], "chosen": asst(c)[0], "rejected": asst(r)[0]}
        return Case(row, {"prompt": norm, "chosen": asst(c), "rejected": asst(r), "conv": True})
    label_raw, label = draw(st.sampled_from([(True, True), (False, False), (1, True), (0, False), ("true", True),
                                             (" False ", False), ("1", True)]))
    if fmt == "unpaired_standard":
        p = draw(text)
        return Case({"prompt": p, "completion": c, "label": label_raw},
                    {"prompt": [msg("user", p)], "completion": asst(c), "label": label, "conv": False})
    if fmt == "unpaired_conversational":
        return Case({"prompt": raw, "completion": asst(c), "label": label_raw},
                    {"prompt": norm, "completion": asst(c), "label": label, "conv": True})
    assert fmt == "unpaired_messages", fmt
    return Case({"messages": raw + asst(c), "label": label_raw},
                {"prompt": norm, "completion": asst(c), "label": label, "conv": True})


PAIRED = ("standard_explicit", "winner_loser", "anthropic_hh_explicit", "anthropic_hh", "standard_implicit",
          "conversational_explicit", "conversational_implicit", "sharegpt")
UNPAIRED = ("unpaired_standard", "unpaired_conversational", "unpaired_messages")
STRING_FIELDS = {"standard_explicit": ("prompt", "chosen", "rejected"), "winner_loser": ("prompt", "winner", "loser"),
                 "anthropic_hh_explicit": ("chosen", "rejected"), "anthropic_hh": ("chosen", "rejected"),
                 "standard_implicit": ("chosen", "rejected"), "unpaired_standard": ("prompt", "completion")}
MESSAGE_FIELDS = {"conversational_explicit": ("prompt", "chosen", "rejected"),
                  "conversational_implicit": ("chosen", "rejected"),
                  "sharegpt": ("conversations", "chosen", "rejected"),
                  "unpaired_conversational": ("prompt", "completion"), "unpaired_messages": ("messages",)}
# Words the reason of a rejected field may use to name it.
FIELD_WORDS = {"winner": ("winner", "chosen"), "loser": ("loser", "rejected"), "conversations": ("conversations",
               "prompt"), "messages": ("messages", "prompt", "completion")}

# Values no format accepts in a string field / a message field (whatever else the row holds).
bad_scalar = st.none() | st.booleans() | st.integers() | st.floats() | st.sampled_from(["", "  ", "\n\t"])
bad_string_field = bad_scalar | st.lists(json_junk, max_size=3) | st.dictionaries(st.text(max_size=5), json_junk,
                                                                                  max_size=3)
bad_message = st.sampled_from([
    {"role": "alien", "content": "x"}, {"role": "assistant"}, {"role": "assistant", "content": 5},
    {"role": None, "content": "x"}, {"from": "gpt", "value": ["x"]}, {"foo": "bar"},
])
bad_message_field = (
    bad_scalar
    | st.just([])
    | st.lists(st.integers() | st.text(max_size=4) | st.none(), min_size=1, max_size=3)
    | bad_message
    | st.lists(bad_message, min_size=1, max_size=2)
)
bad_label = st.none() | st.sampled_from([2, -1, 0.5, "maybe", "", "yes", [True], {"v": 1}])


@st.composite
def bad_row(draw, fmt: str) -> Case:
    """A well-formed row with one field broken (or deleted), or a chosen == rejected pair."""
    case = draw(good_row(fmt))
    row = dict(case.row)
    row.pop("system", None)
    choices = list(STRING_FIELDS.get(fmt, ())) + list(MESSAGE_FIELDS.get(fmt, ()))
    if fmt in UNPAIRED:
        choices.append("label")
    field = draw(st.sampled_from(choices))
    how = draw(st.sampled_from(["junk", "delete", "same"] if fmt in PAIRED else ["junk", "delete"]))
    if how == "delete":
        del row[field]
    elif how == "same":
        a, b = ("winner", "loser") if fmt == "winner_loser" else ("chosen", "rejected")
        row[b] = row[a]
        field = b
    elif field == "label":
        row[field] = draw(bad_label)
    elif field in STRING_FIELDS.get(fmt, ()):
        row[field] = draw(bad_string_field)
    else:
        row[field] = draw(bad_message_field)
    return Case(row, None, field)


def _check_kept(got: dict[str, Any], exp: dict[str, Any], paired: bool) -> None:
    assert got["is_conversational"] == exp["conv"]
    if "implicit" in exp:  # the prompt is the shared prefix: prompt + completion gives back each string
        prompt = "".join(m["content"] for m in got["prompt"])
        assert prompt.strip() and [m["role"] for m in got["prompt"]] == ["user"]
        for key, original in zip(("chosen", "rejected"), exp["implicit"]):
            assert [m["role"] for m in got[key]] == ["assistant"]
            assert prompt + got[key][0]["content"] == original
            assert got[key][0]["content"].strip()
        return
    keys = ("prompt", "chosen", "rejected") if paired else ("prompt", "completion", "label")
    for key in keys:
        assert got[key] == exp[key], (key, got[key], exp[key])


def _render(messages: list[dict[str, str]]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def _check_tokens(tok, kept: list[dict], tokenised, paired: bool) -> None:
    """Token ids decode back to exactly the rendered text (chat template or plain text + EOS)."""
    assert len(tokenised) == len(kept)
    keys = ("chosen", "rejected") if paired else ("completion",)
    for row, ids in zip(kept, tokenised):
        decode = lambda t: tok.decode(t, clean_up_tokenization_spaces=False)  # noqa: E731
        for key in keys:
            if row["is_conversational"]:
                want_prompt = _render(row["prompt"]) + "<|im_start|>assistant\n"
                want_full = _render(row["prompt"] + row[key])
            else:
                want_prompt = "".join(m["content"] for m in row["prompt"])
                completion = "".join(m["content"] for m in row[key])
                want_full = want_prompt + completion + ("" if completion.endswith(tok.eos_token) else tok.eos_token)
            assert decode(ids["prompt_ids"]) == want_prompt
            assert decode(ids["prompt_ids"] + ids[f"{key}_ids"]) == want_full


def _source(rows: list[dict], as_file: bool, tmp_dir: Path) -> Any:
    if not as_file:
        return rows
    path = tmp_dir / f"rows_{abs(hash(json.dumps(rows, sort_keys=True, default=str)))}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@st.composite
def dataset_case(draw, formats: tuple[str, ...]) -> tuple[str, list[Case]]:
    fmt = draw(st.sampled_from(formats))
    first = draw(good_row(fmt))
    rest = draw(st.lists(st.one_of(good_row(fmt), bad_row(fmt)), max_size=5))
    return fmt, [first, *rest]


def _strict_error(cases: list[Case], bad: list[int], err: ValueError) -> None:
    """A strict-mode error names the first broken row and its field."""
    message = str(err)
    assert message.startswith(f"row {bad[0]}:"), message
    field = cases[bad[0]].field
    assert any(w in message for w in FIELD_WORDS.get(field, (field,))), (field, message)


def check_dataset(fuzz_tokenizer, tmp_path_factory, case, strict, source):
    fmt, cases = case
    paired = fmt in PAIRED
    rows = [c.row for c in cases]
    as_file = source == "file"
    try:
        raw = data.load_raw_dataset(_source(rows, as_file, tmp_path_factory.getbasetemp()),
                                    streaming=source == "stream")
    except CLEAR_ERRORS as err:
        # A JSON file whose columns change type between rows may be unreadable as a table: then the
        # error must name the file.
        assert as_file and "rows_" in str(err), err
        return
    bad = [i for i, c in enumerate(cases) if c.expected is None]
    try:
        ds, report = data.normalise_dataset(raw, paired=paired, strict=strict)
        got = list(ds)  # a stream checks its rows here
    except ValueError as err:
        assert strict and bad, f"unexpected ValueError: {err}"
        _strict_error(cases, bad, err)
        return
    assert not (strict and bad), f"strict mode accepted broken rows {bad}"
    assert report.format == fmt
    if source != "stream":
        assert report.num_skipped == len(bad) and report.num_rows == len(cases) - len(bad)
    kept = [c for c in cases if c.expected is not None]
    assert len(got) == len(kept)
    for row, c in zip(got, kept):
        _check_kept(row, c.expected, paired)
    if source == "stream":
        return
    tokenise = data.tokenize_preference_data if paired else data.tokenize_unpaired_data
    _check_tokens(fuzz_tokenizer, got, tokenise(ds, fuzz_tokenizer, max_length=None), paired)


sources = st.sampled_from(["list", "file", "stream"])
test_paired_rows, test_paired_rows_slow = fuzz_pair(
    case=dataset_case(PAIRED), strict=st.booleans(), source=sources
)(check_dataset)
test_unpaired_rows, test_unpaired_rows_slow = fuzz_pair(
    case=dataset_case(UNPAIRED), strict=st.booleans(), source=sources
)(check_dataset)


def check_junk_rows(rows, paired, strict):
    """Arbitrary JSON objects: a clear error or a dataset whose rows all hold non-empty messages."""
    try:
        ds, report = data.normalise_dataset(data.load_raw_dataset(rows), paired=paired, strict=strict)
    except CLEAR_ERRORS:
        return
    keys = ("prompt", "chosen", "rejected") if paired else ("prompt", "completion")
    assert report.num_rows == len(ds) and report.num_rows + report.num_skipped == len(rows)
    for row in ds:
        for key in keys:
            assert row[key] and all(isinstance(m["content"], str) for m in row[key])
        assert any(m["content"].strip() for m in row["prompt"])


_field_names = st.sampled_from(["prompt", "chosen", "rejected", "completion", "label", "messages", "conversations",
                                "system", "winner", "loser", "tools", "id"])
junk_rows = st.lists(st.dictionaries(_field_names, json_junk | text, min_size=1, max_size=5), min_size=1, max_size=4)
test_junk_rows, test_junk_rows_slow = fuzz_pair(rows=junk_rows, paired=st.booleans(), strict=st.booleans())(
    check_junk_rows
)


@pytest.mark.parametrize("line", ["{not json", "[1, 2]", '"a string"'])
def test_unreadable_json_line_names_the_file(tmp_path: Path, line: str) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match="broken.jsonl"):
        data.load_preference_data(str(path))


def check_truncation(fuzz_tokenizer, case, max_length, max_prompt_length, mode):
    """Truncated ids are a window of the untruncated ones, within the limits; dropped rows are counted."""
    fmt, cases = case
    paired = fmt in PAIRED
    rows = [c.row for c in cases if c.expected is not None]
    ds = (data.load_preference_data if paired else data.load_unpaired_data)(rows)
    tokenise = data.tokenize_preference_data if paired else data.tokenize_unpaired_data
    full = tokenise(ds, fuzz_tokenizer, max_length=None)
    try:
        cut = tokenise(ds, fuzz_tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
                       truncation_mode=mode)
    except ValueError as err:  # every row dropped (its prompt alone fills max_length) or a bad limit
        assert "max_length" in str(err) or "max_prompt_length" in str(err), err
        return
    keys = ("chosen_ids", "rejected_ids") if paired else ("completion_ids",)
    by_row = {i: r for i, r in enumerate(full)}
    kept = list(cut)
    assert len(kept) <= len(by_row)
    # rows keep their order; pair each kept row with its source row by the prompt window
    j = 0
    for row in kept:
        while True:
            src = by_row[j]
            j += 1
            p, q = src["prompt_ids"], row["prompt_ids"]
            window = p[: len(q)] == q if mode == "keep_start" else p[len(p) - len(q):] == q
            if window and all(src[k][: len(row[k])] == row[k] for k in keys):
                break
        assert q, "an empty prompt survived truncation"
        if max_prompt_length is not None:
            assert len(q) <= max_prompt_length
        if max_length is not None:
            assert all(len(q) + len(row[k]) <= max_length for k in keys)


test_truncation, test_truncation_slow = fuzz_pair(
    case=dataset_case(PAIRED + UNPAIRED),
    max_length=st.none() | st.integers(2, 40),
    max_prompt_length=st.none() | st.integers(1, 30),
    mode=st.sampled_from(["keep_start", "keep_end"]),
    scale=0.5,
)(check_truncation)
