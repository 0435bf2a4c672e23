"""The TRL step benchmark subject builds and runs both providers (a smoke run at a tiny size, no timing claims)."""

from __future__ import annotations

import pytest

from benchmarks import trl_step
from benchmarks.harness import run_in_process


def spec(provider, loss="sigmoid"):
    return {"subject": "trl_step", "device": "cpu", "provider": provider, "model": "llama-256x2", "loss": loss,
            "batch": 1, "seq": 12, "prompt": 8, "completion": 4, "vocab": 512, "dtype": "fp32", "warmup": 0,
            "repeats": 1, "memory": False}


def test_both_providers_run_and_compare():
    results = [run_in_process(trl_step.build_case(spec(p, loss)), spec(p, loss))
               for p, loss in (("trl", "sigmoid"), ("ours", "sigmoid"), ("ours", "mallows_theta"))]
    assert all(r.status == "ok" and r.median_ms > 0 for r in results)
    assert results[0].tokens == 2 * 12 and results[0].input_bytes == 2 * 12 * 512 * 4
    md = trl_step.comparison_markdown(results)
    assert "ours (sigmoid) vs TRL (sigmoid): time" in md and "ours (mallows_theta) vs TRL (sigmoid)" in md


def test_trl_provider_only_runs_trl_losses():
    with pytest.raises(ValueError, match="'mallows_theta' needs provider 'ours'"):
        trl_step.build_case(spec("trl", "mallows_theta"))
