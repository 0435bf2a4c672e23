"""Collation: padded [2B, L] pairs, the packed layout, unpaired rows, passthrough columns, errors."""

from __future__ import annotations

import pytest
import torch

from mallowspo_fast import data

PAD = 99
ROWS = [
    {"prompt_ids": [1, 2, 3], "chosen_ids": [10, 11], "rejected_ids": [20, 21, 22, 23], "index": 5},
    {"prompt_ids": [4], "chosen_ids": [12, 13, 14], "rejected_ids": [24], "index": 9},
]


def test_padded_batch_layout():
    batch = data.PreferenceCollator(PAD)(ROWS)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "index"}
    expected_ids = torch.tensor(
        [
            [1, 2, 3, 10, 11, PAD, PAD],
            [4, 12, 13, 14, PAD, PAD, PAD],
            [1, 2, 3, 20, 21, 22, 23],
            [4, 24, PAD, PAD, PAD, PAD, PAD],
        ]
    )
    expected_labels = torch.tensor(
        [
            [-100, -100, -100, 10, 11, -100, -100],
            [-100, 12, 13, 14, -100, -100, -100],
            [-100, -100, -100, 20, 21, 22, 23],
            [-100, 24, -100, -100, -100, -100, -100],
        ]
    )
    torch.testing.assert_close(batch["input_ids"], expected_ids, rtol=0, atol=0)
    torch.testing.assert_close(batch["labels"], expected_labels, rtol=0, atol=0)
    torch.testing.assert_close(batch["attention_mask"], (expected_ids != PAD).long(), rtol=0, atol=0)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
    assert batch["index"].tolist() == [5, 9]


@pytest.mark.parametrize("multiple,length", [(None, 7), (1, 7), (4, 8), (8, 8), (16, 16)])
def test_pad_to_multiple_of(multiple, length):
    batch = data.PreferenceCollator(PAD, pad_to_multiple_of=multiple)(ROWS)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (4, length)
    assert int(batch["attention_mask"].sum()) == 3 + 2 + 1 + 3 + 3 + 4 + 1 + 1


def test_reference_columns_pass_through():
    rows = [
        dict(
            r,
            ref_chosen_logps=-1.5 - i,
            ref_rejected_logps=-2.25,
            ref_chosen_entropy=0.5,
            ref_rejected_entropy=torch.tensor(0.75),
        )
        for i, r in enumerate(ROWS)
    ]
    batch = data.PreferenceCollator(PAD)(rows)
    assert batch["ref_chosen_logps"].tolist() == [-1.5, -2.5]
    assert batch["ref_rejected_entropy"].tolist() == [0.75, 0.75]
    assert batch["ref_chosen_logps"].dtype == torch.float32
    rows[1]["ref_chosen_logps"] = None
    with pytest.raises(ValueError, match=r"'ref_chosen_logps' is missing \(None\) in batch rows \[1\]"):
        data.PreferenceCollator(PAD)(rows)


def test_label_mask_covers_exactly_the_response_tokens_on_real_data(demo_pairs, tokenizer):
    tokenised = data.tokenize_preference_data(demo_pairs.select(range(8)), tokenizer, max_length=None)
    rows = [tokenised[i] for i in range(8)]
    batch = data.PreferenceCollator(tokenizer.pad_token_id, pad_to_multiple_of=8)(rows)
    B = len(rows)
    for i, row in enumerate(rows):
        for j, key in ((i, "chosen_ids"), (B + i, "rejected_ids")):
            p, c = len(row["prompt_ids"]), len(row[key])
            scored = (batch["labels"][j] != -100).nonzero().flatten().tolist()
            assert scored == list(range(p, p + c))
            assert (
                batch["labels"][j, p : p + c].tolist()
                == row[key]
                == batch["input_ids"][j, p : p + c].tolist()
            )
            assert batch["attention_mask"][j].sum() == p + c
    for j in (0, B):  # the whole untruncated response, end-of-turn included
        key = "chosen" if j == 0 else "rejected"
        scored = tokenizer.decode(batch["input_ids"][j][batch["labels"][j] != -100])
        assert scored == demo_pairs[0][key][0]["content"] + "<|im_end|>\n"


def test_packed_layout_matches_padded():
    packed = data.PackedPreferenceCollator()(ROWS)
    padded = data.PreferenceCollator(PAD)(ROWS)
    lengths = [5, 4, 7, 2]
    assert packed["input_ids"].shape == packed["labels"].shape == (1, sum(lengths))
    assert packed["position_ids"][0].tolist() == [t for n in lengths for t in range(n)]
    assert packed["segment_ids"][0].tolist() == [s for s, n in enumerate(lengths) for _ in range(n)]
    assert packed["cu_seq_lens"].tolist() == [0, 5, 9, 16, 18] and packed["cu_seq_lens"].dtype == torch.int32
    mask = padded["attention_mask"].bool()
    assert packed["input_ids"][0].tolist() == padded["input_ids"][mask].tolist()
    assert packed["labels"][0].tolist() == padded["labels"][mask].tolist()
    # Every sequence starts with a prompt token: no sequence is scored from its predecessor.
    assert (packed["labels"][0, packed["cu_seq_lens"][:-1].long()] == -100).all()
    assert packed["index"].tolist() == [5, 9]


def test_packed_segment_sums_equal_padded_row_sums():
    packed = data.PackedPreferenceCollator()(ROWS)
    padded = data.PreferenceCollator(PAD)(ROWS)
    values = torch.arange(1, packed["input_ids"].shape[1] + 1, dtype=torch.float64)
    sums = torch.zeros(4, dtype=torch.float64).index_add_(0, packed["segment_ids"][0], values)
    padded_values = torch.zeros(padded["input_ids"].shape, dtype=torch.float64)
    padded_values[padded["attention_mask"].bool()] = values
    torch.testing.assert_close(sums, padded_values.sum(1), rtol=0, atol=0)


def test_packed_flash_attention_kwargs():
    packed = data.PackedPreferenceCollator(return_flash_attn_kwargs=True)(ROWS)
    assert packed["cu_seq_lens_q"].tolist() == packed["cu_seq_lens_k"].tolist() == [0, 5, 9, 16, 18]
    assert packed["max_length_q"] == packed["max_length_k"] == 7


def test_packed_rejects_empty_prompt():
    with pytest.raises(ValueError, match="sequence 0 has an empty prompt"):
        data.PackedPreferenceCollator()([{"prompt_ids": [], "chosen_ids": [1], "rejected_ids": [2]}])


def test_unpaired_collator_and_kl_rows():
    rows = [
        {"prompt_ids": [1, 2], "completion_ids": [10], "label": True},
        {"prompt_ids": [3], "completion_ids": [20, 21], "label": False},
        {"prompt_ids": [4, 5, 6], "completion_ids": [30], "label": torch.tensor(True)},
    ]
    batch = data.UnpairedCollator(0)(rows)
    assert batch["label"].tolist() == [True, False, True]
    assert batch["input_ids"].tolist() == [[1, 2, 10, 0], [3, 20, 21, 0], [4, 5, 6, 30]]
    assert batch["labels"].tolist() == [[-100, -100, 10, -100], [-100, 20, 21, -100], [-100, -100, -100, 30]]
    # Mismatched pairs: prompt b with completion b-1 (mod B).
    assert batch["kl_input_ids"].tolist() == [[1, 2, 30, 0, 0], [3, 10, 0, 0, 0], [4, 5, 6, 20, 21]]
    assert batch["kl_labels"][1].tolist() == [-100, 10, -100, -100, -100]
    single = data.UnpairedCollator(0)(rows[:1])
    assert "kl_input_ids" not in single
    with pytest.raises(TypeError, match=r"batch row 0: 'label' must be a bool, found 1"):
        data.UnpairedCollator(0)([dict(rows[0], label=1)])


def test_kto_collator_puts_the_kl_rows_after_the_completions():
    rows = [
        {"prompt_ids": [1, 2], "completion_ids": [10], "kl_completion_ids": [20, 21, 22], "label": True, "index": 4},
        {"prompt_ids": [3], "completion_ids": [20, 21], "kl_completion_ids": [10], "label": False, "index": 1},
    ]
    batch = data.KTOCollator(0, pad_to_multiple_of=3)(rows)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "label", "index"}
    # one length for both halves (the longest, 5, rounded up to 6)
    assert batch["input_ids"].tolist() == [[1, 2, 10, 0, 0, 0], [3, 20, 21, 0, 0, 0],
                                           [1, 2, 20, 21, 22, 0], [3, 10, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 10, -100, -100, -100], [-100, 20, 21, -100, -100, -100],
                                        [-100, -100, 20, 21, 22, -100], [-100, 10, -100, -100, -100, -100]]
    assert batch["attention_mask"].sum(1).tolist() == [3, 3, 5, 2]
    assert batch["label"].tolist() == [True, False] and batch["index"].tolist() == [4, 1]
    with pytest.raises(ValueError, match=r"batch rows \[1\] have no 'kl_completion_ids'"):
        data.KTOCollator(0)([rows[0], {k: v for k, v in rows[1].items() if k != "kl_completion_ids"}])


def test_kl_completions_take_another_rows_completion():
    partner = [c[0] for c in data.kl_completions([[i] for i in range(32)], seed=7)]
    assert sorted(partner) == list(range(32))  # every completion is used once
    assert all(p != i for i, p in enumerate(partner))  # never the row's own
    assert partner == [c[0] for c in data.kl_completions([[i] for i in range(32)], seed=7)]  # fixed by the seed
    assert partner != [c[0] for c in data.kl_completions([[i] for i in range(32)], seed=8)]
    assert sum(abs(p - i) == 1 for i, p in enumerate(partner)) < 8  # not the neighbour (a split pair)


@pytest.mark.parametrize(
    "make,match,exc",
    [
        (
            lambda: data.PreferenceCollator(None),
            "pad_token_id must be a non-negative int, found None",
            ValueError,
        ),
        (lambda: data.PreferenceCollator(0, pad_to_multiple_of=0), "pad_to_multiple_of", ValueError),
        (lambda: data.PreferenceCollator(0)([]), "non-empty list of rows", ValueError),
        (
            lambda: data.PreferenceCollator(0)([{"prompt_ids": [1], "chosen_ids": [2]}]),
            r"batch row 0 has no 'rejected_ids'; found keys \['chosen_ids', 'prompt_ids'\]",
            ValueError,
        ),
        (
            lambda: data.PreferenceCollator(0)(
                [{"prompt_ids": "1 2", "chosen_ids": [2], "rejected_ids": [3]}]
            ),
            "'prompt_ids' must be a list of token ids, found str",
            TypeError,
        ),
    ],
    ids=["pad-none", "multiple-zero", "empty-batch", "missing-key", "string-ids"],
)
def test_collator_errors(make, match, exc):
    with pytest.raises(exc, match=match):
        make()


def test_tensor_rows_from_torch_format(demo_pairs, tokenizer):
    tokenised = data.tokenize_preference_data(
        demo_pairs.select(range(2)), tokenizer, max_length=32, truncation_mode="keep_end"
    ).with_format("torch")
    batch = data.PreferenceCollator(tokenizer.pad_token_id)([tokenised[0], tokenised[1]])
    assert batch["input_ids"].shape[0] == 4 and batch["index"].tolist() == [0, 1]
