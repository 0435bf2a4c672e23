"""Export the trained policy in Hugging Face format (safetensors + config + tokenizer).

Under ZeRO-3 each parameter is gathered in turn (``GatheredParameters``, one at a time so no rank holds
two full copies) and rank 0 collects it on the CPU in the training dtype (bf16 when training in bf16,
else fp32). Tied embeddings are one parameter: it is saved once and ``from_pretrained`` re-ties it.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from .launch import DistState, barrier
from .model import hf_model

logger = logging.getLogger("mallowspo_fast.trainer")


def gathered_state_dict(engine: Any, state: DistState) -> dict[str, torch.Tensor]:
    """Full state dict of the engine's module on rank 0 (empty on the other ranks)."""
    import deepspeed

    module = hf_model(engine.module)
    zero3 = engine.zero_optimization_stage() == 3
    out: dict[str, torch.Tensor] = {}
    # named_parameters() yields a tied parameter once, under its first name.
    for name, param in module.named_parameters():
        ctx = deepspeed.zero.GatheredParameters([param], modifier_rank=None) if zero3 else nullcontext()
        with ctx:
            if state.is_main:
                out[name] = param.detach().to("cpu", copy=True)
    persistent = {n for n, _ in module.named_buffers()} - _non_persistent(module)
    for name, buf in module.named_buffers():
        if name in persistent and state.is_main:
            out[name] = buf.detach().to("cpu", copy=True)
    return out


def _non_persistent(module: torch.nn.Module) -> set[str]:
    names = set()
    for prefix, sub in module.named_modules():
        for b in getattr(sub, "_non_persistent_buffers_set", ()):
            names.add(f"{prefix}.{b}" if prefix else b)
    return names


def export_hf(engine: Any, tokenizer: Any, out_dir: str | Path, state: DistState) -> Path:
    """Write ``out_dir`` so that ``AutoModelForCausalLM.from_pretrained(out_dir)`` reloads the policy."""
    out = Path(out_dir)
    sd = gathered_state_dict(engine, state)
    if state.is_main:
        out.mkdir(parents=True, exist_ok=True)
        module = hf_model(engine.module)
        module.config.use_cache = True
        module.save_pretrained(str(out), state_dict=sd, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
        logger.info("exported the model to %s", out)
    barrier(state)
    return out
