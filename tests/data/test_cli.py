"""The mallowspo-data command line: inspect / validate, pairs, tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from transformers import AutoTokenizer

from mallowspo_fast import data
from mallowspo_fast.data.cli import main

REPO = Path(__file__).resolve().parents[2]


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_inspect_real_sharegpt(dpo_demo, capsys):
    assert main(["inspect", str(dpo_demo)]) == 0
    out = capsys.readouterr().out
    assert "format sharegpt: 300 of 300 rows kept" in out
    assert "columns: ['conversations', 'chosen', 'rejected']" in out
    assert "rendering: chat template" in out


def test_validate_fails_on_skipped_rows(tmp_path, capsys):
    path = _jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "q", "chosen": " a", "rejected": " b"},
            {"prompt": "q", "chosen": " a", "rejected": " a"},
        ],
    )
    assert main(["inspect", str(path)]) == 0
    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert "format standard_explicit: 1 of 2 rows kept" in out
    assert "skipped 1 row(s): chosen == rejected (first rows: 1)" in out
    assert main(["validate", str(path), "--strict"]) == 1
    assert "row 1: chosen == rejected" in capsys.readouterr().err


def test_inspect_with_mapping_unpaired_and_tokenizer(tmp_path, tokenizer_dir, capsys):
    path = _jsonl(
        tmp_path / "k.jsonl",
        [{"q": "Say hi", "a": " Hi!", "good": True}, {"q": "Say no", "a": " Yes!", "good": False}],
    )
    argv = [
        "inspect",
        str(path),
        "--unpaired",
        "--column-mapping",
        "prompt=q,completion=a,label=good",
        "--tokenizer",
        str(tokenizer_dir),
        "--max-length",
        "64",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "format unpaired_standard: 2 of 2 rows kept" in out
    assert "tokenised rows: 2 of 2 (max_length=64)" in out and "completion_ids: min" in out


def test_inspect_reports_unknown_layout(tmp_path, capsys):
    path = _jsonl(tmp_path / "x.jsonl", [{"text": "hello"}])
    assert main(["inspect", str(path)]) == 1
    assert "Columns found: ['text']" in capsys.readouterr().err


def test_pairs_scored_and_single(tmp_path, capsys):
    src = _jsonl(
        tmp_path / "scored.jsonl",
        [
            {"question": "p", "answer": "best reply", "rating": 9},
            {"question": "p", "answer": "worst reply", "rating": 1},
            {"question": "r", "answer": "lonely", "rating": 5},
        ],
    )
    out = tmp_path / "pairs.jsonl"
    argv = [
        "pairs",
        str(src),
        "-o",
        str(out),
        "--prompt-key",
        "question",
        "--response-key",
        "answer",
        "--score-key",
        "rating",
    ]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == {"records": 3, "pairs": 1, "written": 1, "removed": {}, "output": str(out)}
    assert data.load_preference_data(out)[0]["chosen"] == [{"role": "assistant", "content": "best reply"}]

    single = _jsonl(
        tmp_path / "single.jsonl",
        [{"prompt": "q", "response": "One. Two. Three."}, {"prompt": "w", "response": "Yes"}],
    )
    argv = ["pairs", str(single), "-o", str(out), "--mode", "single", "--strategy", "truncate", "--no-scores"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["written"], summary["removed"]) == (1, {"chosen == rejected": 1})
    assert json.loads(out.read_text()) == {"prompt": "q", "chosen": "One. Two. Three.", "rejected": "One."}


def test_pairs_errors(tmp_path, capsys):
    src = _jsonl(tmp_path / "s.jsonl", [{"prompt": "p", "response": "r"}])
    assert main(["pairs", str(src), "-o", str(tmp_path / "o.jsonl")]) == 1
    assert "record 0 has no 'score'" in capsys.readouterr().err


def test_tokenizer_subcommand(tmp_path, kto_demo, capsys):
    assert main(["tokenizer", str(kto_demo), "-o", str(tmp_path / "tok"), "--vocab-size", "300"]) == 0
    assert "saved a 300-token byte-level BPE tokenizer" in capsys.readouterr().out
    assert len(AutoTokenizer.from_pretrained(str(tmp_path / "tok"))) == 300


def test_module_entry_point():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "mallowspo_fast.data", "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    for command in ("inspect", "validate", "pairs", "tokenizer"):
        assert command in proc.stdout
