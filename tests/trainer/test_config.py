"""Config parsing, validation, CLI argument handling and the DeepSpeed config (nothing is loaded)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from trainer_helpers import TINY_MODEL

from mallowspo_fast.trainer import cli
from mallowspo_fast.trainer.config import FIELDS, TrainConfig, load_config
from mallowspo_fast.trainer.ds_config import build_ref_ds_config, build_train_ds_config, lr_lambda


@pytest.fixture
def base(pairs_file: Path, tmp_path: Path) -> dict:
    return {"model_config": dict(TINY_MODEL), "train_tokenizer": True, "dataset_name": str(pairs_file),
            "output_dir": str(tmp_path / "out")}


def test_yaml_then_overrides_with_types(base: dict, tmp_path: Path) -> None:
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("learning_rate: 1.0e-5\nbeta: 0.2\nloss_type: [sigmoid, mallows_theta]\n"
                         "loss_weights: [1.0, 0.5]\nmodel_config:\n  model_type: llama\n  hidden_size: 32\n")
    cfg = load_config(yaml_file, ["beta=0.3", "learning_rate=1e-6", "bf16=true", "max_prompt_length=null",
                                  "model_config.num_hidden_layers=1", "phi_star=auto", "output_dir=2024"],
                      base=base)
    assert cfg.beta == 0.3 and isinstance(cfg.beta, float)
    assert cfg.learning_rate == 1e-6  # "1e-6" is a string in YAML 1.1: coerced for a float field
    assert cfg.bf16 is True and cfg.max_prompt_length is None and cfg.phi_star == "auto"
    assert cfg.loss_type == ["sigmoid", "mallows_theta"] and cfg.loss_weights == [1.0, 0.5]
    assert cfg.model_config == {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1}
    assert cfg.output_dir == "2024"


def test_single_loss_type_stays_a_string_and_comma_list_splits(base: dict) -> None:
    assert load_config(None, ["loss_type=mallows_phi"], base=base).loss_type == "mallows_phi"
    assert load_config(None, ["loss_type=sigmoid,ipo"], base=base).loss_type == ["sigmoid", "ipo"]


def test_phi_star_number_from_text(base: dict) -> None:
    cfg = load_config(None, ["phi_star=0.5"], base=base)
    assert cfg.phi_star == 0.5 and isinstance(cfg.phi_star, float)


def test_unknown_key_names_it_and_suggests(base: dict) -> None:
    with pytest.raises(ValueError, match=r"unknown config key 'learning_rat'.*did you mean learning_rate"):
        load_config(None, ["learning_rat=1e-5"], base=base)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("beta=-1", "beta must be a positive number"),
        ("beta=abc", "beta: expected a number"),
        ("loss_type=dpo_typo", "loss_type 'dpo_typo' is not supported"),
        ("loss_type=[sigmoid, sigmoid]", "repeats an entry"),
        ("loss_weights=[1.0, 2.0]", "loss_weights has 2 entries but loss_type has 1"),
        ("zero_stage=5", "zero_stage must be 0, 1, 2 or 3"),
        ("lr_scheduler_type=step", "lr_scheduler_type must be one of"),
        ("phi_star=sometimes", "phi_star must be a positive number or 'auto'"),
        ("phi_star=0", "phi_star must be > 0"),
        ("max_prompt_length=64", "max_prompt_length (64) must be smaller than max_length (32)"),
        ("per_device_train_batch_size=0", "per_device_train_batch_size must be >= 1"),
        ("gradient_accumulation_steps=1.5", "gradient_accumulation_steps: expected an int"),
        ("bf16=maybe", "bf16: expected a bool"),
        ("zero_stage=2;offload_param=true", "offload_param needs zero_stage=3"),
        ("warmup_ratio=1.5", "warmup_ratio must be in"),
        ("mixing_alpha=2", "mixing_alpha must be in"),
        ("train_batch_size=6", "train_batch_size=6 must be a multiple"),
        ("resume_from_checkpoint=/nonexistent/checkpoint-3", "no such checkpoint directory"),
        ("model_name_or_path=/nonexistent/model", "give exactly one of model_name_or_path"),
        ("dataset_name=/nonexistent/data.json", "no such file or directory"),
        ("logprob_backend=cuda", "logprob_backend must be one of"),
        ("model_config.hidden_size.x=1", "model_config.hidden_size is 32, not a mapping"),
        ("eval_size=-1", "eval_size must be >= 0"),
        (f"max_steps={10**30}", f"max_steps must be -1 or in [1, 2**63 - 1] (a step count fits in int64), found "
                                f"{10**30}"),
        ("max_steps=9223372036854775808", "max_steps must be -1 or in [1, 2**63 - 1]"),
        (f"sft_warmup_steps={10**30}", "sft_warmup_steps must be in [0, 2**63 - 1]"),
        ("warmup_steps=-1", "warmup_steps must be in [0, 2**63 - 1]"),
        ("eval_size=2;eval_ratio=0.1", "give one of dataset_test_split, eval_ratio and eval_size for the eval split, "
                                       "found eval_ratio=0.1, eval_size=2"),
        ("streaming=true", "streaming=true needs max_steps >= 1: a streamed training split has no length"),
        ("streaming=true;max_steps=5", "streaming=true with loss_type='mallows_theta' (reads reference values) "
                                       "needs precompute_ref_log_probs=false (the precomputed reference pass"),
        ("streaming=true;max_steps=5;precompute_ref_log_probs=false;phi_star=auto",
         "(reads reference values) needs a numeric phi_star (phi_star=auto averages"),
        ("streaming=true;max_steps=5;phi_star=auto", "live reference engine) and a numeric phi_star"),
        ("streaming=true;max_steps=5;loss_type=simpo;eval_ratio=0.1", "streaming=true: eval_ratio=0.1 needs the "
                                                                       "length of the training split"),
        ("streaming=true;max_steps=5;loss_type=simpo;sft_warmup_steps=3",
         "streaming=true: sft_warmup_steps=3 is not supported"),
    ],
    ids=lambda v: v if "=" in v else "",
)
def test_invalid_values_are_rejected_with_the_key(base: dict, override: str, message: str) -> None:
    values = dict(base, max_length=32, max_prompt_length=16, per_device_train_batch_size=4)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(None, override.split(";"), base=values, world_size=1)


def test_streaming_combinations_that_are_accepted(base: dict) -> None:
    cfg = load_config(None, ["streaming=true", "max_steps=5", "precompute_ref_log_probs=false", "eval_size=4"],
                      base=base)
    assert cfg.streaming and cfg.eval_size == 4
    # No reference read by the loss: nothing to precompute, phi_star unused.
    assert load_config(None, ["streaming=true", "max_steps=5", "loss_type=simpo", "phi_star=auto",
                              "dataset_test_split=test"], base=base).streaming


def test_label_smoothing_half_is_rejected_for_robust_only(base: dict) -> None:
    assert load_config(None, ["label_smoothing=0.5"], base=base).label_smoothing == 0.5
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        load_config(None, ["label_smoothing=0.5", "loss_type=robust"], base=base)


def test_missing_model_and_data_are_reported(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="give exactly one of model_name_or_path"):
        load_config(None, {"dataset_name": "x/y"})
    with pytest.raises(ValueError, match="dataset_name is required"):
        load_config(None, {"model_config": dict(TINY_MODEL), "train_tokenizer": True})
    with pytest.raises(ValueError, match="needs a 'model_type'"):
        load_config(None, {"model_config": {"hidden_size": 8}, "train_tokenizer": True, "dataset_name": "org/ds"})
    with pytest.raises(ValueError, match="has no config.json"):
        load_config(None, {"model_name_or_path": str(tmp_path), "dataset_name": "org/ds"})


def test_the_largest_step_count_is_accepted(base: dict) -> None:
    assert load_config(None, [f"max_steps={2**63 - 1}"], base=base).max_steps == 2**63 - 1


def test_train_batch_size_sets_accumulation(base: dict) -> None:
    cfg = load_config(None, ["train_batch_size=32", "per_device_train_batch_size=4"], base=base, world_size=2)
    assert cfg.gradient_accumulation_steps == 4


def test_help_lists_every_key_with_type_and_default(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in FIELDS:
        assert f"  {name} (" in out, name
    assert "learning_rate (float, default 1e-06)" in out
    assert "phi_star (float | str, default 0.29)" in out


def test_cli_config_error_exits_2_before_loading(base: dict, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from mallowspo_fast.trainer import loop

    monkeypatch.setattr(loop, "train", lambda cfg: pytest.fail("training started despite a bad config"))
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(json.dumps(base))
    assert cli.main([str(yaml_file), "beta=0", "no_such_key=1"]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and "no_such_key" in err


def test_cli_flag_forms_and_openrlhf_names() -> None:
    args = cli.parse_args(["run.yaml", "beta=0.2", "--micro_train_batch_size", "4", "--max_len=128", "--bf16",
                           "--load_checkpoint", "--zero_stage", "2", "--local_rank=0", "--save_path", "out",
                           "--gradient_checkpointing", "seed=3"])
    assert args.config == "run.yaml"
    assert dict(args.overrides) == {"beta": "0.2", "per_device_train_batch_size": "4", "max_length": "128",
                                    "bf16": "true", "resume_from_checkpoint": "auto", "zero_stage": "2",
                                    "output_dir": "out", "gradient_checkpointing": "true", "seed": "3"}


def test_print_config_shows_the_deepspeed_config(base: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(json.dumps(base))
    assert cli.main([str(yaml_file), "--print_config", "--zero_stage=3", "offload_param=true"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["config"]["zero_stage"] == 3
    zero = shown["deepspeed"]["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu"
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_ds_config_per_stage(stage: int) -> None:
    cfg = TrainConfig(zero_stage=stage, per_device_train_batch_size=3, gradient_accumulation_steps=2,
                      max_grad_norm=0.5, bf16=stage == 2, offload_optimizer=stage >= 1, learning_rate=2e-5)
    ds = build_train_ds_config(cfg, world_size=4, on_cpu=True)
    batch = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"])
    assert batch == (3, 2, 24)
    assert ds["zero_optimization"]["stage"] == stage and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is (stage == 2)
    assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": 2e-5, "betas": [0.9, 0.999], "eps": 1e-8,
                                                           "weight_decay": 0.0, "torch_adam": True}}
    assert ("offload_optimizer" in ds["zero_optimization"]) is (stage >= 1)
    ref = build_ref_ds_config(cfg, world_size=4)
    assert "optimizer" not in ref and ref["zero_optimization"]["stage"] == (3 if stage == 3 else 0)


def test_ds_config_user_merge_and_batch_conflict() -> None:
    cfg = TrainConfig(deepspeed={"zero_optimization": {"reduce_bucket_size": 1000}, "wall_clock_breakdown": True})
    ds = build_train_ds_config(cfg, world_size=1, on_cpu=False)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1000 and ds["zero_optimization"]["stage"] == 3
    assert ds["wall_clock_breakdown"] is True and "torch_adam" not in ds["optimizer"]["params"]
    cfg = TrainConfig(deepspeed={"train_micro_batch_size_per_gpu": 99})
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=99"):
        build_train_ds_config(cfg, world_size=1, on_cpu=True)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("linear", [0.0, 0.5, 1.0, 0.875, 0.5, 0.0]),
        ("cosine", [0.0, 0.5, 1.0, 0.5 * (1 + math.cos(math.pi / 8)), 0.5, 0.0]),
        ("constant_with_warmup", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]),
    ],
)
def test_lr_schedule_matches_hf_semantics(kind: str, expected: list[float]) -> None:
    f = lr_lambda(kind, warmup=2, total_steps=10)
    got = [f(s) for s in (0, 1, 2, 3, 6, 10)]
    assert got == pytest.approx(expected, abs=1e-12)


CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_configs_validate(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(path.parents[1])  # relative paths are relative to the repository root
    cfg = load_config(path, world_size=8)
    assert cfg.dataset_name


def test_demo_yaml_is_the_embedded_default() -> None:
    from mallowspo_fast.trainer.config import read_config_file
    from mallowspo_fast.trainer.demo import demo_defaults

    written = read_config_file(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml")
    embedded = demo_defaults()
    assert Path(embedded.pop("dataset_name")).name == Path(written.pop("dataset_name")).name
    assert written == embedded


def test_truncation_modes_match_the_data_layer() -> None:
    from mallowspo_fast import data
    from mallowspo_fast.trainer.config import TRUNCATION_MODES

    assert tuple(TRUNCATION_MODES) == tuple(data.TRUNCATION_MODES)
