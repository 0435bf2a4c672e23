"""The fused op and MallowsPO inside TRL's ``DPOTrainer`` (tested with TRL 1.16.0, the ``[trl]`` extra).

TRL 1.16 computes the per-token log-probs of its concatenated [chosen; rejected] forward through a "fused LM
head": ``model(..., labels=labels, fused_lm_head=True)`` runs the backbone and returns per-token outputs
(``log_probs``, ``entropy``, ``mean_logits``, ``is_top1``) instead of logits. That forward is the one thing
replaced here: :func:`install_fused_head` puts our memory-mode op (:func:`mallowspo_fast.linear_token_logprobs`,
logits chunk by chunk, log-softmax, gather and entropy in one pass, never a ``[B, T, V]`` tensor) behind the
same call, on the policy and on the reference model. Everything else (data, collation, the reference pass,
TRL's own losses and metrics) stays TRL's.

On top, the loss types ``mallows_theta``, ``mallows_phi`` and ``mallows_ipo`` (alone or in a list with TRL's
own, with ``loss_weights``): TRL's ``_compute_loss`` runs with the TRL part of the list (so every TRL metric is
logged by TRL itself), and the MallowsPO part is added from the same forwards with
:func:`mallowspo_fast.preference_loss`, the dispersion coming from the reference's token entropies
(``phi_star`` fixed, or ``"auto"``: estimated once over the training set before training). The dispersion
metrics ``dispersion/*`` are logged next to TRL's keys.

Use :class:`MallowsDPOTrainer` with :class:`MallowsDPOConfig`, or :func:`patch_dpo_trainer` on an existing
``DPOTrainer`` (or subclass) instance.
"""

from __future__ import annotations

import contextlib
import functools
import types
from dataclasses import dataclass, field
from typing import Any

import torch
import trl
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import FusedCausalLMOutput

from .. import losses as L
from ..ops import linear_token_logprobs

__all__ = ["MALLOWS_LOSS_TYPES", "TESTED_TRL_VERSION", "MallowsDPOConfig", "MallowsDPOTrainer", "install_fused_head",
           "patch_dpo_trainer"]

TESTED_TRL_VERSION = "1.16.0"
MALLOWS_LOSS_TYPES = ("mallows_theta", "mallows_phi", "mallows_ipo")
IGNORE_INDEX = -100
# Config attributes of heads that transform the logits after the matmul: our op is a plain linear head.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")
_TOP1_CHUNK_BYTES = 48 * 1024 * 1024


@dataclass
class MallowsDPOConfig(DPOConfig):
    """TRL's ``DPOConfig`` plus the MallowsPO dispersion and the op's settings.

    ``loss_type`` additionally accepts ``mallows_theta``, ``mallows_phi`` and ``mallows_ipo`` (alone or in a
    list with TRL's own types and ``loss_weights``).
    """

    phi_star: Any = field(
        default=L.DEFAULT_PHI_STAR,
        metadata={"help": "MallowsPO phi* (official name neg_log_dispersion_mean): a positive float, or 'auto' "
                          "(1 / mean of -ln e(x) over the training set, estimated with the reference before "
                          "training)."},
    )
    logprob_backend: str | None = field(
        default=None, metadata={"help": "Backend of the fused op: 'triton', 'torch' or None (triton on CUDA)."})
    logprob_chunk_size: int | None = field(
        default=None, metadata={"help": "Rows of logits per chunk of the fused head (None: about 48 MiB of fp32 "
                                        "logits on CPU, 256 MiB on accelerators)."})


@dataclass
class _Settings:
    phi_star: Any = L.DEFAULT_PHI_STAR
    backend: str | None = None
    chunk_size: int | None = None


class _Recorder:
    """Collects the fused-head outputs of the forwards made while active (policy first, then reference)."""

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


def _check_plain_head(model: torch.nn.Module) -> None:
    config = model.config.get_text_config()
    for attr in _LOGIT_TRANSFORMS:
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0):
            raise ValueError(
                f"install_fused_head: expected a plain linear output layer, but {type(model).__name__}'s config "
                f"sets {attr}={value!r}; keep TRL's own fused head for this model"
            )


@torch.no_grad()
def _is_top1(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
             mask: torch.Tensor) -> torch.Tensor:
    """Whether each label is the most likely token (ties count as top-1), chunk by chunk of unmasked rows."""
    out = torch.zeros(mask.numel(), dtype=torch.bool, device=hidden.device)
    rows = mask.reshape(-1).nonzero().squeeze(1)
    flat_labels = labels.reshape(-1)
    step = max(1, _TOP1_CHUNK_BYTES // (4 * weight.shape[0]))
    seq = hidden.shape[1]
    for start in range(0, rows.numel(), step):
        idx = rows[start:start + step]
        logits = torch.nn.functional.linear(hidden[idx // seq, idx % seq], weight, bias)
        picked = logits.gather(1, flat_labels[idx].unsqueeze(1)).squeeze(1)
        out[idx] = picked >= logits.max(dim=1).values
    return out.view(mask.shape)


def install_fused_head(model: torch.nn.Module, *, outputs: tuple[str, ...] = ("log_probs", "entropy"),
                       backend: str | None = None, chunk_size: int | None = None,
                       recorder: _Recorder | None = None) -> None:
    """Make ``model(..., labels=labels, fused_lm_head=True)`` compute TRL's per-token outputs with the fused op.

    Same call and output (``trl.trainer.utils.FusedCausalLMOutput``) as TRL's ``add_fused_lm_head``, which it
    replaces: ``labels`` [B, T] unshifted (``shift_labels`` pre-shifted, as under context parallelism),
    -100 on ignored positions, any batch layout (padded rows, or padding-free rows packed with
    ``position_ids``). ``log_probs`` and ``entropy`` (fp32, differentiable, 0 where ignored) always come from
    one pass of the op; ``mean_logits`` (h·mean(W) + mean(b), no logits needed) and ``is_top1`` (one extra
    no-grad chunked matmul) only when listed in ``outputs``. Without ``fused_lm_head`` the model's own forward
    runs (generation is unchanged).

    Raises:
        ValueError: the output layer transforms the logits (softcapping, logit scales), or a fused call asks
            for MoE router logits (not supported here).
    """
    allowed = {"log_probs", "entropy", "mean_logits", "is_top1"}
    if not set(outputs) <= allowed:
        raise ValueError(f"install_fused_head: outputs must be among {sorted(allowed)}, found {list(outputs)}")
    _check_plain_head(model)
    cls_forward = type(model).forward

    @functools.wraps(cls_forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            extra = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            kwargs.update({k: v for k, v in extra.items() if v is not None})
            return cls_forward(self, *args, **kwargs)
        if kwargs.get("output_router_logits") or getattr(self.config.get_text_config(), "output_router_logits", False):
            raise ValueError("install_fused_head: MoE router logits (output_router_logits) are not supported by the "
                             "fused op's head; keep TRL's own head for MoE models")
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        head = self.get_output_embeddings()
        weight, bias = head.weight, getattr(head, "bias", None)
        if type(weight).__name__ == "DTensor":
            raise ValueError("install_fused_head: the output weight is a sharded DTensor (FSDP2); the fused op "
                             "needs the full [V, H] weight, keep TRL's own head under FSDP2")
        hidden = hidden.to(device=weight.device, dtype=weight.dtype)
        labels = labels.to(weight.device)
        mask = labels != IGNORE_INDEX
        tok = linear_token_logprobs(hidden, weight, labels, bias=bias, backend=backend, chunk_size=chunk_size)
        mean_logits = is_top1 = None
        if "mean_logits" in outputs:
            with torch.no_grad():
                row = hidden.float() @ weight.mean(0, dtype=torch.float32)
                if bias is not None:
                    row = row + bias.float().mean()
                mean_logits = row.masked_fill(~mask, 0.0)
        if "is_top1" in outputs:
            is_top1 = _is_top1(hidden.detach(), weight.detach(), None if bias is None else bias.detach(), labels, mask)
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        out = FusedCausalLMOutput(loss=-tok.logps.sum() / denom, log_probs=tok.logps, entropy=tok.entropy,
                                  mean_logits=mean_logits, is_top1=is_top1, label_mask=mask)
        if recorder is not None and recorder.active:
            recorder.outputs.append(out)
        return out

    model.forward = types.MethodType(forward, model)


# ----------------------------------------------------------------------------------------------------------------
# Trainer wiring


def _unwrap(trainer: DPOTrainer, model: torch.nn.Module) -> torch.nn.Module:
    from accelerate.utils import is_peft_model

    model = trainer.accelerator.unwrap_model(model)
    return model.get_base_model() if is_peft_model(model) else model


def _check_trainer(trainer: DPOTrainer, settings: _Settings) -> None:
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if not isinstance(trainer, DPOTrainer):
        raise TypeError(f"patch_dpo_trainer: expected a trl.DPOTrainer instance, found {type(trainer).__name__}")
    if trl.__version__ != TESTED_TRL_VERSION:
        import warnings

        warnings.warn(f"mallowspo_fast.integrations.trl is tested with TRL {TESTED_TRL_VERSION}, found "
                      f"{trl.__version__}", stacklevel=3)
    if is_deepspeed_zero3_enabled():
        raise ValueError("patch_dpo_trainer: DeepSpeed ZeRO-3 is not supported by the fused head (its backward "
                         "re-reads the output weight outside the head's module); use ZeRO-1/2 or TRL's own head")
    if trainer.args.use_weighting:
        raise ValueError("patch_dpo_trainer: use_weighting=True needs log(sum p^2) per token, which the fused op "
                         "does not compute; set use_weighting=False")
    ours = [t for t in trainer.loss_types if t in MALLOWS_LOSS_TYPES]
    if not ours:
        return
    if trainer.precompute_ref_logps:
        raise ValueError(f"patch_dpo_trainer: loss types {ours} need the reference's token entropies, which "
                         "precompute_ref_log_probs=True does not keep; set precompute_ref_log_probs=False")
    if trainer.ld_alpha is not None:
        raise ValueError(f"patch_dpo_trainer: loss types {ours} use summed log-probs; ld_alpha={trainer.ld_alpha} "
                         "is not supported with them (set ld_alpha=None)")
    if trainer.aux_loss_enabled:
        raise ValueError("patch_dpo_trainer: MoE auxiliary losses are not supported with the fused head")
    phi = settings.phi_star
    if phi != "auto" and not (isinstance(phi, (int, float)) and not isinstance(phi, bool) and phi > 0):
        raise ValueError(f"patch_dpo_trainer: phi_star must be a positive number or 'auto', found {phi!r}")


def _setup(trainer: DPOTrainer, settings: _Settings) -> None:
    _check_trainer(trainer, settings)
    recorder = _Recorder()
    policy = _unwrap(trainer, trainer.model)
    install_fused_head(policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"), backend=settings.backend,
                       chunk_size=settings.chunk_size, recorder=recorder)
    if trainer.ref_model is not None:
        install_fused_head(_unwrap(trainer, trainer.ref_model), backend=settings.backend,
                           chunk_size=settings.chunk_size, recorder=recorder)
    trainer._mpf_recorder = recorder
    trainer._mpf_vocab_size = int(policy.get_output_embeddings().weight.shape[0])
    trainer._mpf_phi_star = settings.phi_star
    if settings.phi_star == "auto" and any(t in MALLOWS_LOSS_TYPES for t in trainer.loss_types):
        trainer._mpf_phi_star = estimate_phi_star(trainer)


def _response_entropy(out: FusedCausalLMOutput, mask: torch.Tensor) -> torch.Tensor:
    """Mean token entropy over the response positions of each row ([2B], 0 for empty rows)."""
    ent = out.entropy[:, -mask.size(1):].detach().float()
    return (ent * mask).sum(1) / mask.sum(1).clamp(min=1)


def _reference_forward(trainer: DPOTrainer, inputs: dict[str, torch.Tensor]) -> FusedCausalLMOutput:
    """One no-grad reference forward through the fused head (TRL's way of choosing the reference)."""
    from accelerate.utils import is_peft_model
    from trl.trainer.utils import use_adapter

    keys = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
    kwargs = {k: v for k, v in inputs.items() if k not in keys}
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX)
    with torch.no_grad():
        if trainer.ref_model is None and is_peft_model(trainer.model):
            unwrapped = trainer.accelerator.unwrap_model(trainer.model)
            with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                return trainer.model(**kwargs, labels=labels, fused_lm_head=True)
        return (trainer.ref_model or trainer.model)(**kwargs, labels=labels, fused_lm_head=True)


def estimate_phi_star(trainer: DPOTrainer) -> float:
    """phi* = "auto": 1 / mean over the training pairs of -ln e(x), e(x) from the reference's token entropies
    (:func:`mallowspo_fast.auto_phi_star`), one no-grad reference pass over the training set (all ranks)."""
    entropies, empties = [], []
    was_training = trainer.model.training
    trainer.model.eval()
    try:
        for batch in trainer.get_train_dataloader():
            batch = trainer._prepare_inputs(batch)
            out = _reference_forward(trainer, batch)
            mask = batch["completion_mask"][..., 1:]
            ent_w, ent_l = _response_entropy(out, mask).chunk(2)
            n_w, n_l = mask.sum(1).chunk(2)
            e = L.pair_entropy(ent_w, ent_l, trainer._mpf_vocab_size)
            empty = L.empty_response_pairs(n_w, n_l)
            e, empty = trainer.accelerator.gather_for_metrics((e, empty))
            entropies.append(e.cpu())
            empties.append(empty.cpu())
    finally:
        trainer.model.train(was_training)
    return L.auto_phi_star(torch.cat(entropies), empty_pairs=torch.cat(empties))


@contextlib.contextmanager
def _loss_types(trainer: DPOTrainer, types_: list[str], weights: list[float]):
    saved = trainer.loss_types, trainer.loss_weights
    trainer.loss_types, trainer.loss_weights = types_, weights
    try:
        yield
    finally:
        trainer.loss_types, trainer.loss_weights = saved


def _compute_loss(trainer: DPOTrainer, inner, model, inputs, return_outputs):
    """TRL's ``_compute_loss`` (``inner``) for TRL's loss types, plus the MallowsPO terms of the same forwards."""
    pairs = list(zip(trainer.loss_types, trainer.loss_weights, strict=True))
    ours = [(t, w) for t, w in pairs if t in MALLOWS_LOSS_TYPES]
    if not ours:
        return inner(model, inputs, return_outputs)
    theirs = [(t, w) for t, w in pairs if t not in MALLOWS_LOSS_TYPES] or [("sigmoid", 0.0)]
    with trainer._mpf_recorder.record() as recorded, _loss_types(trainer, *map(list, zip(*theirs, strict=True))):
        result = inner(model, inputs, return_outputs)
    if len(recorded) != 2:
        raise RuntimeError(f"patch_dpo_trainer: expected a policy and a reference forward through the fused head, "
                           f"saw {len(recorded)} (was the head replaced after patching?)")
    policy, ref = recorded
    loss, outputs = result if return_outputs else (result, None)
    mask = inputs["completion_mask"][..., 1:]
    seq_len = mask.size(1)
    pw, pl = policy.log_probs[:, -seq_len:].sum(1).chunk(2)
    rw, rl = ref.log_probs[:, -seq_len:].sum(1).detach().chunk(2)
    nw, nl = mask.sum(1).chunk(2)
    ew, el = _response_entropy(ref, mask).chunk(2)
    c = L.neg_log_dispersion(ew, el, trainer._mpf_vocab_size, phi_star=float(trainer._mpf_phi_star),
                             chosen_num_tokens=nw, rejected_num_tokens=nl)
    out = L.preference_loss(pw, pl, rw, rl, loss_type=[t for t, _ in ours], loss_weights=[w for _, w in ours],
                            beta=trainer.beta, label_smoothing=trainer.label_smoothing, neg_log_dispersion=c,
                            chosen_num_tokens=nw, rejected_num_tokens=nl)
    loss = loss + out.loss
    _log_dispersion(trainer, out, pw, pl, c, L.pair_entropy(ew, el, trainer._mpf_vocab_size),
                    L.empty_response_pairs(nw, nl))
    return (loss, outputs) if return_outputs else loss


def _log_dispersion(trainer, out, pw, pl, c, entropy, empty) -> None:
    mode = "train" if trainer.model.training else "eval"
    gathered = trainer.accelerator.gather_for_metrics(
        (out.chosen_rewards, out.rejected_rewards, pw.detach(), pl.detach(), c, entropy, empty))
    metrics = L.preference_metrics(*gathered[:4], neg_log_dispersion=gathered[4], pair_entropy=gathered[5],
                                   empty_pairs=gathered[6])
    for key, value in metrics.items():
        if key.startswith("dispersion/"):
            trainer._metrics[mode][key].append(float(value))


class MallowsDPOTrainer(DPOTrainer):
    """TRL's ``DPOTrainer`` with the fused op as its LM head and the MallowsPO loss types.

    Takes the same arguments as ``trl.DPOTrainer``; pass a :class:`MallowsDPOConfig` as ``args`` for
    ``phi_star`` and the op's settings (a plain ``DPOConfig`` uses their defaults).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _setup(self, _settings_from(self.args))

    def _compute_loss(self, model, inputs, return_outputs):
        return _compute_loss(self, super()._compute_loss, model, inputs, return_outputs)


def _settings_from(args: Any, **overrides: Any) -> _Settings:
    s = _Settings(phi_star=getattr(args, "phi_star", L.DEFAULT_PHI_STAR),
                  backend=getattr(args, "logprob_backend", None), chunk_size=getattr(args, "logprob_chunk_size", None))
    for key, value in overrides.items():
        if value is not None:
            setattr(s, key, value)
    return s


def patch_dpo_trainer(trainer: DPOTrainer, *, phi_star: float | str | None = None, backend: str | None = None,
                      chunk_size: int | None = None) -> DPOTrainer:
    """Give an existing ``DPOTrainer`` (or subclass) instance the fused head and the MallowsPO loss types.

    Call it after constructing the trainer and before ``train()``. The instance's own ``_compute_loss``
    (a subclass override included) keeps computing TRL's loss types and metrics; the MallowsPO terms are
    added to it. Settings default to those of a :class:`MallowsDPOConfig` ``args``, else the library defaults.

    Returns:
        the same trainer.
    """
    if not isinstance(trainer, DPOTrainer):
        raise TypeError(f"patch_dpo_trainer: expected a trl.DPOTrainer instance, found {type(trainer).__name__}")
    if getattr(trainer, "_mpf_recorder", None) is not None:
        return trainer
    _setup(trainer, _settings_from(trainer.args, phi_star=phi_star, backend=backend, chunk_size=chunk_size))
    inner = trainer._compute_loss
    trainer._compute_loss = types.MethodType(
        lambda self, model, inputs, return_outputs: _compute_loss(self, inner, model, inputs, return_outputs), trainer)
    return trainer
