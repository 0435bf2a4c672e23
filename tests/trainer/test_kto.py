"""KTO through the trainer (unpaired rows, CPU, ZeRO-3 on gloo): the analytic first step, training, the
loss against ``mpf.kto_loss`` on the same batch, backends agreeing, the precomputed reference (the default)
against the live one and its cache, and what is refused."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from trainer_helpers import (
    TINY_MODEL,
    memorisable_unpaired,
    read_metrics,
    tiny_overrides,
    train_losses,
    write_jsonl,
)

import mallowspo_fast as mpf
from mallowspo_fast.trainer import load_config, train

KTO = dict(loss_type="kto", per_device_train_batch_size=8)  # precomputed reference (the default)
TRL_KTO_KEYS = ("loss", "kl", "rewards/chosen_sum", "rewards/rejected_sum", "logps/chosen_sum", "logps/rejected_sum",
                "count/chosen", "count/rejected", "rewards/chosen", "rewards/rejected", "rewards/margins",
                "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "grad_norm", "learning_rate",
                "num_tokens", "tokens_per_second", "peak_memory_mb")


@pytest.fixture(scope="module")
def kto_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(memorisable_unpaired(), tmp_path_factory.mktemp("kto") / "kto.jsonl")


def run(data: Path, tokenizer_dir: Path, out: Path, **extra) -> Path:
    train(load_config(None, tiny_overrides(data, tokenizer_dir, out, **{**KTO, **extra})))
    return out


def test_kto_starts_at_the_analytic_value_and_learns(kto_file: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    lam_d, lam_u = 1.0, 0.6
    out = run(kto_file, tokenizer_dir, tmp_path / "run", max_steps=10, beta=2.0, learning_rate=1e-2,
              desirable_weight=lam_d, undesirable_weight=lam_u, eval_ratio=0.25)
    records = read_metrics(out)
    train_recs = [r for r in records if "loss" in r]
    first = train_recs[0]
    # Step 1: policy == reference, so r = 0 and z0 = 0: each row costs lambda * sigmoid(0) = lambda / 2.
    n_d, n_u = first["count/chosen"], first["count/rejected"]
    assert n_d + n_u == 8 and n_d > 0 and n_u > 0
    assert first["loss"] == pytest.approx((lam_d * n_d + lam_u * n_u) / (2 * 8), abs=1e-6)
    assert first["kl"] == 0.0 and first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    for key in TRL_KTO_KEYS:
        assert all(r[key] is not None and math.isfinite(r[key]) for r in train_recs), key
    for r in train_recs:  # means are the exact sum / count of the window
        assert r["logps/chosen"] == pytest.approx(r["logps/chosen_sum"] / r["count/chosen"], rel=1e-6)
    # The loss is relative to the first step's weights; normalise by it to see learning.
    losses = [r["loss"] / ((lam_d * r["count/chosen"] + lam_u * r["count/rejected"]) / 16) for r in train_recs]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.1, losses
    assert train_recs[-1]["rewards/margins"] > 0
    ev = [r for r in records if "eval_loss" in r][-1]
    assert ev["eval_count/chosen"] + ev["eval_count/rejected"] == 8  # 25% of 32 rows
    for key in ("loss", "kl", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert math.isfinite(ev[f"eval_{key}"]), key


def test_fused_reference_and_chunked_paths_agree_step_by_step(kto_file: Path, tokenizer_dir: Path,
                                                         tmp_path: Path) -> None:
    common = dict(max_steps=4, beta=2.0, learning_rate=1e-2)
    fused = train_losses(run(kto_file, tokenizer_dir, tmp_path / "fused", logprob_backend="torch", **common))
    naive = train_losses(run(kto_file, tokenizer_dir, tmp_path / "naive", logprob_backend="reference", **common))
    chunked = train_losses(run(kto_file, tokenizer_dir, tmp_path / "chunked", logits_mode="chunked",
                               logits_chunk_size=7, **common))
    assert sorted(fused) == [1, 2, 3, 4]
    for step in fused:
        assert fused[step] == pytest.approx(naive[step], rel=1e-5, abs=1e-6), step
        assert fused[step] == pytest.approx(chunked[step], rel=1e-5, abs=1e-6), step
    assert fused[4] != pytest.approx(fused[1], abs=1e-3)


def _naive_logps(model: torch.nn.Module, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """Summed completion log-prob of one unpadded row (log-softmax of the full logits)."""
    ids = torch.tensor([prompt + completion])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
    targets = ids[0, 1:]
    return logp[torch.arange(len(targets)), targets][len(prompt) - 1:].sum()


def test_batch_loss_equals_kto_loss_on_the_same_batch(kto_file: Path, tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from mallowspo_fast.trainer import batches
    from mallowspo_fast.trainer.step import ReferenceBatch, forward_logprobs, kto_batch_loss

    cfg = load_config(None, tiny_overrides(kto_file, tokenizer_dir, Path("unused"), beta=0.7,
                                           desirable_weight=1.3, undesirable_weight=0.4, **KTO))
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ds = batches.tokenize(cfg, batches.load_raw_splits(cfg)[0], tok)
    torch.manual_seed(0)
    ref = LlamaForCausalLM(LlamaConfig(**{**TINY_MODEL, "vocab_size": len(tok)})).eval()
    policy = LlamaForCausalLM(LlamaConfig(**{**TINY_MODEL, "vocab_size": len(tok)})).eval()  # other weights
    rows = batches.rows(ds, [3, 0, 7, 12, 5])
    batch = batches.collator(cfg, tok)(rows)
    assert batch["input_ids"].shape[0] == 10
    with torch.no_grad():
        res = kto_batch_loss(forward_logprobs(policy, batch, backend="torch"),
                             ReferenceBatch.from_forward(forward_logprobs(ref, batch, backend="torch")),
                             batch["label"], cfg.loss_kwargs())
        naive = {name: torch.stack([_naive_logps(m, r["prompt_ids"], r[key]) for r in rows])
                 for name, m, key in (("pol", policy, "completion_ids"), ("ref", ref, "completion_ids"),
                                      ("pol_kl", policy, "kl_completion_ids"), ("ref_kl", ref, "kl_completion_ids"))}
    want = mpf.kto_loss(naive["pol"], naive["ref"], torch.tensor([r["label"] for r in rows]),
                        policy_kl_logps=naive["pol_kl"], ref_kl_logps=naive["ref_kl"], beta=0.7,
                        desirable_weight=1.3, undesirable_weight=0.4)
    assert want.kl > 0  # different weights: z0 is not clamped away, the KL rows matter
    torch.testing.assert_close(res.loss.double(), want.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.metrics["kl"].double(), want.kl, rtol=1e-5, atol=1e-6)


def test_precomputed_reference_matches_the_live_one(kto_file: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    """The reference pass stores each row's completion and KL-completion log-probs; read by row index they
    give the live reference engine's losses (train and eval), with no reference engine during training."""
    common = dict(max_steps=4, beta=2.0, learning_rate=1e-2, eval_ratio=0.25, eval_steps=2)
    pre = run(kto_file, tokenizer_dir, tmp_path / "pre", **common)
    live = run(kto_file, tokenizer_dir, tmp_path / "live", precompute_ref_log_probs=False, **common)
    got, want = train_losses(pre), train_losses(live)
    assert sorted(got) == [1, 2, 3, 4]
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step
    assert got[4] != pytest.approx(got[1], abs=1e-3)
    evals = [[r for r in read_metrics(out) if "eval_loss" in r] for out in (pre, live)]
    assert [r["step"] for r in evals[0]] == [2, 4]
    for a, b in zip(*evals):
        for key in ("eval_loss", "eval_kl", "eval_rewards/chosen", "eval_rewards/rejected"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    assert evals[0][-1]["eval_kl"] > 0  # the KL rows' reference values are read, not zero-filled
    assert len(list((pre / "ref_cache").glob("reference_*.pt"))) == 2  # train and eval tables
    assert not (live / "ref_cache").exists()


def test_reference_cache_is_reused_and_keyed_by_the_kl_pairing(kto_file: Path, tokenizer_dir: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from mallowspo_fast.trainer import loop, reference

    passes: list[int] = []
    compute = reference.compute_table

    def counted(model, ds, *args, **kwargs):
        passes.append(len(ds))
        return compute(model, ds, *args, **kwargs)

    monkeypatch.setattr(reference, "compute_table", counted)
    common = dict(max_steps=2, ref_cache_dir=str(tmp_path / "cache"))
    first = train_losses(run(kto_file, tokenizer_dir, tmp_path / "a", **common))
    again = train_losses(run(kto_file, tokenizer_dir, tmp_path / "b", **common))
    assert passes == [32] and again == first  # the second run read the cache
    run(kto_file, tokenizer_dir, tmp_path / "c", seed=8, **common)
    assert passes == [32, 32]
    # The seed is in the key through the KL pairing itself, not only through a seeded model's identity.
    cfgs = [load_config(None, tiny_overrides(kto_file, tokenizer_dir, tmp_path / "k", seed=s, **KTO)) for s in (7, 8)]
    keys = {loop.reference_cache_key(c, {"model": "same"}, "same-data", "train") for c in cfgs}
    assert len(keys) == 2


@pytest.mark.parametrize("extra, message", [
    (dict(loss_type=["kto", "sigmoid"]), "cannot be combined with the paired losses"),
    (dict(undesirable_weight=-1.0), "undesirable_weight must be a finite number >= 0"),
    (dict(streaming=True, max_steps=2), "does not support streaming=True"),
    (dict(reference_free=True), "does not support reference_free=True"),
], ids=["kto-in-a-list", "negative-weight", "streaming", "reference-free"])
def test_kto_config_errors(kto_file: Path, tokenizer_dir: Path, tmp_path: Path, extra: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(None, tiny_overrides(kto_file, tokenizer_dir, tmp_path / "out", **{**KTO, **extra}))


def test_paired_and_unpaired_data_mismatch_names_the_columns(kto_file: Path, pairs_file: Path, tokenizer_dir: Path,
                                                            tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"Columns found: \['chosen', 'prompt', 'rejected'\].*completion, label"):
        run(pairs_file, tokenizer_dir, tmp_path / "a")
    with pytest.raises(ValueError, match=r"Columns found: \['completion', 'label', 'prompt'\].*prompt, chosen"):
        run(kto_file, tokenizer_dir, tmp_path / "b", loss_type="sigmoid", precompute_ref_log_probs=True)


@pytest.mark.distributed
def test_two_rank_kto_matches_one_rank(kto_file: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    """Two ranks x 4 rows against one rank x 8: z0 and the metric sums are all-reduced, so the losses (and
    the counts) agree step by step."""
    import json
    import sys

    from test_distributed import _free_port, _launch

    common = dict(max_steps=4, beta=2.0, learning_rate=1e-2, zero_stage=3)
    two = tmp_path / "two"
    cfg = tiny_overrides(kto_file, tokenizer_dir, two, **{**KTO, **common, "per_device_train_batch_size": 4})
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(json.dumps(cfg))
    launcher = Path(sys.executable).parent / "deepspeed"
    _launch([str(launcher), "--num_gpus", "2", "--master_port", str(_free_port()), "--module",
             "mallowspo_fast.train", str(yaml_file)])
    one = run(kto_file, tokenizer_dir, tmp_path / "one", **common)
    got, want = read_metrics(two), read_metrics(one)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(got, want):
        for key in ("loss", "kl", "count/chosen", "rewards/chosen", "rewards/rejected"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["step"], key)
    assert want[-1]["loss"] != pytest.approx(want[0]["loss"], abs=1e-3)
