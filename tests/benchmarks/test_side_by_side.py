"""The side-by-side CPU measurements run and report both settings (tiny shapes; figures, not tests)."""

from __future__ import annotations

import os
import re

from benchmarks import cpu_routes, fp32_logits, grad_pool
from mallowspo_fast.ops import cpu_native, pages, torch_path


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


def test_cpu_routes_measures_the_four_settings_and_restores_the_environment(capsys, monkeypatch):
    monkeypatch.setenv(torch_path.COMPILE_ENV, "1")  # the compiled/native routes on a tiny vocabulary
    monkeypatch.delenv(cpu_native.NATIVE_ENV, raising=False)
    monkeypatch.delenv(pages.HUGE_PAGES_ENV, raising=False)
    assert cpu_routes.main(["--shapes", "32x300", "--dtypes", "fp32", "--rounds", "1", "--per-round", "1"]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| 32 | 300 |")]
    assert [r.split(" | ")[3] for r in rows] == list(cpu_routes.SETTINGS)
    for row in rows:
        fwd, fwdbwd = (float(v) for v in row.split(" | ")[4:6])
        assert 0 < fwd and 0 < fwdbwd, row
    assert cpu_native.NATIVE_ENV not in os.environ and pages.HUGE_PAGES_ENV not in os.environ
