"""The exported Hugging Face model reloads with transformers and matches the trained weights exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from trainer_helpers import TINY_MODEL, tiny_overrides

from mallowspo_fast.trainer import load_config, train


@pytest.mark.parametrize("tied", [True, False], ids=["tied_embeddings", "untied_embeddings"])
def test_export_reloads_with_identical_logits(pairs_file: Path, tokenizer_dir: Path, tmp_path: Path,
                                              tied: bool) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    model_config = dict(TINY_MODEL, tie_word_embeddings=tied)
    result = train(load_config(None, tiny_overrides(pairs_file, tokenizer_dir, out, max_steps=3, export_model=True,
                                                    model_config=model_config)))
    assert result.model_dir == str(out)

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    # The trained weights, independently: DeepSpeed's own consolidation of the ZeRO-3 checkpoint.
    trained = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out), dtype=torch.float32)
    state = get_fp32_state_dict_from_zero_checkpoint(str(out), tag="checkpoint-3")
    missing, unexpected = trained.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    if tied:
        trained.tie_weights()
    trained.eval()

    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out), dtype=torch.float32)
    assert not torch.equal(fresh.model.embed_tokens.weight, reloaded.model.embed_tokens.weight)

    tok = AutoTokenizer.from_pretrained(out)
    ids = tok(["Name something red: apple", "Name something blue:"], return_tensors="pt", padding=True)
    with torch.no_grad():
        got = reloaded(**ids).logits
        want = trained(**ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    head, emb = reloaded.get_output_embeddings().weight, reloaded.get_input_embeddings().weight
    assert (head.data_ptr() == emb.data_ptr()) is tied
    assert reloaded.config.tie_word_embeddings is tied
