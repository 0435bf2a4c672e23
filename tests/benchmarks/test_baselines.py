"""The baselines and peers the benchmarks compare with compute what their descriptions say (no timing)."""

from __future__ import annotations

import pytest
import torch

from benchmarks import linear, loss_step, op
from benchmarks.harness import Result, run_in_process
from benchmarks.providers import (
    DESCRIPTIONS,
    LINEAR_DESCRIPTIONS,
    LINEAR_PROVIDERS,
    LOSS_LEVEL,
    PROVIDERS,
    sequence_fn,
    token_fn,
    token_loss_fn,
    whole_token_loss,
)
from benchmarks.report import goals, markdown_table, rows


def test_every_provider_is_described():
    assert set(DESCRIPTIONS) == set(PROVIDERS) and set(LINEAR_DESCRIPTIONS) == set(LINEAR_PROVIDERS)
    assert "per-token reference only" in DESCRIPTIONS["compiled"] and "whole loss" in DESCRIPTIONS["compiled-loss"]
    assert "selective_log_softmax_and_entropy" in DESCRIPTIONS["trl"]
    assert "ChunkedLogProbFunction" in LINEAR_DESCRIPTIONS["trl"]


def _op_inputs():
    logits, labels, g, h = op.make_inputs(12, 70, "fp32", "cpu")
    labels[[1, 5]] = -100
    return logits, labels, g, h


def _loss_and_grad(loss_fn, logits, labels, g, h):
    logits.grad = None
    loss = loss_fn(logits, labels, g, h)
    loss.backward()
    return loss.detach(), logits.grad.clone()


@pytest.mark.parametrize("provider", ["compiled-loss", "trl", "ours"])
def test_op_providers_differentiate_the_same_loss_as_the_reference(provider):
    if provider == "trl":
        pytest.importorskip("trl")
    logits, labels, g, h = _op_inputs()
    loss, grad = _loss_and_grad(token_loss_fn(provider, "cpu"), logits, labels, g, h)
    ref_loss, ref_grad = _loss_and_grad(token_loss_fn("reference", "cpu"), logits, labels, g, h)
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-4)
    assert bool((grad[[1, 5]] == 0).all())  # masked tokens: no gradient


def test_whole_token_loss_is_sum_logp_plus_half_entropy_with_unit_weights():
    logits, labels, _, _ = _op_inputs()
    ones = torch.ones(12)
    lp, ent = token_fn("reference", "cpu")(logits, labels)
    torch.testing.assert_close(whole_token_loss(logits, labels, ones, 0.5 * ones), lp.sum() + 0.5 * ent.sum())


def test_loss_level_baselines_have_no_per_token_outputs():
    for provider in LOSS_LEVEL:
        with pytest.raises(ValueError, match="computes a whole loss"):
            token_fn(provider, "cpu")
        with pytest.raises(ValueError, match="computes a whole loss"):
            sequence_fn(provider, "cpu")


@pytest.mark.parametrize("loss", loss_step.LOSSES)
def test_the_whole_step_loss_is_the_step_of_the_reference(loss):
    logits, labels, ref_w, ref_l = loss_step.make_batch(2, 16, 40, "fp32", "cpu")
    whole = loss_step.whole_step_loss(logits, labels, ref_w, ref_l, loss)
    per_token = loss_step.preference_loss_of(*sequence_fn("reference", "cpu")(logits, labels), 40, ref_w, ref_l, loss)
    torch.testing.assert_close(whole, per_token)


@pytest.mark.parametrize("pass_", op.PASSES)
def test_the_whole_loss_baseline_runs_every_pass_of_the_op(pass_):
    spec = {"subject": "op", "device": "cpu", "provider": "compiled-loss", "pass": pass_, "n": 12, "vocab": 50,
            "dtype": "fp32", "warmup": 1, "repeats": 1, "memory": False}
    r = run_in_process(op.build_case(spec), spec)
    assert r.status == "ok" and r.bytes_moved == op.op_bytes(12, 50, "fp32", pass_)


def test_trl_fused_head_agrees_with_the_reference_with_masked_tokens():
    pytest.importorskip("trl")
    hidden, weight, labels, g, e = linear.make_inputs(16, 8, 40, "fp32", "cpu", mask_frac=0.25)
    fn, ref = linear.linear_fn("trl", "cpu"), linear.linear_fn("reference", "cpu")
    grads = []
    for f in (fn, ref):
        hidden.grad = weight.grad = None
        logps, entropy = f(hidden, weight, labels)
        ((logps * g).sum() + (entropy * e).sum()).backward()
        grads.append((logps.detach(), entropy.detach(), hidden.grad.clone(), weight.grad.clone()))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def _result(provider, ms):
    spec = {"provider": provider, "pass": "fwdbwd", "n": 8, "vocab": 16, "dtype": "fp32", "device": "cpu"}
    return Result(spec, "ok", ms, ms, ms, 1, 100, 1000, 3000.0, 8)


def test_report_compares_with_the_faster_compiled_baseline_and_names_it():
    res = [_result("ours", 1.0), _result("compiled", 3.0), _result("compiled-loss", 2.0), _result("reference", 4.0)]
    table = {r["provider"]: r for r in rows(res, "cpu")}
    assert table["ours"]["strongest_compiled"] == "compiled-loss"
    assert table["ours"]["speedup_vs_strongest_compiled"] == 2.0 and table["ours"]["speedup_vs_compiled"] == 3.0
    md = markdown_table(list(table.values()))
    assert "| speed vs compiled | speed vs strongest compiled | memory vs ref |" in md
    assert "| 4.00× | 3.00× | 2.00× (compiled-loss) |" in md
    row = dict(table["ours"], x_floor=1.5)
    assert goals(row) == "≤2× floor yes, ≥2× compiled-loss yes, mem ≤1.1× yes"
    # Without the whole-loss baseline the table keeps its columns and the goal names `compiled`.
    plain = rows([_result("ours", 1.0), _result("compiled", 1.5)], "cpu")
    assert "strongest" not in markdown_table(plain) and plain[0]["strongest_compiled"] == "compiled"
    assert goals(dict(plain[0], x_floor=3.0)) == "≤2× floor NO, ≥2× compiled NO, mem ≤1.1× yes"
