"""Tokenisation rules: templates, EOS, joint tokenisation, truncation, drops, caching, rank-0-first."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from mallowspo_fast import data
from mallowspo_fast.data import distributed

PROMPT = "Explain why the sky looks blue during a clear day."
CHOSEN = " Sunlight scatters off air molecules, and blue light scatters the most."
REJECTED = " Because the ocean reflects onto it."


def _standard(rows=None):
    return data.load_preference_data(rows or [{"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}])


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_standard_row_joint_ids_and_eos(tokenizer):
    out = data.tokenize_preference_data(_standard(), tokenizer)
    row = out[0]
    eos = tokenizer.eos_token
    assert row["prompt_ids"] == _ids(tokenizer, PROMPT)
    assert row["chosen_ids"] == _ids(tokenizer, PROMPT + CHOSEN + eos)[len(row["prompt_ids"]) :]
    assert row["rejected_ids"] == _ids(tokenizer, PROMPT + REJECTED + eos)[len(row["prompt_ids"]) :]
    assert row["chosen_ids"][-1] == row["rejected_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(row["chosen_ids"]) == CHOSEN + eos
    assert row["index"] == 0
    assert set(out.column_names) == {"prompt_ids", "chosen_ids", "rejected_ids", "index"}


def test_eos_not_doubled(tokenizer):
    eos = tokenizer.eos_token
    row = data.tokenize_preference_data(
        _standard([{"prompt": PROMPT, "chosen": CHOSEN + eos, "rejected": REJECTED}]), tokenizer
    )[0]
    assert row["chosen_ids"].count(tokenizer.eos_token_id) == 1


def test_conversational_row_uses_chat_template(tokenizer):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
    chosen, rejected = (
        [{"role": "assistant", "content": "Paris."}],
        [{"role": "assistant", "content": "Rome."}],
    )
    ds = data.load_preference_data([{"prompt": prompt, "chosen": chosen, "rejected": rejected}])
    row = data.tokenize_preference_data(ds, tokenizer)[0]
    expected_prompt = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tokenizer.decode(row["prompt_ids"]) == expected_prompt
    assert tokenizer.decode(row["chosen_ids"]) == "Paris.<|im_end|>\n"
    assert tokenizer.decode(row["rejected_ids"]) == "Rome.<|im_end|>\n"
    full = tokenizer.apply_chat_template(prompt + chosen, tokenize=False)
    assert row["prompt_ids"] + row["chosen_ids"] == _ids(tokenizer, full)


def test_default_template_when_tokenizer_has_none(tokenizer):
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    ds = data.load_preference_data(
        [
            {
                "prompt": [{"role": "user", "content": "Hi"}],
                "chosen": [{"role": "assistant", "content": "Hello"}],
                "rejected": [{"role": "assistant", "content": "Go"}],
            }
        ]
    )
    row = data.tokenize_preference_data(ds, bare)[0]
    assert bare.decode(row["prompt_ids"]) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_tokenizer_template_is_preferred(tokenizer):
    custom = copy.deepcopy(tokenizer)
    custom.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    ds = data.load_preference_data(
        [
            {
                "prompt": [{"role": "user", "content": "Hi"}],
                "chosen": [{"role": "assistant", "content": "Hello"}],
                "rejected": [{"role": "assistant", "content": "Go"}],
            }
        ]
    )
    row = data.tokenize_preference_data(ds, custom)[0]
    assert custom.decode(row["prompt_ids"]) == "[user] Hi\n[assistant] "
    assert custom.decode(row["chosen_ids"]) == "Hello\n"


def test_tools_column_reaches_the_template(tokenizer):
    tools = json.dumps([{"name": "calc"}])
    ds = data.load_preference_data(
        [
            {
                "prompt": [{"role": "user", "content": "1+1"}],
                "chosen": [{"role": "assistant", "content": "2"}],
                "rejected": [{"role": "assistant", "content": "3"}],
                "tools": tools,
            }
        ]
    )
    row = data.tokenize_preference_data(ds, tokenizer)[0]
    assert tokenizer.decode(row["prompt_ids"]).startswith('<|im_start|>system\nTools: [{"name": "calc"}]')


def test_boundary_mismatch_counted_and_text_exact(tokenizer, data_log):
    # "the" + "ir" merges into " their" when tokenised jointly.
    prompt, chosen = "Say the", "ir names"
    joint = _ids(tokenizer, prompt + chosen)
    assert joint[: len(_ids(tokenizer, prompt))] != _ids(tokenizer, prompt), "premise: BPE merges across"
    ds = _standard(
        [
            {"prompt": prompt, "chosen": chosen, "rejected": " names"},
            {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED},
        ]
    )
    out = data.tokenize_preference_data(ds, tokenizer, load_from_cache_file=False)
    row = out[0]
    assert tokenizer.decode(row["prompt_ids"] + row["chosen_ids"]) == prompt + chosen + tokenizer.eos_token
    assert row["chosen_ids"] == _ids(tokenizer, chosen + tokenizer.eos_token)
    warnings = [r.getMessage() for r in data_log.records if "boundary" in r.getMessage()]
    assert warnings == [
        "1 completion(s) in 2 rows: BPE merges across the prompt/completion boundary; "
        "these completions were tokenised on their own"
    ]


def _lengths(tokenizer):
    p = len(_ids(tokenizer, PROMPT))
    c = len(_ids(tokenizer, PROMPT + CHOSEN + tokenizer.eos_token)) - p
    r = len(_ids(tokenizer, PROMPT + REJECTED + tokenizer.eos_token)) - p
    return p, c, r


def test_keep_start_cuts_completion_ends(tokenizer):
    full = data.tokenize_preference_data(_standard(), tokenizer, max_length=None)[0]
    p, c, r = _lengths(tokenizer)
    assert (len(full["prompt_ids"]), len(full["chosen_ids"]), len(full["rejected_ids"])) == (p, c, r)
    row = data.tokenize_preference_data(_standard(), tokenizer, max_length=p + 3)[0]
    assert row["prompt_ids"] == full["prompt_ids"]
    assert row["chosen_ids"] == full["chosen_ids"][:3] and row["rejected_ids"] == full["rejected_ids"][:3]


def test_prompt_filling_max_length_is_dropped_and_counted(tokenizer, data_log):
    p, _, _ = _lengths(tokenizer)
    short = {"prompt": "Hi?", "chosen": " Yes.", "rejected": " No."}
    ds = _standard([{"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}, short])
    out = data.tokenize_preference_data(ds, tokenizer, max_length=p)
    assert out.num_rows == 1 and out[0]["index"] == 0
    assert tokenizer.decode(out[0]["prompt_ids"]) == "Hi?"
    assert "dropped 1 of 2 rows at tokenisation: 1 prompt fills max_length" in data_log.text
    with pytest.raises(ValueError, match="every row was dropped"):
        data.tokenize_preference_data(_standard(), tokenizer, max_length=p)


def test_keep_end_trims_the_prompt_start(tokenizer):
    full = data.tokenize_preference_data(_standard(), tokenizer, max_length=None)[0]
    p, c, r = _lengths(tokenizer)
    limit = max(c, r) + 4
    row = data.tokenize_preference_data(_standard(), tokenizer, max_length=limit, truncation_mode="keep_end")[
        0
    ]
    assert row["prompt_ids"] == full["prompt_ids"][-4:]
    assert row["chosen_ids"] == full["chosen_ids"] and row["rejected_ids"] == full["rejected_ids"]
    tight = data.tokenize_preference_data(_standard(), tokenizer, max_length=5, truncation_mode="keep_end")[0]
    assert tight["prompt_ids"] == full["prompt_ids"][-1:]
    assert tight["chosen_ids"] == full["chosen_ids"][:4]


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_max_prompt_length(tokenizer, mode):
    full = data.tokenize_preference_data(_standard(), tokenizer, max_length=None)[0]
    row = data.tokenize_preference_data(
        _standard(), tokenizer, max_length=None, max_prompt_length=3, truncation_mode=mode
    )[0]
    expected = full["prompt_ids"][:3] if mode == "keep_start" else full["prompt_ids"][-3:]
    assert row["prompt_ids"] == expected
    assert row["chosen_ids"] == full["chosen_ids"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"truncation_mode": "middle"}, "truncation_mode must be one of"),
        ({"max_length": 1}, "max_length"),
        ({"max_prompt_length": 0}, "max_prompt_length"),
    ],
    ids=["mode", "max-length", "max-prompt-length"],
)
def test_bad_arguments(tokenizer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.tokenize_preference_data(_standard(), tokenizer, **kwargs)


def test_raw_rows_are_rejected_with_the_columns_found(tokenizer):
    import datasets

    raw = datasets.Dataset.from_list([{"question": "q", "answer": "a"}])
    with pytest.raises(
        ValueError, match=r"missing columns \['prompt', 'chosen', 'rejected', 'is_conversational'\]"
    ):
        data.tokenize_preference_data(raw, tokenizer)


def test_real_data_keep_end(demo_pairs, tokenizer):
    subset = demo_pairs.select(range(40))
    out = data.tokenize_preference_data(subset, tokenizer, max_length=96, truncation_mode="keep_end")
    assert out.num_rows == 40
    for i in (0, 17, 39):
        row, src = out[i], subset[i]
        assert 1 <= len(row["prompt_ids"]) and len(row["prompt_ids"]) + len(row["chosen_ids"]) <= 96
        full_prompt = tokenizer.apply_chat_template(src["prompt"], add_generation_prompt=True, tokenize=False)
        assert full_prompt.endswith(tokenizer.decode(row["prompt_ids"]))
        chosen_text = tokenizer.apply_chat_template(src["prompt"] + src["chosen"], tokenize=False)
        assert chosen_text[len(full_prompt) :].startswith(tokenizer.decode(row["chosen_ids"]))


def test_real_unpaired_data(kto_demo, tokenizer):
    ds = data.load_unpaired_data(kto_demo).select(range(12))
    out = data.tokenize_unpaired_data(ds, tokenizer, max_length=None)
    assert out.num_rows == 12 and out["label"] == ds["label"]
    text = tokenizer.decode(out[3]["completion_ids"])
    assert text == ds[3]["completion"][0]["content"] + "<|im_end|>\n"


def test_num_proc_matches_single_process(demo_pairs, tokenizer):
    subset = demo_pairs.select(range(24))
    one = data.tokenize_preference_data(subset, tokenizer, max_length=64, truncation_mode="keep_end")
    two = data.tokenize_preference_data(
        subset, tokenizer, max_length=64, truncation_mode="keep_end", num_proc=2, load_from_cache_file=False
    )
    assert one.to_list() == two.to_list()


def test_file_backed_results_are_cached(tmp_path, tokenizer):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}) + "\n")
    first = data.tokenize_preference_data(data.load_preference_data(path), tokenizer, max_length=64)
    second = data.tokenize_preference_data(data.load_preference_data(path), tokenizer, max_length=64)
    assert first.cache_files and first.cache_files == second.cache_files
    other = data.tokenize_preference_data(data.load_preference_data(path), tokenizer, max_length=32)
    assert other.cache_files != first.cache_files


def test_main_process_first_without_distributed_runs_once():
    calls = []
    with data.main_process_first():
        with data.main_process_first():
            calls.append("body")
    assert calls == ["body"]


@pytest.mark.parametrize("rank", [0, 1])
def test_main_process_first_orders_ranks(monkeypatch, rank):
    events = []
    monkeypatch.setattr(distributed, "_dist_world", lambda: (rank, 2))
    monkeypatch.setattr(torch.distributed, "barrier", lambda: events.append("barrier"))
    with data.main_process_first():
        events.append("body")
        with data.main_process_first():  # nested: no extra barrier
            events.append("inner")
    assert events == (["body", "inner", "barrier"] if rank == 0 else ["barrier", "body", "inner"])


def test_tokenizer_bos_leads_standard_prompts_only(tokenizer):
    from tokenizers import processors

    with_bos = copy.deepcopy(tokenizer)
    bos = with_bos.eos_token_id
    with_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    assert with_bos("hi")["input_ids"][0] == bos, "premise: the tokenizer adds a BOS by itself"
    standard = data.tokenize_preference_data(_standard(), with_bos)[0]
    assert standard["prompt_ids"] == [bos, *_ids(tokenizer, PROMPT)]
    chat = data.load_preference_data(
        [
            {
                "prompt": [{"role": "user", "content": "Hi"}],
                "chosen": [{"role": "assistant", "content": "A"}],
                "rejected": [{"role": "assistant", "content": "B"}],
            }
        ]
    )
    # the chat template decides the special tokens of conversational rows
    assert data.tokenize_preference_data(chat, with_bos)[0]["prompt_ids"][0] != bos
