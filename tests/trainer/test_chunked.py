"""``logits_mode: chunked``: the trainer goes from the backbone's hidden states to log-probs chunk by chunk
(the [B, T, V] logits never exist) and must train exactly like the normal path under ZeRO-3."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from trainer_helpers import TINY_MODEL, read_metrics, tiny_overrides

from mallowspo_fast.trainer import load_config, train


def _records(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(out) if "loss" in r and r.get("phase") != "sft"}


@pytest.mark.parametrize("tied", [True, False], ids=["tied_embeddings", "untied_embeddings"])
def test_chunked_trains_like_the_logits_path(pairs_file: Path, tokenizer_dir: Path, tmp_path: Path,
                                             tied: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    from mallowspo_fast.ops import lm_head

    calls = {"chunked": 0}

    def counting(real):
        def fn(hidden, weight, labels, **kw):
            calls["chunked"] += 1
            assert weight.shape[0] > 1 and weight.dim() == 2  # gathered by ZeRO-3, not a partition placeholder
            return real(hidden, weight, labels, **kw)
        return fn

    # the sequence form, and the token form (with the mean logit of the same pass) of the policy's steps
    for name in ("linear_sequence_logprobs", "linear_token_logprobs"):
        monkeypatch.setattr(lm_head, name, counting(getattr(lm_head, name)))

    # Mallows-theta with phi_star=auto: the reference pass, the dispersion and the policy all go
    # through the chunked head; small chunks so that every batch spans several of them.
    common = dict(max_steps=4, loss_type="mallows_theta", phi_star="auto", zero_stage=3, export_model=True,
                  model_config=dict(TINY_MODEL, tie_word_embeddings=tied))
    runs = {}
    for mode in ("logits", "chunked"):
        extra = dict(logits_mode=mode, logits_chunk_size=5) if mode == "chunked" else {}
        out = tmp_path / mode
        cfg = load_config(None, tiny_overrides(pairs_file, tokenizer_dir, out, **common, **extra))
        train(cfg)
        runs[mode] = out
        if mode == "logits":
            assert calls["chunked"] == 0
    assert calls["chunked"] >= 4  # reference pass + four training steps went through the chunked head
    want, got = _records(runs["logits"]), _records(runs["chunked"])
    assert sorted(got) == [1, 2, 3, 4]
    for step in got:
        for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected",
                    "dispersion/neg_log_mean", "grad_norm"):
            abs_tol = 1e-5
            if key == "rewards/margins":
                # A margin is a difference of beta-scaled sums of log-probs that nearly cancel: the two paths
                # sum the logits' matmul in different orders, so its error scales with the summands, not with
                # the (small) margin itself. Allow rel 1e-5 of the summands (the log-probs agree far better).
                abs_tol = max(abs_tol, 1e-5 * cfg.beta * (abs(want[step]["logps/chosen"])
                                                          + abs(want[step]["logps/rejected"])))
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-4, abs=abs_tol), (step, key)
    assert got[4]["loss"] != pytest.approx(got[1]["loss"], abs=1e-3)  # training moved

    # The export of a chunked run is an ordinary Hugging Face model with the usual keys and tying.
    a = AutoModelForCausalLM.from_pretrained(runs["chunked"], dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(runs["logits"], dtype=torch.float32)
    assert type(a.get_output_embeddings()) is torch.nn.Linear
    assert (a.get_output_embeddings().weight.data_ptr() == a.get_input_embeddings().weight.data_ptr()) is tied
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    # Adam scales every element's step to about the learning rate, so an element whose gradient is at roundoff
    # level in both runs (the logits' matmul summed in another order) can move by a fraction of lr differently;
    # observed here: 1 element of 9600 off by 1.1e-4 with lr 5e-3. An error of the chunked head itself would
    # show in the per-step metrics above, compared tightly.
    atol = 0.1 * cfg.learning_rate
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=1e-4, atol=atol, msg=lambda m, key=key: f"{key}: {m}")


def test_chunked_resumes_from_its_checkpoint(pairs_file: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    common = dict(logits_mode="chunked", save_steps=2, zero_stage=3)
    full = tmp_path / "full"
    train(load_config(None, tiny_overrides(pairs_file, tokenizer_dir, full, max_steps=4, **common)))
    part = tmp_path / "part"
    train(load_config(None, tiny_overrides(pairs_file, tokenizer_dir, part, max_steps=2, **common)))
    train(load_config(None, tiny_overrides(pairs_file, tokenizer_dir, part, max_steps=4,
                                           resume_from_checkpoint="auto", **common)))
    want, got = _records(full), _records(part)
    for step in (3, 4):
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5, abs=1e-6), step


@pytest.mark.parametrize("override, message", [
    ({"logits_mode": "hidden"}, "logits_mode must be one of"),
    ({"logits_mode": "chunked", "logits_chunk_size": 0}, "logits_chunk_size must be a positive int"),
])
def test_bad_chunked_settings_are_rejected(pairs_file: Path, tokenizer_dir: Path, tmp_path: Path, override: dict,
                                           message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(None, tiny_overrides(pairs_file, tokenizer_dir, tmp_path, **override))


def test_resume_across_logits_modes_is_refused(pairs_file: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(load_config(None, tiny_overrides(pairs_file, tokenizer_dir, out, max_steps=2, save_steps=2)))
    with pytest.raises(ValueError, match="saved with logits_mode=logits and this run has logits_mode=chunked"):
        train(load_config(None, tiny_overrides(pairs_file, tokenizer_dir, out, max_steps=4, save_steps=2,
                                               logits_mode="chunked", resume_from_checkpoint="auto")))
