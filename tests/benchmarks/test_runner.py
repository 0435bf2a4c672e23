"""The benchmark runner works end to end on tiny shapes (no timing assertions: figures are noise here)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import accuracy, linear, loss_step, op, projection, train_step
from benchmarks.harness import Case, MemoryProbe, Result, peak_bandwidth_gbs, run_in_process, summarize
from benchmarks.providers import availability, linear_availability
from benchmarks.report import markdown_table, rows

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


# ------------------------------------------------------------------------------------------- harness


def test_summary_is_median_and_20_80_percentiles():
    t = summarize([5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 6.0, 7.0, 8.0, 9.0, 0.0])
    assert (t.median_ms, t.p20_ms, t.p80_ms, t.samples) == (5.0, 2.0, 8.0, 11)


def test_summary_of_one_sample():
    t = summarize([3.5])
    assert (t.median_ms, t.p20_ms, t.p80_ms) == (3.5, 3.5, 3.5)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS needs Linux /proc")
def test_extra_peak_leaves_out_the_outputs_a_case_declares():
    def run(_):
        return torch.ones(96 * 2**20 // 4)  # 96 MiB, touched by the fill

    spec = {"device": "cpu", "warmup": 0, "repeats": 1}
    full = run_in_process(Case(run), spec).extra_peak_bytes
    net = run_in_process(Case(run, output_bytes=80 * 2**20), spec).extra_peak_bytes
    assert 90 * 2**20 <= full <= 130 * 2**20, full / 2**20
    assert 10 * 2**20 <= net <= 50 * 2**20 and net < full, net / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS needs Linux /proc")
def test_memory_probe_sees_a_known_allocation_and_ignores_earlier_peaks():
    before = torch.ones(64 * 2**20 // 4)  # an earlier 64 MiB peak that must not count
    del before
    probe = MemoryProbe("cpu")
    probe.start()
    x = torch.ones(96 * 2**20 // 4)  # 96 MiB, touched by the fill
    extra = probe.extra_peak_bytes()
    del x
    assert 90 * 2**20 <= extra <= 130 * 2**20, extra / 2**20


@pytest.mark.parametrize("name,gbs", [("NVIDIA H100 80GB HBM3", 3350.0), ("NVIDIA H100 PCIe", 2000.0),
                                      ("NVIDIA A100-SXM4-80GB", 2039.0), ("NVIDIA H200", 4800.0),
                                      ("NVIDIA L4", 300.0), ("NVIDIA GeForce RTX 4090", 1008.0),
                                      ("Some Future GPU", None)])
def test_peak_bandwidth_lookup(name, gbs):
    assert peak_bandwidth_gbs(name) == gbs


# ------------------------------------------------------------------------------------ byte formulas


def test_op_byte_formula_counts_logits_once_per_read_and_write():
    n, v = 1000, 777
    assert op.op_bytes(n, v, "bf16", "fwd") == n * v * 2
    assert op.op_bytes(n, v, "fp32", "bwd") == 2 * n * v * 4
    assert op.op_bytes(n, v, "fp32", "fwdbwd") == 3 * n * v * 4


def test_linear_flop_formula_counts_the_three_products_over_unmasked_tokens():
    n, h, v = 1000, 64, 777
    assert linear.linear_flops(n, h, v, "fwd") == 2 * n * h * v
    assert linear.linear_flops(n, h, v, "bwd") == 4 * n * h * v
    assert linear.linear_flops(n, h, v, "fwdbwd") == 6 * n * h * v


@pytest.mark.parametrize("n,v,fwd,bwd,total", [(8192, 128256, 0.63, 1.25, 1.88),
                                               (16384, 151936, 1.49, 2.97, 4.46),
                                               (16384, 256000, 2.50, 5.01, 7.51)])
def test_roofline_floor_matches_the_kernels_spec_table(n, v, fwd, bwd, total):
    f = projection.floor_ms(n, v, "bf16", projection.peak_by_name("H100 SXM"))
    assert (round(f["fwd"], 2), round(f["bwd"], 2), round(f["fwdbwd"], 2)) == (fwd, bwd, total)


def test_roofline_table_is_labelled_as_projection():
    md = projection.roofline_table([8192], [32000], ["bf16"], devices=("H100 SXM", "L4"))
    assert md.startswith("**Projection, not a measurement**")
    assert md.count("\n| H100 SXM |") == 1 and md.count("\n| L4 |") == 1


# --------------------------------------------------------------------------------------- the cases


@pytest.mark.parametrize("pass_", op.PASSES)
def test_op_case_runs_every_pass_with_its_byte_count(pass_):
    spec = {"subject": "op", "device": "cpu", "provider": "ours", "pass": pass_, "n": 12, "vocab": 50,
            "dtype": "fp32", "warmup": 1, "repeats": 2}
    r = run_in_process(op.build_case(spec), spec)
    assert r.status == "ok" and r.samples == 2 and r.p20_ms <= r.median_ms <= r.p80_ms
    assert r.bytes_moved == op.op_bytes(12, 50, "fp32", pass_) and r.input_bytes == 12 * 50 * 4


@pytest.mark.parametrize("pass_", linear.PASSES)
def test_linear_case_runs_every_pass_with_its_flops_and_gradient_outputs(pass_):
    spec = {"subject": "linear", "device": "cpu", "provider": "ours-chunked", "pass": pass_, "n": 40, "hidden": 8,
            "vocab": 50, "dtype": "fp32", "mask_frac": 0.5, "chunk_size": 4, "warmup": 1, "repeats": 2,
            "memory": False}
    case = linear.build_case(spec)
    r = run_in_process(case, spec)
    assert r.status == "ok" and r.samples == 2 and r.p20_ms <= r.median_ms <= r.p80_ms
    assert 0 < r.tokens < 40 and r.flops == linear.linear_flops(r.tokens, 8, 50, pass_)  # unmasked tokens only
    assert r.input_bytes == 40 * 50 * 4 and r.tflops > 0 and r.gbs is None
    assert case.output_bytes == (0 if pass_ == "fwd" else (40 * 8 + 50 * 8) * 4)


def test_linear_inputs_are_sequences_of_the_requested_tokens():
    hidden, weight, labels, g, e = linear.make_inputs(36, 8, 50, "bf16", "cpu", mask_frac=0.5)
    assert hidden.shape == (4, 9, 8) and weight.shape == (50, 8) and labels.shape == (4, 9)
    assert hidden.dtype == weight.dtype == torch.bfloat16 and hidden.requires_grad and weight.requires_grad
    assert g.shape == e.shape == (4,) and 0 < int((labels == -100).sum()) < 36


@pytest.mark.parametrize("provider", ["ours-chunked", "ours-logits", "reference"])
def test_linear_providers_agree_with_the_reference(provider):
    hidden, weight, labels, _, _ = linear.make_inputs(16, 8, 40, "fp32", "cpu", mask_frac=0.25)
    logps, entropy = linear.linear_fn(provider, "cpu", chunk_size=3)(hidden, weight, labels)
    ref_logps, ref_entropy = linear.linear_fn("reference", "cpu")(hidden, weight, labels)
    torch.testing.assert_close(logps, ref_logps, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("loss", loss_step.LOSSES)
@pytest.mark.parametrize("provider", ["ours", "reference"])
def test_loss_step_case_runs(provider, loss):
    spec = {"subject": "loss_step", "device": "cpu", "provider": provider, "loss": loss, "batch": 2,
            "seq": 16, "vocab": 40, "dtype": "fp32", "warmup": 0, "repeats": 1, "memory": False}
    r = run_in_process(loss_step.build_case(spec), spec)
    assert r.status == "ok" and 0 < r.tokens < 4 * 16  # prompt and padding are masked


def test_loss_step_batch_masks_prompt_and_padding():
    logits, labels, ref_w, ref_l = loss_step.make_batch(3, 20, 30, "fp32", "cpu")
    assert logits.shape == (6, 20, 30) and ref_w.shape == ref_l.shape == (3,)
    assert (labels[:, :5] == -100).all() and ((labels[:, 5:] >= 0) & (labels[:, 5:] < 30)).any()


def test_train_step_case_changes_the_weights(monkeypatch):
    made = []

    def make_model(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    real = train_step.make_model
    monkeypatch.setattr(train_step, "make_model", make_model)
    spec = {"subject": "train_step", "device": "cpu", "provider": "ours", "model": "llama-tiny",
            "loss": "sigmoid", "batch": 1, "seq": 8, "vocab": 64, "dtype": "fp32", "warmup": 0, "repeats": 1,
            "memory": False}
    case = train_step.build_case(spec)
    before = made[0].lm_head.weight.detach().clone()
    r = run_in_process(case, spec)
    assert r.status == "ok" and r.tokens == 2 * 8
    assert not torch.equal(before, made[0].lm_head.weight)


# --------------------------------------------------------------------------------------------- report


def _result(provider, ms, peak, status="ok"):
    spec = {"provider": provider, "pass": "fwdbwd", "n": 8, "vocab": 16, "dtype": "fp32", "device": "cpu"}
    return Result(spec, status, ms, ms, ms, 1, peak, 1000, 3000.0, 8)


def test_ratios_are_against_the_reference_and_compiled_of_the_same_shape():
    res = [_result("ours", 1.0, 500), _result("reference", 4.0, 2000), _result("compiled", 2.0, 1000),
           _result("trl", None, None, status="not installed")]
    table = {r["provider"]: r for r in rows(res, "cpu")}
    assert table["ours"]["speedup_vs_reference"] == 4.0 and table["ours"]["speedup_vs_compiled"] == 2.0
    assert table["ours"]["memory_vs_reference"] == 0.25 and table["ours"]["extra_peak_x_logits"] == 0.5
    assert table["ours"]["gbs"] == pytest.approx(3000.0 / 1e-3 / 1e9)
    assert table["trl"]["speedup_vs_reference"] is None
    md = markdown_table(list(table.values()))
    assert "| trl | not installed" in md and "4.00×" in md
    assert "| GB/s | % peak |" in md and "TFLOP/s" not in md


def test_flop_subjects_show_tflops_in_place_of_bandwidth():
    spec = {"provider": "ours-chunked", "pass": "fwdbwd", "n": 8, "hidden": 4, "vocab": 16, "dtype": "fp32",
            "mask_frac": 0.0, "device": "cpu"}
    ok = Result(spec, "ok", 2.0, 2.0, 2.0, 1, 100, 1000, None, 8, flops=6e9)
    liger = Result({**spec, "provider": "liger"}, "unsupported", notes="Liger-Kernel runs on CUDA only")
    table = rows([ok, liger], "cpu")
    assert table[0]["tflops"] == pytest.approx(3.0) and table[0]["gbs"] is None
    md = markdown_table(table)
    assert "| pass | N | H | V | dtype | masked | provider |" in md and "| TFLOP/s |" in md and "GB/s" not in md
    assert "| 3 |" in md and "| liger (log-prob only) | unsupported: Liger-Kernel runs on CUDA only |" in md


# ------------------------------------------------------------------------------------ command line


def test_op_command_writes_table_csv_plot_and_header(tmp_path):
    proc = _run("benchmarks.op", "--device", "cpu", "--n", "64", "--vocab", "300", "600", "--dtype", "fp32",
                "--pass", "fwdbwd", "--providers", "ours", "trl", "liger",
                "--warmup", "0", "--repeats", "2", "--out", str(tmp_path))
    text = proc.stdout
    for key in ("- device:", "- torch:", "- triton:", "- date:"):
        assert key in text
    liger_status, liger_reason = availability("liger", "cpu")  # never runnable on CPU
    assert f"| liger (log-prob only) | {liger_status}: {liger_reason} |" in text
    trl_missing = availability("trl", "cpu")  # a peer that is installed runs; one that is not is listed
    assert trl_missing is None or f"| trl | {trl_missing[0]}: {trl_missing[1]} |" in text
    with open(tmp_path / "op.csv") as f:
        table = list(csv.DictReader(f))
    ok = [r for r in table if r["status"] == "ok"]
    expected = {("ours", "300"), ("ours", "600")} | ({("trl", "300"), ("trl", "600")} if trl_missing is None else set())
    assert {(r["provider"], r["vocab"]) for r in ok} == expected
    for r in ok:
        assert float(r["extra_peak_mb"]) >= 0 and float(r["gbs"]) > 0 and float(r["cpu_median_ms"]) > 0
    assert (tmp_path / "op.png").stat().st_size > 0 and (tmp_path / "results.md").read_text() + "\n" == text


def test_linear_command_compares_the_memory_mode_with_the_logits_path(tmp_path):
    # 8 MiB of logits; 16-row chunks of the memory mode hold 0.5 MiB.
    proc = _run("benchmarks.linear", "--device", "cpu", "--n", "256", "--hidden", "16", "--vocab", "8192",
                "--pass", "fwdbwd", "--providers", "ours-chunked", "ours-logits", "liger", "--chunk-size", "16",
                "--warmup", "0", "--repeats", "2", "--out", str(tmp_path))
    text = proc.stdout
    status, reason = linear_availability("liger", "cpu")
    assert f"| fwdbwd | 256 | 16 | 8192 | fp32 | 0.0 | liger (log-prob only) | {status}: {reason} |" in text
    with open(tmp_path / "linear.csv") as f:
        table = {r["provider"]: r for r in csv.DictReader(f)}
    chunked, logits = table["ours-chunked"], table["ours-logits"]
    assert chunked["status"] == logits["status"] == "ok" and float(chunked["tflops"]) > 0
    # The logits path holds the logits and their gradient; the memory mode a few chunks.
    assert float(logits["extra_peak_x_logits"]) >= 1.0
    assert float(chunked["extra_peak_mb"]) < 0.5 * float(logits["extra_peak_mb"])
    assert (tmp_path / "linear.png").stat().st_size > 0


def test_suite_quick_mode_runs_op_linear_and_projection(tmp_path):
    proc = _run("benchmarks", "--quick", "--device", "cpu", "--subjects", "op", "linear", "projection",
                "--providers", "ours", "liger", "--passes", "fwdbwd", "--no-compile", "--out", str(tmp_path))
    text = proc.stdout
    assert "## op" in text and "| fwdbwd | 256 | 2048 | fp32 | ours | " in text
    status, reason = availability("liger", "cpu")  # never runnable on CPU: not installed, or CUDA-only
    assert f"| liger (log-prob only) | {status}: {reason} |" in text
    # "ours" selects both of our hidden-state paths; Liger's fused linear cross entropy is listed, not dropped.
    assert "## linear" in text
    for provider in ("ours-chunked", "ours-logits"):
        assert f"| fwdbwd | 256 | 64 | 2048 | fp32 | 0.0 | {provider} | " in text
    assert text.count("| liger (log-prob only) |") == 2
    assert "**Projection, not a measurement**" in text and "| H100 SXM | 3,350 | 8192 | 32000 | bf16 |" in text
    assert sorted(os.listdir(tmp_path)) == ["linear.csv", "linear.png", "op.csv", "op.png", "results.md"]


def _csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_suite_quick_mode_runs_every_subject(tmp_path):
    proc = _run("benchmarks", "--quick", "--device", "cpu", "--out", str(tmp_path), timeout=1200)
    for section in ("## op", "## linear", "## loss_step", "## train_step", "## projection",
                    "| sequence_reduce | 90 |", "## accuracy: the op against float64",
                    "## accuracy: the memory mode against float64", "## precision: ours on every backend"):
        assert section in proc.stdout
    for subject in ("op", "linear", "loss_step", "train_step"):
        assert any(r["status"] == "ok" for r in _csv(tmp_path / f"{subject}.csv"))
    trl = availability("trl", "cpu") is None
    # The whole-loss baseline next to the per-token one, and the report's strongest compiled column.
    for subject in ("op", "loss_step"):
        ok = {r["provider"] for r in _csv(tmp_path / f"{subject}.csv") if r["status"] == "ok"}
        assert {"ours", "compiled", "compiled-loss"} | ({"trl"} if trl else set()) <= ok, (subject, ok)
    assert "| speed vs strongest compiled |" in proc.stdout
    linear_ok = {r["provider"] for r in _csv(tmp_path / "linear.csv") if r["status"] == "ok"}
    assert {"ours-chunked", "ours-logits", "reference", "compiled"} | ({"trl"} if trl else set()) <= linear_ok
    # Accuracy: every provider measured (TRL's when installed), each error a float64 figure.
    acc = _csv(tmp_path / "accuracy.csv")
    measured = {(r["part"], r["provider"]) for r in acc if r["status"] == "ok"}
    want = {("op", "ours"), ("op", "naive-fp32"), ("linear", "ours"), ("linear", "ours-fp32-logits")}
    want |= {("op", "trl"), ("op", "trl-kernel"), ("linear", "trl")} if trl else set()
    assert want <= measured, measured
    precision = _csv(tmp_path / "precision.csv")
    assert {r["provider"] for r in precision if r["status"] == "ok"} == {"naive-fp32", *accuracy.BACKENDS}
    assert all(0 <= float(r["mean_abs"]) <= float(r["max_abs"]) < 1e-3 for r in precision)
