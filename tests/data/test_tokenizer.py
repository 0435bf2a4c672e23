"""The local byte-level BPE tokenizer: specials, chat template, offline reload, inputs, errors."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from mallowspo_fast import data

TEXT = "Hello world!\n  Indented line with ünïcödé and emoji 🙂, then <|im_end|> inside."


def test_special_tokens_and_template(tokenizer):
    assert len(tokenizer) == 512
    assert tokenizer.eos_token == tokenizer.bos_token == "<|endoftext|>"
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert tokenizer.convert_tokens_to_ids(special) < 4
        assert tokenizer(special, add_special_tokens=False)["input_ids"] == [
            tokenizer.convert_tokens_to_ids(special)
        ]
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    )
    assert tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True).endswith(
        "<|im_start|>assistant\n"
    )


def test_byte_level_round_trip_and_no_implicit_specials(tokenizer):
    ids = tokenizer(TEXT)["input_ids"]
    assert tokenizer.decode(ids) == TEXT
    assert ids == tokenizer(TEXT, add_special_tokens=False)["input_ids"]


def test_reload_offline_gives_identical_ids(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    texts = ["alpha beta gamma delta " * 20, "the quick brown fox jumps over the lazy dog " * 20]
    tok = data.train_tokenizer(texts, 300, save_dir=tmp_path / "tok", min_frequency=1)
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert reloaded(TEXT)["input_ids"] == tok(TEXT)["input_ids"]
    assert reloaded.chat_template == tok.chat_template == data.DEFAULT_CHAT_TEMPLATE
    assert (reloaded.pad_token_id, reloaded.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    assert len(reloaded) == len(tok) <= 300


def test_inputs_dataset_rows_and_path(tmp_path, kto_demo):
    rows = [{"messages": [{"role": "user", "content": "zyx zyx zyx"}], "label": True}] * 30
    tok = data.train_tokenizer(rows, 270, min_frequency=1)
    assert len(tok.tokenize(" zyx")) == 1  # merges learned from message content
    assert "user" not in tok.get_vocab() and "Ġuser" not in tok.get_vocab()  # roles are not text
    from_path = data.train_tokenizer(kto_demo, 400)
    assert len(from_path) == 400


def test_iter_texts_walks_any_layout():
    row = {
        "conversations": [{"from": "human", "value": "a"}],
        "chosen": {"from": "gpt", "value": "b"},
        "score": 3,
        "tags": ["c", ""],
    }
    assert list(data.iter_texts([row, "d"])) == ["a", "b", "c", "d"]


@pytest.mark.parametrize(
    "texts,vocab,exc,match",
    [
        (["abc"], 100, ValueError, r"vocab_size must be an int >= 260"),
        ([], 300, ValueError, "no text to train on"),
        ("not/a/file.json", 300, ValueError, "not an existing path"),
        (42, 300, TypeError, "found int"),
    ],
    ids=["vocab-too-small", "no-text", "missing-path", "bad-type"],
)
def test_errors(texts, vocab, exc, match):
    with pytest.raises(exc, match=match):
        data.train_tokenizer(texts, vocab)


def test_saved_files(tmp_path):
    data.train_tokenizer(["some text here"] * 5, 280, save_dir=tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|endoftext|>" and config["pad_token"] == "<|pad|>"
    assert (tmp_path / "tokenizer.json").is_file()
