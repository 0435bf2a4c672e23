"""Format detection and normalisation of every accepted layout; malformed rows; error messages."""

from __future__ import annotations

import json

import pytest

from mallowspo_fast import data
from mallowspo_fast.data.loading import load_raw_dataset, normalise_dataset


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def S(text):
    return {"role": "system", "content": text}


PAIRED_CASES = {
    "standard_explicit": (
        {"prompt": "What is 2+2?", "chosen": " 4.", "rejected": " 5."},
        [U("What is 2+2?")],
        [A(" 4.")],
        [A(" 5.")],
        False,
    ),
    "standard_implicit": (
        {"chosen": "The sky is blue today.", "rejected": "The sky is green today."},
        [U("The sky is")],
        [A(" blue today.")],
        [A(" green today.")],
        False,
    ),
    "anthropic_hh": (
        {
            "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell a joke\n\nAssistant: A pun.",
            "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell a joke\n\nAssistant: No.",
        },
        [U("Hi there"), A("Hello!"), U("Tell a joke")],
        [A("A pun.")],
        [A("No.")],
        True,
    ),
    "anthropic_hh_explicit": (
        {"prompt": "\n\nHuman: Hi there\n\nAssistant:", "chosen": " Hello!", "rejected": " Go away."},
        [U("Hi there")],
        [A("Hello!")],
        [A("Go away.")],
        True,
    ),
    "conversational_explicit": (
        {
            "prompt": [S("Be brief."), U("Capital of France?")],
            "chosen": [A("Paris.")],
            "rejected": [A("Lyon.")],
        },
        [S("Be brief."), U("Capital of France?")],
        [A("Paris.")],
        [A("Lyon.")],
        True,
    ),
    "conversational_implicit": (
        {"chosen": [U("Capital of France?"), A("Paris.")], "rejected": [U("Capital of France?"), A("Rome.")]},
        [U("Capital of France?")],
        [A("Paris.")],
        [A("Rome.")],
        True,
    ),
    "sharegpt": (
        {
            "conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi"}],
            "chosen": {"from": "gpt", "value": "Hello!"},
            "rejected": {"from": "gpt", "value": "What?"},
        },
        [S("Be kind."), U("Hi")],
        [A("Hello!")],
        [A("What?")],
        True,
    ),
    "winner_loser": (
        {"prompt": "Name a colour.", "winner": " Red.", "loser": " Seven."},
        [U("Name a colour.")],
        [A(" Red.")],
        [A(" Seven.")],
        False,
    ),
}


@pytest.mark.parametrize("name", list(PAIRED_CASES))
def test_paired_format_detected_and_normalised(name):
    row, prompt, chosen, rejected, conversational = PAIRED_CASES[name]
    ds, report = normalise_dataset(load_raw_dataset([row, row]))
    assert report.format == name
    assert report.num_rows == 2 and report.skipped == {}
    out = ds[0]
    assert (out["prompt"], out["chosen"], out["rejected"]) == (prompt, chosen, rejected)
    assert out["is_conversational"] is conversational


UNPAIRED_CASES = {
    "unpaired_standard": (
        {"prompt": "Say hi.", "completion": " Hi!", "label": True},
        [U("Say hi.")],
        [A(" Hi!")],
        True,
        False,
    ),
    "unpaired_conversational": (
        {"prompt": [U("Say hi.")], "completion": [A("Hi!")], "label": False},
        [U("Say hi.")],
        [A("Hi!")],
        False,
        True,
    ),
    "unpaired_messages": (
        {"messages": [U("Say hi."), A("Hi!")], "label": 1},
        [U("Say hi.")],
        [A("Hi!")],
        True,
        True,
    ),
}


@pytest.mark.parametrize("name", list(UNPAIRED_CASES))
def test_unpaired_format_detected_and_normalised(name):
    row, prompt, completion, label, conversational = UNPAIRED_CASES[name]
    ds, report = normalise_dataset(load_raw_dataset([row]), paired=False)
    assert report.format == name
    out = ds[0]
    assert (out["prompt"], out["completion"], out["label"]) == (prompt, completion, label)
    assert out["is_conversational"] is conversational


def test_column_mapping_stack_exchange_layout():
    rows = [{"question": "Why?", "response_j": " Because.", "response_k": " No idea.", "qid": 7}]
    ds = data.load_preference_data(
        rows, column_mapping={"prompt": "question", "chosen": "response_j", "rejected": "response_k"}
    )
    assert ds[0]["prompt"] == [U("Why?")] and ds[0]["chosen"] == [A(" Because.")]
    assert ds[0]["qid"] == 7  # unknown columns pass through


def test_column_mapping_for_unpaired_kto_tag():
    rows = [{"messages": [U("q"), A("a")], "kto_tag": False}]
    ds = data.load_unpaired_data(rows, column_mapping={"label": "kto_tag"})
    assert ds[0]["label"] is False


QAB = [{"q": "x", "a": "y", "b": "z"}]


@pytest.mark.parametrize(
    "rows,mapping,match",
    [
        (QAB, {"prompt": "nope"}, r"do not exist: \{'prompt': 'nope'\}; columns found: \['q', 'a', 'b'\]"),
        (QAB, {"question": "prompt"}, r"keys must be among \['prompt', 'chosen', 'rejected'"),
        (QAB, {"q": "prompt"}, r"canonical name -> your column"),
        ([{"q": "x", "chosen": "y"}], {"chosen": "q"}, r"would overwrite existing columns \['chosen'\]"),
    ],
    ids=["missing-column", "unknown-canonical", "reversed", "clash"],
)
def test_bad_column_mapping(rows, mapping, match):
    with pytest.raises(ValueError, match=match):
        data.load_preference_data(rows, column_mapping=mapping)


def test_unknown_layout_lists_columns_and_formats():
    with pytest.raises(ValueError) as err:
        data.load_preference_data([{"question": "q", "answer_a": "x", "answer_b": "y"}])
    text = str(err.value)
    assert "Columns found: ['answer_a', 'answer_b', 'question']" in text
    for name in ("sharegpt", "standard_explicit", "winner_loser", "anthropic_hh"):
        assert name in text
    assert "column_mapping" in text


GOOD = {"prompt": "Question?", "chosen": " Good.", "rejected": " Bad."}
BAD_ROWS = [
    ({"prompt": "Q?", "chosen": 3, "rejected": " x"}, "non-string content"),
    ({"prompt": "Q?", "chosen": "  ", "rejected": " x"}, "empty response"),
    ({"prompt": "Q?", "chosen": " same", "rejected": "same "}, "chosen == rejected"),
    ({"prompt": "", "chosen": " a", "rejected": " b"}, "empty prompt"),
    ({"prompt": "Q?", "chosen": None, "rejected": " b"}, "missing value"),
]


def test_malformed_rows_skipped_and_counted(data_log):
    rows = [GOOD] + [r for r, _ in BAD_ROWS] + [GOOD]
    ds, report = normalise_dataset(load_raw_dataset([dict(r) for r in rows]))
    assert ds.num_rows == 2
    assert report.skipped == {reason: 1 for _, reason in BAD_ROWS}
    assert report.first_skipped["empty response"] == [2]
    assert report.num_input_rows == 7 and report.num_skipped == 5
    assert "skipped 1 row(s): chosen == rejected (first rows: 3)" in data_log.text


@pytest.mark.parametrize(
    "bad,reason",
    [
        (
            {"prompt": [{"role": "wizard", "content": "hi"}], "chosen": [A("x")], "rejected": [A("y")]},
            "unknown role",
        ),
        ({"prompt": [U("hi")], "chosen": [A(["x"])], "rejected": [A("y")]}, "non-string content"),
        ({"prompt": [U("hi")], "chosen": [U("x")], "rejected": [A("y")]}, "completion does not start"),
        ({"prompt": [U("hi")], "chosen": [A("x")], "rejected": [A(" x ")]}, "chosen == rejected"),
    ],
    ids=["unknown-role", "list-content", "user-completion", "identical"],
)
def test_malformed_conversational_row_strict_names_row(bad, reason):
    rows = [{"prompt": [U("hi")], "chosen": [A("a")], "rejected": [A("b")]}, bad]
    if reason == "non-string content":
        rows = [json.loads(json.dumps(r)) for r in rows]
    with pytest.raises(ValueError, match=rf"^row 1: {reason}"):
        data.load_preference_data(rows, strict=True)
    ds = data.load_preference_data(rows)
    assert ds.num_rows == 1


def test_all_rows_malformed_is_an_error():
    with pytest.raises(ValueError, match=r"(?s)no usable rows.*0 of 2 rows kept.*chosen == rejected"):
        data.load_preference_data([{"prompt": "q", "chosen": "a", "rejected": "a"}] * 2)


def test_unpaired_label_must_be_boolean():
    rows = [
        {"prompt": "q", "completion": "a", "label": "maybe"},
        {"prompt": "q", "completion": "b", "label": True},
    ]
    with pytest.raises(ValueError, match=r"row 0: label must be a boolean \(found 'maybe'\)"):
        data.load_unpaired_data(rows, strict=True)


def test_unpaired_messages_without_final_assistant_skipped():
    rows = [{"messages": [U("q")], "label": True}, {"messages": [U("q"), A("a")], "label": False}]
    ds, report = normalise_dataset(load_raw_dataset(rows), paired=False)
    assert ds.num_rows == 1 and report.skipped == {"empty response": 1}


@pytest.mark.parametrize(
    "chosen,rejected,expected",
    [
        ("The cat sat.", "The cat ran.", ("The cat", " sat.", " ran.")),
        ("Answer: yes", "Answer: yesterday", ("Answer:", " yes", " yesterday")),  # backs off inside a word
        ("Q: hi A: yes", "Q: hi A: yes indeed", ("Q: hi A:", " yes", " yes indeed")),  # completion not empty
        ("abc", "abd", ("", "abc", "abd")),
    ],
    ids=["word-boundary", "mid-word", "prefix-of-other", "no-boundary"],
)
def test_split_common_prefix(chosen, rejected, expected):
    assert data.split_common_prefix(chosen, rejected) == expected


def test_parse_hh_turns_and_trailing_empty_assistant():
    turns = data.parse_hh("\n\nHuman: a\nb\n\nAssistant: c\n\nHuman: d\n\nAssistant:", "prompt")
    assert turns == [U("a\nb"), A("c"), U("d")]


def test_real_sharegpt_demo(demo_pairs, dpo_demo):
    raw = json.loads(dpo_demo.read_text())
    assert demo_pairs.num_rows == len(raw) == 300
    for i in (0, 123, 299):
        row, src = demo_pairs[i], raw[i]
        contents = [m["content"] for m in row["prompt"]]
        assert contents == [m["value"] for m in src["conversations"]]
        assert row["chosen"] == [A(src["chosen"]["value"])]
        assert row["rejected"] == [A(src["rejected"]["value"])]
        assert row["prompt"][-1]["role"] == "user"
    roles = {m["role"] for row in demo_pairs["prompt"] for m in row}
    assert roles == {"system", "user", "assistant"}


def test_real_kto_demo(kto_demo):
    ds = data.load_unpaired_data(kto_demo)
    raw = json.loads(kto_demo.read_text())
    assert ds.num_rows == 300
    assert ds["label"] == [r["label"] for r in raw]
    assert ds[5]["completion"] == [A(raw[5]["messages"][-1]["content"])]


def test_bundled_file_is_the_300_real_pairs():
    import json

    rows = json.loads(open(data.bundled_dataset_path(), encoding="utf-8").read())
    assert len(rows) == 300
    assert all({"conversations", "chosen", "rejected"} <= set(r) for r in rows)
    with pytest.raises(FileNotFoundError, match="available: \\['dpo_en_demo.json'\\]"):
        data.bundled_dataset_path("nope.json")


def test_unpair_preference_data(demo_pairs):
    small = demo_pairs.select(range(3))
    unpaired = data.unpair_preference_data(small)
    assert unpaired.num_rows == 6
    assert unpaired["label"] == [True] * 3 + [False] * 3
    assert unpaired[4]["completion"] == small[1]["rejected"]


def test_sharegpt_system_and_tools_columns():
    row = {
        "conversations": [{"from": "human", "value": "1+1?"}],
        "chosen": {"from": "gpt", "value": "2"},
        "rejected": {"from": "gpt", "value": "3"},
        "system": "Use the tools.",
        "tools": '[{"name": "calc"}]',
    }
    out = data.load_preference_data([row])[0]
    assert out["prompt"] == [S("Use the tools."), U("1+1?")]
    assert out["tools"] == '[{"name": "calc"}]' and "system" not in out
