"""The accuracy subject measures against float64, and the float64-sums benchmark really switches the sums.

No accuracy thresholds on the providers: the subject reports figures. What is checked is that a figure is
what it says (an error against float64, taken in float64) and that the tables and the plan are right.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import accuracy
from benchmarks.accumulation import set_compiled_accumulation
from benchmarks.harness import _child_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PLANTED = 1e-9  # far below fp32 resolution at |logp| ~ 10 (ulp ~1e-6): visible only in float64


def _planted_op(logits, labels):
    logp, entropy = accuracy.reference(logits, labels)
    logp = logp.clone()
    logp[2] += PLANTED
    return logp, entropy


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shift", accuracy.SHIFTS)
def test_a_planted_error_below_fp32_resolution_is_measured(dtype, shift):
    cases = [{"dtype": dtype, "vocab": 50, "logits": shift}]
    recs = {r["quantity"]: r for r in accuracy.op_records("op", "planted", _planted_op, cases, 6, "cpu")}
    assert recs["log-prob"]["max_abs"] == pytest.approx(PLANTED, rel=1e-4)
    assert recs["log-prob"]["mean_abs"] == pytest.approx(PLANTED / 6, rel=1e-4)
    assert recs["entropy"]["max_abs"] == 0.0 and recs["entropy"]["mean_abs"] == 0.0


def test_the_memory_mode_reference_is_the_float64_product_of_the_same_inputs():
    def planted(hidden, weight, bias, labels):
        logits = torch.nn.functional.linear(hidden.double(), weight.double(), None if bias is None else bias.double())
        logp, entropy = accuracy.reference(logits, labels)
        return logp, entropy + PLANTED

    cases = [{"dtype": "bf16", "vocab": 40, "logits": "shifted"}]
    recs = {r["quantity"]: r for r in accuracy.linear_records("planted", planted, cases, 5, 8, "cpu")}
    assert recs["log-prob"]["max_abs"] == 0.0
    assert recs["entropy"]["max_abs"] == pytest.approx(PLANTED, rel=1e-4)
    assert recs["entropy"]["mean_abs"] == pytest.approx(PLANTED, rel=1e-4)


def test_naive_fp32_has_a_nonzero_error_against_the_float64_reference():
    cases = [{"dtype": "fp32", "vocab": 3000, "logits": "plain"}]
    recs = accuracy.op_records("op", "naive-fp32", accuracy.naive_fp32, cases, 8, "cpu")
    assert all(0 < r["max_abs"] < 1e-4 and 0 < r["mean_abs"] <= r["max_abs"] for r in recs), recs


def test_errors_need_a_float64_reference_of_the_same_shape():
    ref = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(TypeError, match="reference must be float64, got torch.float32"):
        accuracy.errors(torch.zeros(4), ref.float())
    with pytest.raises(ValueError, match=r"value \(3,\) and reference \(4,\)"):
        accuracy.errors(torch.zeros(3), ref)
    assert accuracy.errors(torch.tensor([0.0, 1.0, -3.0, 0.0]), ref) == (3.0, 1.0)


def test_shifted_inputs_are_offset_by_1e4_and_bf16_inputs_hold_bf16_values():
    plain, labels = accuracy.make_logits(4, 100, "fp32", False)
    shifted, _ = accuracy.make_logits(4, 100, "fp32", True)
    assert plain.abs().max() < 30 and (shifted - accuracy.SHIFT).abs().max() < 30 and labels.max() < 100
    half, _ = accuracy.make_logits(4, 100, "bf16", True)
    assert half.dtype == torch.bfloat16
    h, w, b, lab = accuracy.make_linear(3, 8, 20, "bf16", True)
    assert h.shape == (3, 8) and w.shape == (20, 8) and b.shape == (20,) and bool((b == 10000).all())
    assert accuracy.make_linear(3, 8, 20, "fp32", False)[2] is None


@pytest.mark.parametrize("name", ["ours", "naive-fp32", "trl", "trl-kernel", *accuracy.BACKENDS])
def test_every_op_provider_answers_the_same_question(name):
    if name.startswith("trl"):
        pytest.importorskip("trl")
    logits, labels = accuracy.make_logits(5, 300, "fp32", False)
    logp, entropy = accuracy.op_provider(name, "cpu")(logits, labels)  # the tests run Triton interpreted
    ref_logp, ref_entropy = accuracy.reference(logits, labels)
    torch.testing.assert_close(logp.double(), ref_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", accuracy.LINEAR_PROVIDERS)
def test_every_memory_mode_provider_answers_the_same_question(name):
    if name == "trl":
        pytest.importorskip("trl")
    h, w, b, labels = accuracy.make_linear(6, 8, 50, "fp32", False)
    logp, entropy = accuracy.linear_provider(name)(h, w, b, labels)
    ref_logp, ref_entropy = accuracy.reference(torch.nn.functional.linear(h.double(), w.double()), labels)
    torch.testing.assert_close(logp.double(), ref_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=1e-5, rtol=1e-5)


def test_a_provider_that_cannot_run_gives_a_record_that_says_why():
    spec = {"device": "cpu", "n": 2, "cases": [{"dtype": "fp32", "vocab": 10, "logits": "plain"}]}
    (rec,) = accuracy.run_job("op", "no-such-provider", spec)
    assert rec["status"] == "error" and "unknown accuracy provider 'no-such-provider'" in rec["notes"]


def test_cpu_plan_puts_each_process_setting_in_its_own_process():
    groups = {tuple(sorted(jobs)): env for env, jobs in accuracy.groups("cpu", list(accuracy.PARTS))}
    by_job = {job: env for jobs, env in groups.items() for job in jobs}
    assert by_job[("op", "trl-kernel")]["TRITON_INTERPRET"] == "1"
    assert by_job[("precision", "triton")]["TRITON_INTERPRET"] == "1"
    assert by_job[("precision", "torch-compiled")]["MALLOWSPO_FAST_TORCH_COMPILE"] == "1"
    assert by_job[("precision", "torch-compiled")]["MALLOWSPO_FAST_NATIVE"] == "0"
    assert by_job[("precision", "torch-native")]["MALLOWSPO_FAST_NATIVE"] == "1"
    assert by_job[("precision", "torch-eager")]["MALLOWSPO_FAST_TORCH_COMPILE"] == "0"
    default = by_job[("op", "ours")]
    assert default == {"MALLOWSPO_FAST_TORCH_COMPILE": None, "MALLOWSPO_FAST_BACKEND": None, "TRITON_INTERPRET": None,
                       "MALLOWSPO_FAST_NATIVE": None}
    assert {job for job, env in by_job.items() if env is default} >= {
        ("op", "trl"), ("op", "naive-fp32"), ("precision", "reference"), ("precision", "naive-fp32"),
        *(("linear", p) for p in accuracy.LINEAR_PROVIDERS)}
    assert len(by_job) == sum(len(jobs) for jobs in groups)  # every job once


def test_a_case_environment_sets_and_unsets_variables(monkeypatch):
    monkeypatch.setenv("MALLOWSPO_FAST_BACKEND", "reference")
    env = _child_env({"device": "cpu", "env": {"MALLOWSPO_FAST_BACKEND": None, "MALLOWSPO_FAST_TORCH_COMPILE": "0"}})
    assert "MALLOWSPO_FAST_BACKEND" not in env and env["MALLOWSPO_FAST_TORCH_COMPILE"] == "0"


def _rec(provider, vocab, quantity, worst, mean=1e-7):
    return {"part": "precision", "provider": provider, "n": 64, "dtype": "fp32", "vocab": vocab, "logits": "plain",
            "quantity": quantity, "status": "ok", "max_abs": worst, "mean_abs": mean}


def test_precision_table_says_when_ours_is_worse_than_naive():
    recs = [_rec("naive-fp32", 1000, "log-prob", 2e-6), _rec("naive-fp32", 1000, "entropy", 4e-7),
            _rec("torch-compiled", 1000, "log-prob", 2e-6), _rec("torch-compiled", 1000, "entropy", 1e-7),
            _rec("torch-eager", 1000, "log-prob", 1e-6), _rec("torch-eager", 1000, "entropy", 8e-7),
            {"part": "precision", "provider": "triton", "status": "unsupported", "notes": "no Triton"}]
    md = accuracy.precision_markdown(recs)
    assert "| 1000 | torch-compiled | 2.00e-06 (2.00e-06) | 1.00e-07 (1.00e-07) | 1.00e-07 (4.00e-07) |" in md
    assert md.count("| yes |") == 1 and "| NO: entropy max 2.00× naive |" in md
    assert "Not measured: triton: unsupported (no Triton)." in md


def test_comparison_table_has_one_column_per_provider():
    recs = [{**_rec(p, 32000, q, w), "part": "op", "logits": "shifted"}
            for p, w in (("ours", 1e-7), ("trl-kernel", 2e-3)) for q in accuracy.QUANTITIES]
    md = accuracy.comparison_markdown(recs, "op")
    assert "| dtype | V | logits | quantity | ours | trl-kernel |" in md
    assert "| fp32 | 32000 | shifted | entropy | 1.00e-07 / 1.00e-07 | 2.00e-03 / 1.00e-07 |" in md


def test_csvs_hold_every_record(tmp_path):
    recs = [_rec("naive-fp32", 1000, "log-prob", 2e-6), {**_rec("ours", 300, "entropy", 1e-7), "part": "op"}]
    paths = accuracy.write_csvs(recs, str(tmp_path))
    assert sorted(os.path.basename(p) for p in paths) == ["accuracy.csv", "precision.csv"]
    assert (tmp_path / "precision.csv").read_text().count("\n") == 2


# -------------------------------------------------------------------------------- float64 vs fp32 sums


def test_the_accumulator_is_chosen_before_the_first_call_only(monkeypatch):
    from mallowspo_fast.ops import torch_path

    with pytest.raises(ValueError, match="acc must be one of .* got 'fp16'"):
        set_compiled_accumulation("fp16")
    monkeypatch.setattr(torch_path._CompileState, "kernels", {"fwd": object()})
    with pytest.raises(RuntimeError, match="already built"):
        set_compiled_accumulation("fp32")


_SUMS_SCRIPT = """
import json, sys, torch
from benchmarks.accumulation import set_compiled_accumulation
set_compiled_accumulation(sys.argv[1])
import mallowspo_fast as mpf
from mallowspo_fast.ops import torch_path
gen = torch.Generator().manual_seed(0)
logits = torch.randn(8, 4096, generator=gen) * 3
out = mpf.token_logprobs(logits, torch.randint(0, 4096, (8,), generator=gen), backend="torch")
assert "fwd" in torch_path._CompileState.kernels and torch_path._CompileState.failed is None
print(json.dumps([out.logps.tolist(), out.entropy.tolist()]))
"""


def test_fp32_sums_change_the_compiled_forward():
    outs = {}
    for acc in ("fp64", "fp32"):
        env = _child_env({"device": "cpu", "env": {"MALLOWSPO_FAST_TORCH_COMPILE": "1", "TRITON_INTERPRET": None,
                                                   "MALLOWSPO_FAST_NATIVE": "0"}})
        proc = subprocess.run([sys.executable, "-c", _SUMS_SCRIPT, acc], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs[acc] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outs["fp64"] != outs["fp32"]  # the same loop with another accumulator: other roundings
    torch.testing.assert_close(torch.tensor(outs["fp64"]), torch.tensor(outs["fp32"]), atol=1e-4, rtol=1e-4)
