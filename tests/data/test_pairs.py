"""Preference-pair generation from scored and single responses, validation and JSONL export."""

from __future__ import annotations

import json

import pytest

from mallowspo_fast import data

SCORED = [
    {"prompt": "p1", "response": "ok answer", "score": 0.5},
    {"prompt": "p2", "response": "only one", "score": 1.0},
    {"prompt": "p1", "response": "great answer", "score": 0.9},
    {"prompt": "p1", "response": "bad answer", "score": 0.1},
    {"prompt": "p1", "response": "fine answer", "score": 0.6},
    {"prompt": "p3", "response": "tie a", "score": 0.3},
    {"prompt": "p3", "response": "tie b", "score": 0.3},
]


def test_scored_best_vs_worst():
    pairs = data.pairs_from_scored(SCORED)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("p1", "great answer", "bad answer")]
    assert (pairs[0].chosen_score, pairs[0].rejected_score) == (0.9, 0.1)


def test_scored_pairs_per_prompt_and_gap():
    pairs = data.pairs_from_scored(SCORED, pairs_per_prompt=2)
    assert [(p.chosen, p.rejected) for p in pairs] == [
        ("great answer", "bad answer"),
        ("fine answer", "ok answer"),
    ]
    gap = data.pairs_from_scored(SCORED, pairs_per_prompt=2, min_score_gap=0.1)
    assert [(p.chosen, p.rejected) for p in gap] == [("great answer", "bad answer")]
    assert data.pairs_from_scored(SCORED, min_score_gap=0.8) == []


def test_duplicate_responses_count_once():
    records = [
        {"prompt": "p", "response": "same", "score": 1.0},
        {"prompt": "p", "response": "same", "score": 0.0},
    ]
    assert data.pairs_from_scored(records) == []


def test_score_fn_replaces_the_score_column():
    records = [{"prompt": "p", "response": "short"}, {"prompt": "p", "response": "a much longer reply"}]
    pairs = data.pairs_from_scored(records, score_fn=lambda prompt, response: len(response))
    assert pairs[0].chosen == "a much longer reply" and pairs[0].chosen_score == 19.0


@pytest.mark.parametrize(
    "record,exc,match",
    [
        (
            {"prompt": "p", "response": "r"},
            ValueError,
            r"record 0 has no 'score'; found keys \['prompt', 'response'\]",
        ),
        (
            {"prompt": "p", "response": "r", "score": "high"},
            TypeError,
            "'score' must be int/float, found str",
        ),
        ({"prompt": "p", "response": "r", "score": float("nan")}, ValueError, "score must be finite"),
        ({"prompt": 3, "response": "r", "score": 1}, TypeError, "'prompt' must be str, found int"),
    ],
    ids=["missing", "string", "nan", "prompt-type"],
)
def test_scored_errors(record, exc, match):
    with pytest.raises(exc, match=match):
        data.pairs_from_scored([record])


SINGLE = [
    {
        "prompt": "Explain ML.",
        "response": "Machine learning fits models to data. It predicts outcomes. It improves "
        "with experience.",
    },
    {"prompt": "Say hi.", "response": "Hello there my friend, how are you doing today?"},
]


@pytest.mark.parametrize("strategy", ["perturb", "truncate", "shuffle"])
def test_single_strategies_are_seeded_and_change_the_text(strategy):
    a = data.pairs_from_single(SINGLE, strategy=strategy, seed=3)
    b = data.pairs_from_single(SINGLE, strategy=strategy, seed=3)
    assert [p.rejected for p in a] == [p.rejected for p in b]
    for pair, record in zip(a, SINGLE):
        assert pair.chosen == record["response"] and pair.rejected != pair.chosen
        assert pair.metadata == {"source": strategy}


def test_strategy_specifics():
    truncated = data.pairs_from_single(SINGLE[1:], strategy="truncate", truncate_ratio=0.5)[0].rejected
    assert truncated == "Hello there my friend,"
    # shuffle reorders whole sentences, or words when there is a single sentence
    shuffled = data.pairs_from_single(SINGLE[:1], strategy="shuffle", seed=0)[0].rejected
    assert shuffled != SINGLE[0]["response"]
    sentences = data.split_sentences(SINGLE[0]["response"])
    assert sorted(data.split_sentences(shuffled)) == sorted(sentences) and len(sentences) == 3
    one = data.pairs_from_single(
        [{"prompt": "q", "response": "One single sentence here"}], strategy="shuffle"
    )
    assert one[0].rejected != "One single sentence here"
    assert sorted(one[0].rejected.split()) == sorted("One single sentence here".split())
    # perturb drops words and inserts fillers, never returning the text unchanged
    for seed in range(20):
        perturbed = data.pairs_from_single(SINGLE[1:], strategy="perturb", seed=seed)[0].rejected
        assert perturbed != SINGLE[1]["response"]
    different_seed = [
        data.pairs_from_single(SINGLE, strategy="perturb", seed=s)[0].rejected for s in range(5)
    ]
    assert len(set(different_seed)) > 1


def test_single_errors():
    with pytest.raises(ValueError, match="strategy must be one of"):
        data.pairs_from_single(SINGLE, strategy="reverse")
    with pytest.raises(ValueError, match="truncate_ratio"):
        data.pairs_from_single(SINGLE, strategy="truncate", truncate_ratio=1.0)


def test_validate_pairs_counts_reasons():
    P = data.PreferencePair
    pairs = [
        P("q", "good answer", "bad answer"),
        P("q", "same", " same "),
        P("", "a", "b"),
        P("q", "ok", "a longer one"),
        P("q", "x" * 50, "y"),
    ]
    kept, removed = data.validate_pairs(pairs, min_chars=2, max_chars=40)
    assert removed == {"chosen == rejected": 1, "empty prompt": 1, "response shorter than 2 chars": 1}
    assert kept == [pairs[0], pairs[3]]
    _, removed = data.validate_pairs([P("q", "x" * 50, "yy")], max_chars=40)
    assert removed == {"response longer than 40 chars": 1}


def test_single_word_response_is_removed_by_validation():
    pairs = data.pairs_from_single([{"prompt": "q", "response": "Yes"}], strategy="truncate")
    assert data.validate_pairs(pairs)[1] == {"chosen == rejected": 1}


def test_jsonl_export_loads_as_standard_pairs(tmp_path):
    pairs = data.pairs_from_scored(SCORED, pairs_per_prompt=2)
    n = data.write_pairs_jsonl(pairs, tmp_path / "out" / "pairs.jsonl")
    lines = [json.loads(line) for line in (tmp_path / "out" / "pairs.jsonl").read_text().splitlines()]
    assert n == len(lines) == 2
    assert lines[0] == {
        "prompt": "p1",
        "chosen": "great answer",
        "rejected": "bad answer",
        "chosen_score": 0.9,
        "rejected_score": 0.1,
        "meta_source": "scored",
    }
    ds = data.load_preference_data(tmp_path / "out" / "pairs.jsonl")
    assert ds[1]["chosen"] == [{"role": "assistant", "content": "fine answer"}]
    assert ds["chosen_score"] == [0.9, 0.6]
    data.write_pairs_jsonl(pairs, tmp_path / "plain.jsonl", include_scores=False)
    assert set(json.loads((tmp_path / "plain.jsonl").read_text().splitlines()[0])) == {
        "prompt",
        "chosen",
        "rejected",
    }
