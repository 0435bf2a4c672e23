"""The two side-by-side CPU measurements run and report both settings (tiny shapes; figures, not tests)."""

from __future__ import annotations

import re

from benchmarks import fp32_logits, grad_pool
from mallowspo_fast.ops import torch_path


def test_grad_pool_measures_both_settings_and_leaves_the_pool_empty(capsys, monkeypatch):
    monkeypatch.setenv(torch_path.POOL_ENV, "0")
    assert grad_pool.main(["--shapes", "64x300", "--rounds", "1", "--per-round", "1"]) == 0
    line = capsys.readouterr().out.strip().split("\n")[-1]
    m = re.fullmatch(r"N=64 V=300: pool off ([\d.]+) ms, pool on ([\d.]+) ms, off/on ([\d.]+)x", line)
    assert m and float(m.group(1)) > 0 and float(m.group(2)) > 0, line
    assert torch_path._GradPool.buffers == {}


def test_fp32_logits_measures_both_settings(capsys):
    assert fp32_logits.main(["--device", "cpu", "--shapes", "32x16x300", "--rounds", "1", "--per-round", "1"]) == 0
    line = capsys.readouterr().out.strip().split("\n")[-1]
    m = re.fullmatch(r"N=32 H=16 V=300: bf16 chunk logits (\d+) ms, fp32 chunk logits (\d+) ms "
                     r"\(fp32/bf16 ([\d.]+|inf|nan)x\)", line)
    assert m, line
