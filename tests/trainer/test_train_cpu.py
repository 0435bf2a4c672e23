"""Single-process training on CPU (DeepSpeed ZeRO-3, gloo): losses, paths that must agree, metrics, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from trainer_helpers import read_metrics, tiny_overrides, train_losses

from mallowspo_fast.trainer import cli, load_config, train

TRL_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected", "logits/chosen", "logits/rejected", "grad_norm", "learning_rate", "num_tokens")
OUR_KEYS = ("dispersion/neg_log_mean", "dispersion/neg_log_std", "dispersion/entropy_mean", "tokens_per_second",
            "peak_memory_mb")


def run(pairs_file: Path, tokenizer_dir: Path, out: Path, **extra) -> Path:
    train(load_config(None, tiny_overrides(pairs_file, tokenizer_dir, out, **extra)))
    return out


def test_sigmoid_starts_at_ln2_and_decreases(pairs_file: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    out = run(pairs_file, tokenizer_dir, tmp_path / "run", max_steps=8)
    records = [r for r in read_metrics(out) if "loss" in r]
    # Step 1: the policy is the reference, so the margin is 0 (up to padding-shape rounding) and loss = ln 2.
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert abs(records[0]["rewards/margins"]) < 1e-5
    losses = [r["loss"] for r in records]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-2:]) / 2 < losses[0] - 0.05, losses
    assert records[-1]["rewards/accuracies"] > 0.5


def test_fused_and_reference_paths_agree_step_by_step(pairs_file: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    common = dict(max_steps=4, loss_type="mallows_theta", phi_star="auto")
    fused = train_losses(run(pairs_file, tokenizer_dir, tmp_path / "fused", logprob_backend="torch", **common))
    naive = train_losses(run(pairs_file, tokenizer_dir, tmp_path / "naive", logprob_backend="reference", **common))
    assert sorted(fused) == [1, 2, 3, 4]
    for step in fused:
        assert fused[step] == pytest.approx(naive[step], rel=1e-5, abs=1e-6), step
    assert fused[4] != pytest.approx(fused[1], abs=1e-3)  # training moved: the comparison is not vacuous


def test_live_reference_matches_precomputed(pairs_file: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    common = dict(max_steps=3, loss_type="mallows_theta", phi_star=0.5)
    pre = train_losses(run(pairs_file, tokenizer_dir, tmp_path / "pre", precompute_ref_log_probs=True, **common))
    live = train_losses(run(pairs_file, tokenizer_dir, tmp_path / "live", precompute_ref_log_probs=False, **common))
    for step in pre:
        assert pre[step] == pytest.approx(live[step], rel=1e-5, abs=1e-6), step
    assert not (tmp_path / "live" / "ref_cache").exists()


def test_gradient_accumulation_matches_a_larger_micro_batch(pairs_file: Path, tokenizer_dir: Path,
                                                            tmp_path: Path) -> None:
    big = train_losses(run(pairs_file, tokenizer_dir, tmp_path / "big", max_steps=3, per_device_train_batch_size=4))
    acc = train_losses(run(pairs_file, tokenizer_dir, tmp_path / "acc", max_steps=3, per_device_train_batch_size=2,
                           gradient_accumulation_steps=2))
    for step in big:
        assert big[step] == pytest.approx(acc[step], rel=1e-5, abs=1e-6), step
    assert big[3] != pytest.approx(big[1], abs=1e-3)


def test_metrics_eval_and_curves(pairs_file: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    out = run(pairs_file, tokenizer_dir, tmp_path / "run", max_steps=4, eval_ratio=0.25, eval_steps=2,
              loss_type="mallows_theta", phi_star="auto", plot_curves=True, logging_steps=2,
              ref_cache_dir=str(tmp_path / "cache"))
    records = read_metrics(out)
    train_recs = [r for r in records if "loss" in r]
    eval_recs = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train_recs] == [2, 4] and [r["step"] for r in eval_recs] == [2, 4]
    for key in TRL_KEYS + OUR_KEYS:
        assert all(r[key] is not None and math.isfinite(r[key]) for r in train_recs), key
    for key in ("loss", "rewards/accuracies", "rewards/margins", "dispersion/neg_log_mean"):
        assert math.isfinite(eval_recs[-1][f"eval_{key}"]), key
    assert train_recs[-1]["num_tokens"] > train_recs[0]["num_tokens"] > 0
    # phi_star = auto makes the mean dispersion weight over the training set exactly 1; a window of
    # 2 steps x 4 of the 12 training pairs averages close to it.
    assert 0.5 < train_recs[0]["dispersion/neg_log_mean"] < 1.5
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((tmp_path / "cache").glob("reference_*.pt"))) == 2  # train and eval tables


def test_reference_cache_is_reused(pairs_file: Path, tokenizer_dir: Path, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from mallowspo_fast.trainer import reference

    cache = str(tmp_path / "cache")
    first = train_losses(run(pairs_file, tokenizer_dir, tmp_path / "a", max_steps=2, ref_cache_dir=cache))
    monkeypatch.setattr(reference, "compute_table", lambda *a, **k: pytest.fail("the cached table was recomputed"))
    second = train_losses(run(pairs_file, tokenizer_dir, tmp_path / "b", max_steps=2, ref_cache_dir=cache))
    assert first == second


def test_bad_data_gives_a_clear_error(tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"question": f"q{i}", "answer": "a"}) + "\n" for i in range(8)))
    cfg = tiny_overrides(bad, tokenizer_dir, tmp_path / "out")
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(json.dumps(cfg))
    assert cli.main([str(yaml_file)]) == 1
    err = capsys.readouterr().err
    assert "question" in err and "answer" in err, err


def test_too_little_data_for_one_global_batch(pairs_file: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="has 3 pairs, fewer than one global batch of 4"):
        run(pairs_file, tokenizer_dir, tmp_path / "out", max_train_samples=3)


def _vm_size_mib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("VmSize not found")


def test_repeated_training_in_one_process_frees_its_engines(pairs_file: Path, tokenizer_dir: Path,
                                                            tmp_path: Path) -> None:
    # Each ZeRO-3 engine reserves ~2 GB of gradient buckets (virtual memory even on CPU); a process that
    # calls train() repeatedly (sweeps, experiments, notebooks) must not keep them: forks start failing.
    run(pairs_file, tokenizer_dir, tmp_path / "warm", max_steps=1)
    before = _vm_size_mib()
    for i in range(2):
        run(pairs_file, tokenizer_dir, tmp_path / f"again{i}", max_steps=1, precompute_ref_log_probs=False,
            loss_type="mallows_theta", phi_star=0.5)
    assert _vm_size_mib() - before < 1024, "DeepSpeed engines (policy or live reference) were not released"
