"""Non-finite values: a non-finite loss or gradient norm is caught before the optimizer applies it.

``on_nonfinite: stop`` (default) raises naming the step and the rows, with the last checkpoint intact;
``skip`` leaves the weights, optimizer moments and schedule untouched for that step, counts it, and stops
after ``max_nonfinite_in_a_row``. Values are made non-finite in-process at chosen steps and rows.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from trainer_helpers import read_metrics, tiny_overrides, train_losses

from mallowspo_fast.trainer import checkpoint, load_config, loop, train
from mallowspo_fast.trainer.faults import NonFiniteError

COMMON = dict(max_steps=6, save_steps=2, lr_scheduler_type="linear", warmup_steps=2)


class _InfGrad(torch.autograd.Function):
    """Identity forward, infinite gradient backward (a finite loss with a non-finite gradient norm)."""

    @staticmethod
    def forward(ctx, x):  # noqa: D102
        return x.clone()

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        return g * float("inf")


def _poison(monkeypatch: pytest.MonkeyPatch, steps: set[int], kind: str = "nan_row") -> list[int]:
    """Make training forward number s (= optimizer step s: no accumulation, no eval) non-finite for
    s in ``steps``: ``nan_row`` sets the log-prob of the micro-batch's second chosen row to NaN, ``inf_grad``
    keeps the values and makes the gradient infinite. Returns the dataset indices of the poisoned rows."""
    real = loop.forward_logprobs
    calls, rows = [0], []

    def forward(model, batch, **kwargs):
        out = real(model, batch, **kwargs)
        if not model.training:
            return out
        calls[0] += 1
        if calls[0] in steps:
            if kind == "nan_row":
                mask = torch.zeros_like(out.logps, dtype=torch.bool)
                mask[1] = True
                out.logps = torch.where(mask, torch.full_like(out.logps, float("nan")), out.logps)
                rows.append(int(batch["index"][1]))
            else:
                out.logps = _InfGrad.apply(out.logps)
        return out

    monkeypatch.setattr(loop, "forward_logprobs", forward)
    return rows


def _cfg(pairs_file: Path, tokenizer_dir: Path, out: Path, **extra) -> object:
    return load_config(None, tiny_overrides(pairs_file, tokenizer_dir, out, **{**COMMON, **extra}))


@pytest.fixture(scope="module")
def uninterrupted(pairs_file: Path, tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clean")
    train(_cfg(pairs_file, tokenizer_dir, out))
    return out


def _flat_fp32(ckpt: Path) -> torch.Tensor:
    (optim,) = ckpt.glob("*optim_states.pt")
    return torch.cat(torch.load(optim, weights_only=False)["optimizer_state_dict"]["fp32_flat_groups"])


def test_nonfinite_loss_stops_naming_step_and_rows_and_keeps_the_checkpoint(
        uninterrupted: Path, pairs_file: Path, tokenizer_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    rows = _poison(monkeypatch, {3})
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError) as err:
        train(_cfg(pairs_file, tokenizer_dir, out))
    message = str(err.value)
    assert f"optimizer step 3: non-finite loss or log-probs in rows [{rows[0]}]" in message, message
    assert "the last checkpoint" in message and "intact" in message
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-2"]  # nothing saved after the fault
    assert checkpoint.verify(out / "checkpoint-2") == []
    assert sorted(train_losses(out)) == [1, 2]  # step 3 was not logged

    monkeypatch.undo()  # the next run resumes from the intact checkpoint and matches the clean run
    train(_cfg(pairs_file, tokenizer_dir, out, resume_from_checkpoint="auto"))
    want, got = train_losses(uninterrupted), train_losses(out)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step


def test_skip_leaves_weights_moments_and_schedule_untouched_and_counts(
        uninterrupted: Path, pairs_file: Path, tokenizer_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    _poison(monkeypatch, {3})
    out = tmp_path / "run"
    result = train(_cfg(pairs_file, tokenizer_dir, out, on_nonfinite="skip", save_steps=1))
    assert result.step == 6 and result.stopped_by is None
    records = {r["step"]: r for r in read_metrics(out) if "learning_rate" in r}
    assert [records[s]["nonfinite_skipped"] for s in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    assert "loss" not in records[3] and records[3]["grad_norm"] is None  # nothing averaged; norm inf -> null
    assert all(math.isfinite(records[s]["loss"]) and math.isfinite(records[s]["grad_norm"]) for s in (1, 2, 4, 5, 6))
    clean = {r["step"]: r for r in read_metrics(uninterrupted) if "learning_rate" in r}
    # the schedule did not advance at the skipped step: from then on it lags the clean run by one step
    assert [records[s]["learning_rate"] for s in (1, 2, 3)] == [clean[s]["learning_rate"] for s in (1, 2, 2)]
    assert [records[s]["learning_rate"] for s in (4, 5, 6)] == [clean[s]["learning_rate"] for s in (3, 4, 5)]
    # weights and Adam moments after step 3 are those after step 2; step 4 updates them again
    before, skipped, after = (torch.load(next((out / f"checkpoint-{s}").glob("*optim_states.pt")), weights_only=False)
                              ["optimizer_state_dict"] for s in (2, 3, 4))
    torch.testing.assert_close(skipped["fp32_flat_groups"], before["fp32_flat_groups"], rtol=0, atol=0)
    torch.testing.assert_close(skipped["optimizer_state_dict"]["state"], before["optimizer_state_dict"]["state"],
                               rtol=0, atol=0)
    assert not torch.equal(after["fp32_flat_groups"][0], skipped["fp32_flat_groups"][0])
    state_file = checkpoint.list_checkpoints(out)[-1] / "trainer_state.json"
    assert state_file.read_text().count('"nonfinite_skipped": 1') == 1


def test_skip_stops_after_max_in_a_row(pairs_file: Path, tokenizer_dir: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    rows = _poison(monkeypatch, {3, 4})
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"optimizer step 4: 2 updates in a row were skipped") as err:
        train(_cfg(pairs_file, tokenizer_dir, out, on_nonfinite="skip", max_nonfinite_in_a_row=2))
    assert f"rows [{rows[1]}]" in str(err.value)
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-2"]


def test_nonfinite_gradient_norm_with_finite_loss_stops(pairs_file: Path, tokenizer_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _poison(monkeypatch, {2}, kind="inf_grad")
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"optimizer step 2: non-finite gradient norm \(every row's loss"):
        train(_cfg(pairs_file, tokenizer_dir, out))
    assert checkpoint.list_checkpoints(out) == [] and sorted(train_losses(out)) == [1]


def test_zero_stage_0_fp32_checks_the_gradient_norm_itself(pairs_file: Path, tokenizer_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a ZeRO optimizer the engine applies any update: the guard's own norm check must stop it."""
    rows = _poison(monkeypatch, {2})
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError) as err:
        train(_cfg(pairs_file, tokenizer_dir, out, zero_stage=0, max_steps=3))
    assert f"optimizer step 2: non-finite loss or log-probs in rows [{rows[0]}]" in str(err.value)
    with pytest.raises(ValueError, match="on_nonfinite=skip needs zero_stage >= 1 or bf16=true"):
        _cfg(pairs_file, tokenizer_dir, out, zero_stage=0, on_nonfinite="skip")


@pytest.mark.parametrize("zero_stage", [3, 0])
def test_sft_warmup_nonfinite_stops_naming_the_step_and_exports_nothing(
        pairs_file: Path, tokenizer_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        zero_stage: int) -> None:
    """The SFT warm-up has the main loop's guard: forward 2 is the warm-up's step 2 (no accumulation)."""
    rows = _poison(monkeypatch, {2})
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError) as err:
        train(_cfg(pairs_file, tokenizer_dir, out, sft_warmup_steps=3, max_steps=1, zero_stage=zero_stage))
    message = str(err.value)
    assert f"SFT warm-up step 2: non-finite loss or log-probs in rows [{rows[0]}]" in message, message
    assert "the update was not applied and the warm-up was not exported" in message
    assert not (out / "sft_warmup" / "sft_warmup_key.txt").exists()
    assert [r["step"] for r in read_metrics(out)] == [1]  # the warm-up's step 1 only


def test_sft_warmup_skip_counts_and_keeps_the_weights_finite(pairs_file: Path, tokenizer_dir: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    _poison(monkeypatch, {2})
    out = tmp_path / "run"
    result = train(_cfg(pairs_file, tokenizer_dir, out, sft_warmup_steps=3, max_steps=2, on_nonfinite="skip"))
    assert result.step == 2 and result.stopped_by is None
    sft = {r["step"]: r for r in read_metrics(out) if r.get("phase") == "sft"}
    assert [sft[s]["nonfinite_skipped"] for s in (1, 2, 3)] == [0, 1, 1]
    assert "sft_loss" not in sft[2] and all(math.isfinite(sft[s]["sft_loss"]) for s in (1, 3))
    main = [r for r in read_metrics(out) if "learning_rate" in r and r.get("phase") != "sft"]
    assert [r["nonfinite_skipped"] for r in main] == [0, 0]  # the preference loop counts its own
    from safetensors.torch import load_file

    weights = load_file(out / "sft_warmup" / "model.safetensors")
    assert weights and all(bool(torch.isfinite(w).all()) for w in weights.values())
