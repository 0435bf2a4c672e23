"""Our fused op as the LM head of every TRL trainer (tested with TRL 1.16.0, the ``[trl]`` extra).

TRL 1.16's DPO, KTO, GRPO, RLOO and SFT trainers compute per-token log-probs through a "fused LM head":
``add_fused_lm_head(model, temperature=..., cast_lm_head_to_fp32=..., outputs=...)`` makes
``model(..., labels=labels, fused_lm_head=True)`` run the backbone and return a ``FusedCausalLMOutput``
(``log_probs``, ``entropy``, ``log_sum_sq_probs``, ``mean_logits``, ``is_top1``, ``loss``, ``aux_loss``)
instead of logits. :func:`patch_trainer` replaces that forward, on every model of a trainer that has it, by
:func:`install_fused_head` with the same settings (read from TRL's own head): same call, same output, computed
by our memory-mode op (:func:`mallowspo_fast.linear_token_logprobs`: logits chunk by chunk, every statistic in
one pass, never a ``[B, T, V]`` tensor).

What the head does and how it differs from TRL's:

- The op runs *inside the output layer's module call*: the layer keeps its module (and every hook on it) and
  only gains a second calling convention. DeepSpeed ZeRO-3 therefore gathers the weight once per call for the
  forward and once for the backward (its module hooks), never per chunk, so ranks holding different numbers of
  tokens cannot hang; FSDP2 unshards the weight the same way whether the layer shares a unit with the final
  norm or is a unit of its own, and reduce-scatters its gradient through its own hooks (TRL's head reads the
  sharded weight with ``full_tensor()`` instead).
- Soft-capped and scaled logits (Gemma-2/3, Cohere, Granite, Falcon-H1, ...) come from
  :func:`mallowspo_fast.ops.lm_head.head_transform`; temperature and ``cast_lm_head_to_fp32`` as TRL's;
  products in the autocast dtype (else the hidden states' dtype), weight gradient accumulated in fp32; a
  frozen head (LoRA elsewhere) gets no weight-gradient product; MoE router logits and the load-balancing loss
  as TRL adds them.
- ``padding_free=True`` packs right-padded rows into one row before the backbone (``position_ids`` restart at
  every sequence) and scatters the hidden states back, so TRL's trainer code, which expects padded rows, runs
  unchanged while the backbone skips every pad token.
- Refused with a ValueError naming the cause: an output layer that LoRA adapts (its weight alone would give
  other logits; TRL's head has the same limitation but does not say so), and output-layer transforms the op
  cannot apply.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import types
from dataclasses import dataclass, replace
from typing import Any

import torch
from trl.trainer.utils import FusedCausalLMOutput

from ..ops import IGNORE_INDEX, linear_token_logprobs
from ..ops.lm_head import head_transform

__all__ = ["TESTED_TRL_VERSION", "HeadSettings", "install_fused_head", "patch_trainer", "trl_head_settings"]

TESTED_TRL_VERSION = "1.16.0"
OUTPUT_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@dataclass(frozen=True)
class HeadSettings:
    """How the head computes: TRL's arguments of ``add_fused_lm_head`` plus the op's.

    Attributes:
        temperature: divisor of the logits (GRPO and RLOO pass theirs).
        cast_lm_head_to_fp32: run the products in fp32, outside autocast (GRPO's ``cast_lm_head_to_fp32``).
        outputs: the per-token fields to fill (``log_probs`` always); the others are None, as in TRL.
        backend: "triton", "torch" or None (triton on CUDA).
        chunk_size: token rows per chunk of logits (None: about 48 MiB of fp32 logits on CPU, 256 MiB on GPUs).
        padding_free: pack right-padded rows into one before the backbone.
    """

    temperature: float = 1.0
    cast_lm_head_to_fp32: bool = False
    outputs: tuple[str, ...] = ("log_probs",)
    backend: str | None = None
    chunk_size: int | None = None
    padding_free: bool = False


def trl_head_settings(model: torch.nn.Module) -> HeadSettings | None:
    """The settings TRL's ``add_fused_lm_head`` installed on ``model`` (read from the closure of its forward), or
    None when ``model`` has no TRL fused head (already ours, or never patched by TRL)."""
    fn = getattr(_base_forward(model), "__func__", None)
    code = getattr(fn, "__code__", None)  # functools.wraps renamed the function, not its code
    if code is None or code.co_name != "_fused_forward" or f"{os.sep}trl{os.sep}" not in code.co_filename:
        return None
    names = inspect.getclosurevars(fn).nonlocals
    missing = {"temperature", "cast_lm_head_to_fp32", "outputs"} - set(names)
    if missing:
        raise RuntimeError(f"the TRL fused head of {type(model).__name__} does not hold {sorted(missing)}: this TRL "
                           f"version differs from the tested {TESTED_TRL_VERSION}")
    return HeadSettings(temperature=names["temperature"], cast_lm_head_to_fp32=names["cast_lm_head_to_fp32"],
                        outputs=tuple(names["outputs"]))


def _base_forward(model: torch.nn.Module):
    """The model's own instance forward, under accelerate's mixed-precision wrapper if it has one (accelerate keeps
    the forward it wrapped as ``_original_forward``; a stale one, left by an earlier trainer, is ignored)."""
    forward = model.__dict__.get("forward")
    fn = getattr(forward, "__func__", forward)
    code = getattr(fn, "__code__", None)
    wrapper = code is not None and f"{os.sep}accelerate{os.sep}" in code.co_filename
    return model.__dict__.get("_original_forward") if wrapper else forward


def _is_ours(model: torch.nn.Module) -> bool:
    return getattr(getattr(_base_forward(model), "__func__", None), "_mpf_fused_head", False)


def _rewrap_like_accelerate(model: torch.nn.Module, accelerator) -> None:
    """Put accelerate's mixed-precision wrapper (autocast, fp32 outputs) back around our forward, as
    ``Accelerator.prepare_model`` put it around the one we replaced (TRL prepares the reference that way)."""
    from accelerate.utils import convert_outputs_to_fp32, get_mixed_precision_context_manager

    model._original_forward = model.forward
    autocast = get_mixed_precision_context_manager(accelerator.native_amp, accelerator.autocast_handler)
    model.forward = types.MethodType(autocast(model.forward.__func__), model)
    model.forward = types.MethodType(convert_outputs_to_fp32(model.forward.__func__), model)


class Recorder:
    """Collects the outputs of the fused forwards made while active (e.g. the policy's, then the reference's)."""

    def __init__(self) -> None:
        self.active = False
        self.outputs: list[FusedCausalLMOutput] = []

    @contextlib.contextmanager
    def record(self):
        self.active, self.outputs = True, []
        try:
            yield self.outputs
        finally:
            self.active = False


# ---------------------------------------------------------------------------------------------------------------
# The output layer's second calling convention: head(hidden, request=fn) -> fn(weight, bias), inside the module call


def _head_forward(self, hidden, request=None):
    if request is None:
        return self._mpf_plain_forward(hidden)
    return request(self.weight, getattr(self, "bias", None))


def _prepare_head(head: torch.nn.Module) -> torch.nn.Module:
    """Give the output layer the second calling convention (idempotent); refuse a LoRA-adapted layer."""
    if hasattr(head, "base_layer") or hasattr(head, "lora_A"):
        raise ValueError(f"the output layer is adapted by PEFT ({type(head).__name__}); the fused head reads the "
                         "layer's weight alone and would miss the adapter: leave the output layer out of "
                         "target_modules (a frozen head is fine)")
    if getattr(head, "_mpf_head", False):
        return head
    if not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise TypeError(f"expected an output layer with a [V, H] weight, found {type(head).__name__}")
    head._mpf_plain_forward = head.__dict__.get("forward") or types.MethodType(type(head).forward, head)
    head.forward = types.MethodType(_head_forward, head)
    head._mpf_head = True
    return head


def _run_backbone(model, kwargs: dict[str, Any], padding_free: bool):
    """(backbone output, last hidden states [B, T, H], packed?). With ``padding_free`` and right-padded rows the
    backbone sees the real tokens packed into one row (``position_ids`` restarting at every sequence) and the
    states are scattered back to [B, T, H] (zeros at the pad positions, which no label reads)."""
    backbone = model.base_model
    mask, ids = kwargs.get("attention_mask"), kwargs.get("input_ids")
    keep = None
    if (padding_free and ids is not None and mask is not None and mask.dim() == 2
            and "position_ids" not in kwargs and "inputs_embeds" not in kwargs):
        keep = mask.bool()
        right_padded = torch.equal(keep, torch.arange(keep.shape[1], device=keep.device) < keep.sum(1, keepdim=True))
        keep = keep if right_padded and bool(keep.any()) else None
    if keep is None:
        out = backbone(**kwargs)
        return out, out.last_hidden_state, False
    positions = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
    rest = {k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask")}
    out = backbone(input_ids=ids[keep].unsqueeze(0), position_ids=positions[keep].unsqueeze(0), **rest)
    packed = out.last_hidden_state
    return out, packed.new_zeros(*keep.shape, packed.shape[-1]).index_put((keep,), packed[0]), True


def install_fused_head(model: torch.nn.Module, settings: HeadSettings = HeadSettings(),
                       recorder: Recorder | None = None) -> None:
    """Make ``model(..., labels=labels, fused_lm_head=True)`` compute TRL's ``FusedCausalLMOutput`` with our op.

    Same call and output as TRL's ``add_fused_lm_head``, which it replaces: ``labels`` [B, T] unshifted
    (``shift_labels`` pre-shifted, as under context parallelism), -100 on ignored positions, any batch layout
    (padded rows, or rows packed with ``position_ids``). The fields listed in ``settings.outputs`` are filled
    (fp32, 0 where ignored; ``log_probs`` and ``entropy`` differentiable) and the others are None. Without
    ``fused_lm_head`` the model's own forward runs (generation is unchanged).

    Raises:
        ValueError: the output layer transforms its logits in a way the op cannot apply, or LoRA adapts it.
    """
    bad = set(settings.outputs) - set(OUTPUT_FIELDS)
    if bad:
        raise ValueError(f"install_fused_head: outputs must be among {OUTPUT_FIELDS}, found {sorted(bad)}")
    transform = head_transform(model)
    cls_forward = type(model).forward

    @functools.wraps(cls_forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            extra = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            kwargs.update({k: v for k, v in extra.items() if v is not None})
            return cls_forward(self, *args, **kwargs)
        if args:
            raise TypeError("the fused head takes keyword arguments only (input_ids=..., attention_mask=...)")
        text_config = self.config.get_text_config()
        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):  # MoE: as the model's own forward would
            kwargs.setdefault("output_router_logits", True)
        router = bool(kwargs.get("output_router_logits"))
        backbone_out, hidden, packed = _run_backbone(self, kwargs, settings.padding_free)
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        head = _prepare_head(self.get_output_embeddings())
        hidden, labels = hidden.to(head.weight.device), labels.to(head.weight.device)
        mask = labels != IGNORE_INDEX
        cast = contextlib.nullcontext()
        if settings.cast_lm_head_to_fp32:
            hidden = hidden.float()
            cast = torch.autocast(hidden.device.type, enabled=False)
        stats_needed = bool({"log_sum_sq_probs", "mean_logits", "is_top1"} & set(settings.outputs))

        def request(weight, bias):
            if type(weight).__name__ == "DTensor":
                raise ValueError("the output layer's weight is still a sharded DTensor inside its own call; "
                                 "wrap the model with FSDP2's fully_shard (or FSDP) so the layer is unsharded "
                                 "around its forward")
            return linear_token_logprobs(hidden, weight, labels, bias=bias, temperature=settings.temperature,
                                         softcap=transform.softcap, logit_scale=transform.logit_scale,
                                         chunk_size=settings.chunk_size, backend=settings.backend,
                                         return_stats=stats_needed)

        with cast:
            tok = head(hidden, request=request)
        fields = {"log_probs": tok.logps, "entropy": tok.entropy}
        if stats_needed:
            fields.update(log_sum_sq_probs=tok.log_sum_sq_probs, mean_logits=tok.mean_logits, is_top1=tok.is_top1)
        fields = {k: (v if k in settings.outputs or k == "log_probs" else None) for k, v in fields.items()}
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -tok.logps.sum() / denom
        aux_loss = None
        if router:
            # Packed rows hold only real tokens: every token counts, as with TRL's padding-free batches.
            attention_mask = None if packed else kwargs.get("attention_mask")
            aux_loss = _load_balancing_loss(text_config, backbone_out, attention_mask)
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
        out = FusedCausalLMOutput(loss=loss, label_mask=mask, aux_loss=aux_loss,
                                  **{k: fields.get(k) for k in OUTPUT_FIELDS})
        if recorder is not None and recorder.active:
            recorder.outputs.append(out)
        return out

    forward._mpf_fused_head = True
    model.forward = types.MethodType(forward, model)
    model._mpf_head_settings = settings


def _load_balancing_loss(text_config, backbone_out, attention_mask):
    """The MoE load-balancing loss of the router logits, as the model's own forward adds it (the Mixtral form
    every MoE family of transformers uses)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    num_experts = getattr(text_config, "num_experts", None) or getattr(text_config, "num_local_experts", None)
    return load_balancing_loss_func(backbone_out.router_logits, num_experts, text_config.num_experts_per_tok,
                                    attention_mask)


# ---------------------------------------------------------------------------------------------------------------
# Trainers


def _candidates(trainer) -> list[torch.nn.Module]:
    """The trainer's models, unwrapped from accelerate / DeepSpeed engines and PEFT (where TRL put its head)."""
    found = []
    for name in ("model", "ref_model"):
        m = getattr(trainer, name, None)
        seen = set()
        while m is not None and id(m) not in seen:
            seen.add(id(m))
            found.append(m)
            nxt = getattr(m, "module", None)
            if nxt is None and hasattr(m, "get_base_model"):
                nxt = m.get_base_model()
            m = nxt if isinstance(nxt, torch.nn.Module) else None
    return found


def patch_trainer(trainer, *, backend: str | None = None, chunk_size: int | None = None,
                  padding_free: bool = False, recorder: Recorder | None = None, extra_outputs: tuple[str, ...] = ()):
    """Replace TRL's fused LM head by ours on every model of ``trainer`` (a TRL 1.16 ``DPOTrainer``,
    ``KTOTrainer``, ``GRPOTrainer``, ``RLOOTrainer`` or ``SFTTrainer``, or a subclass) that has it, keeping
    TRL's settings (temperature, ``cast_lm_head_to_fp32``, the outputs each trainer asks for).

    Call it after constructing the trainer and before ``train()``. Idempotent.

    Args:
        trainer: the TRL trainer.
        backend: "triton", "torch" or None (triton on CUDA).
        chunk_size: token rows per chunk of logits (None: the op's default).
        padding_free: pack right-padded rows into one row before the backbone (see the module docstring).
        recorder: collects the head's outputs while recording (the MallowsPO losses read them).
        extra_outputs: fields to fill beyond those TRL asked for (the MallowsPO losses need the reference's
            ``entropy``).

    Returns:
        the same trainer.

    Raises:
        ValueError: no model of the trainer carries TRL's fused head (a TRL version other than the tested one, or
            the head was replaced by something else), or what :func:`install_fused_head` raises.
    """
    patched = 0
    for model in _candidates(trainer):
        settings = trl_head_settings(model)
        if settings is None:
            patched += _is_ours(model)  # already ours
            continue
        outputs = tuple(dict.fromkeys(settings.outputs + tuple(extra_outputs)))
        wrapped = _base_forward(model) is not model.__dict__.get("forward")
        install_fused_head(model, replace(settings, outputs=outputs, backend=backend, chunk_size=chunk_size,
                                          padding_free=padding_free), recorder)
        if wrapped:
            _rewrap_like_accelerate(model, trainer.accelerator)
        patched += 1
    if not patched:
        raise ValueError(f"patch_trainer: no model of {type(trainer).__name__} carries TRL's fused LM head "
                         f"(add_fused_lm_head); tested with TRL {TESTED_TRL_VERSION}")
    return trainer
