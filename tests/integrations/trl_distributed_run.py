"""Runs of the TRL integration on several CPU ranks, started by tests/integrations/test_trl_distributed.py.

``dpo OUT STAGE MODEL``: ``MallowsDPOTrainer`` (sigmoid + mallows_theta) for 3 steps from the saved tiny model
MODEL, under ``accelerate launch`` with a DeepSpeed ZeRO-STAGE config (STAGE 0: one process without DeepSpeed, the
reference run); writes the step logs of rank 0 to OUT/logs.json. The weights are loaded, not initialised: ZeRO-3
initialises each partition as it is built, which draws other random numbers than one process does. Parameters
are never persisted (``stage3_param_persistence_threshold`` 0), so ZeRO-3 really gathers the output layer, and
chunks of 2 token rows give the ranks different numbers of chunks.

``fsdp2 OUT LAYOUT``: a tiny Llama under FSDP2's ``fully_shard`` on 2 gloo ranks (LAYOUT ``root``: the output layer
in the root unit with the final norm; ``own``: the output layer its own unit), our head and TRL's head on the same
weights and the same per-rank batches; writes the full output-layer gradient of each to OUT/rank<r>.pt.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import trl_helpers as helpers  # noqa: E402

STEPS = 3


def dpo(out: Path, stage: int, model_dir: str) -> None:
    from transformers import AutoModelForCausalLM

    from mallowspo_fast.integrations.trl import MallowsDPOConfig, MallowsDPOTrainer

    extra = {}
    per_device = 4
    if stage:
        per_device = 2  # two ranks: the same global batch of 4 pairs
        extra["deepspeed"] = {
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
            "train_micro_batch_size_per_gpu": per_device, "gradient_accumulation_steps": 1,
            "gradient_clipping": "auto", "bf16": {"enabled": False}}
    args = helpers.dpo_args(out, MallowsDPOConfig, per_device_train_batch_size=per_device, max_steps=STEPS,
                            loss_type=["sigmoid", "mallows_theta"], loss_weights=[1.0, 0.5], phi_star=0.5,
                            logprob_chunk_size=2, **extra)
    # Separate loads, not a deep copy: under ZeRO-3 the model is partitioned as it is built.
    model, ref = (AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32) for _ in range(2))
    trainer = MallowsDPOTrainer(model=model, ref_model=ref, args=args, train_dataset=helpers.dataset(),
                                processing_class=helpers.tokenizer())
    trainer.train()
    if stage:
        engine = type(trainer.model_wrapped).__name__
        assert engine == "DeepSpeedEngine", engine
    if int(os.environ.get("RANK", "0")) == 0:
        logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
        (out / "logs.json").write_text(json.dumps(logs))


def fsdp2(out: Path, layout: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from trl.trainer.utils import add_fused_lm_head

    from mallowspo_fast.integrations.trl_head import HeadSettings, install_fused_head

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    grads = {}
    for name in ("ours", "trl"):
        model = helpers.tiny_model("llama", 0)
        if name == "ours":
            install_fused_head(model, HeadSettings(outputs=("log_probs", "entropy")))
        else:
            add_fused_lm_head(model, outputs=("log_probs", "entropy"))
        for layer in model.model.layers:
            fully_shard(layer)
        if layout == "own":
            fully_shard(model.lm_head)
        fully_shard(model)
        ids, attn, labels = rank_batch(rank)
        out_ = model(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True)
        (out_.log_probs.sum() / 10 + 0.1 * out_.entropy.sum()).backward()
        grad = model.lm_head.weight.grad
        grads[name] = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
    torch.save(grads, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def rank_batch(rank: int):
    """Rank ``rank``'s half of a fixed batch (the single-process reference concatenates both halves)."""
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, len(helpers.tokenizer()), (4, 10), generator=g)
    attn = torch.ones_like(ids)
    attn[1, 7:] = 0
    attn[3, 4:] = 0
    labels = ids.masked_fill(attn == 0, -100)
    labels[:, :3] = -100
    sl = slice(2 * rank, 2 * rank + 2)
    return ids[sl], attn[sl], labels[sl]


if __name__ == "__main__":
    kind, target = sys.argv[1], Path(sys.argv[2])
    target.mkdir(parents=True, exist_ok=True)
    if kind == "dpo":
        dpo(target, int(sys.argv[3]), sys.argv[4])
    else:
        fsdp2(target, sys.argv[3])
    # The results are on disk. Leave without running the interpreter's teardown: under ZeRO-3 on CPU it can
    # abort in a C++ destructor of a communication thread ("terminate called without an active exception")
    # after a run that finished.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
