"""MallowsPO and the fused op inside TRL's ``DPOTrainer`` (tested with TRL 1.16.0, the ``[trl]`` extra).

The LM head: :func:`~mallowspo_fast.integrations.trl_head.patch_trainer` replaces TRL's fused head by ours on the
policy and the reference (same outputs, every configuration TRL's head serves: ZeRO-2/3, FSDP2, soft-capped and
scaled logits, ``use_weighting``'s log Σp², MoE router losses, autocast, LoRA with a frozen head), plus packed
(padding-free) batches, which TRL 1.16 turns off for DPO: with ``padding_free=True`` in the config, our head
packs the padded rows before the backbone and TRL's code runs unchanged.

The losses: ``mallows_theta``, ``mallows_phi``, ``mallows_ipo`` and ``cauchy`` (the official MallowsPO code's),
alone or in a list with TRL's own, with ``loss_weights``. TRL's ``_compute_loss`` runs with the TRL part of the
list (so every TRL metric is logged by TRL itself), and our part is added from the same forwards with
:func:`mallowspo_fast.preference_loss`, the dispersion coming from the reference's mean token entropies
(``phi_star`` fixed, or ``"auto"``: estimated once over the training set before training). With
``precompute_ref_log_probs=True`` the one reference pass
before training stores the reference's log-probs *and* mean entropies (columns ``ref_chosen_entropy``,
``ref_rejected_entropy`` beside TRL's), so no reference model is needed during training. ``dispersion/*`` metrics
are logged next to TRL's keys.

Use :class:`MallowsDPOTrainer` with :class:`MallowsDPOConfig`, or :func:`patch_dpo_trainer` on an existing
``DPOTrainer`` (or subclass) instance.
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass, field
from typing import Any

import torch
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import FusedCausalLMOutput

from .. import losses
from ..ops.lm_head import param_shape
from .trl_head import TESTED_TRL_VERSION, Recorder, patch_trainer

__all__ = ["MALLOWS_LOSS_TYPES", "OUR_LOSS_TYPES", "TESTED_TRL_VERSION", "MallowsDPOConfig", "MallowsDPOTrainer",
           "patch_dpo_trainer", "estimate_phi_star"]

MALLOWS_LOSS_TYPES = ("mallows_theta", "mallows_phi", "mallows_ipo")
# Our loss types the integration adds to TRL's: the MallowsPO ones and the official MallowsPO code's cauchy.
OUR_LOSS_TYPES = (*MALLOWS_LOSS_TYPES, "cauchy")
ENTROPY_COLUMNS = ("ref_chosen_entropy", "ref_rejected_entropy")
_LOGP_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


@dataclass
class MallowsDPOConfig(DPOConfig):
    """TRL's ``DPOConfig`` plus the MallowsPO dispersion and the op's settings.

    ``loss_type`` additionally accepts ``mallows_theta``, ``mallows_phi``, ``mallows_ipo`` and ``cauchy`` (alone or
    in a list with TRL's own types and ``loss_weights``); ``padding_free=True`` packs the batches (TRL itself turns it
    off for DPO).
    """

    phi_star: Any = field(
        default=losses.DEFAULT_PHI_STAR,
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
    phi_star: Any = losses.DEFAULT_PHI_STAR
    backend: str | None = None
    chunk_size: int | None = None
    padding_free: bool = False


def _uses_mallows(trainer: DPOTrainer) -> bool:
    return any(t in OUR_LOSS_TYPES for t in trainer.loss_types)


def _check(trainer: DPOTrainer, settings: _Settings) -> None:
    phi = settings.phi_star
    if not (phi == "auto" or (isinstance(phi, (int, float)) and not isinstance(phi, bool) and phi > 0)):
        raise ValueError(f"patch_dpo_trainer: phi_star must be a positive number or 'auto', found {phi!r}")
    if _uses_mallows(trainer) and trainer.ld_alpha is not None:
        raise ValueError("patch_dpo_trainer: ld_alpha (LD-DPO's length-desensitised log-probs) is not defined for "
                         "the MallowsPO losses; use it with TRL's loss types only")


# ---------------------------------------------------------------------------------------------------------------
# The reference pass: TRL's own compute_ref_log_probs, with the head's entropies recorded from the same forward


def _response_entropy(out: FusedCausalLMOutput, mask: torch.Tensor) -> torch.Tensor:
    """Mean token entropy over the response positions of each row ([2B], 0 for empty rows)."""
    ent = out.entropy[:, -mask.size(1):].detach().float()
    return (ent * mask).sum(1) / mask.sum(1).clamp(min=1)


def _reference_caller(trainer: DPOTrainer):
    """The module TRL's precompute calls for the reference (an inference engine of the policy under ZeRO-3
    when there is no separate reference model)."""
    if trainer.ref_model is None and trainer.is_deepspeed_enabled and not hasattr(trainer.model, "optimizer"):
        from trl.models import prepare_deepspeed

        if getattr(trainer, "_precompute_engine", None) is None:
            trainer._precompute_engine = prepare_deepspeed(trainer.model, trainer.accelerator)
        return trainer._precompute_engine
    return trainer.ref_model or trainer.model


def _reference_stats(trainer: DPOTrainer, batch: dict[str, torch.Tensor], caller=None):
    """(logps [2B], mean entropies [2B]) of the reference on a prepared batch: one forward, TRL's own."""
    inputs = {k: v for k, v in batch.items() if k not in ENTROPY_COLUMNS}
    with trainer._mpf_recorder.record() as recorded:
        chosen, rejected = trainer.compute_ref_log_probs(caller or _reference_caller(trainer), inputs)
    if len(recorded) != 1:
        raise RuntimeError(f"expected one reference forward through the fused head, saw {len(recorded)}")
    return torch.cat([chosen, rejected]), _response_entropy(recorded[0], batch["completion_mask"][..., 1:])


def _reference_pass(trainer: DPOTrainer, dataset, batch_size: int) -> dict[str, torch.Tensor]:
    """Reference log-probs and mean entropies of every pair of ``dataset`` (all ranks; gathered)."""
    from torch.utils.data import DataLoader

    loader = trainer.accelerator.prepare(DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                                    collate_fn=trainer.data_collator))
    caller = _reference_caller(trainer)
    cols: dict[str, list[torch.Tensor]] = {k: [] for k in _LOGP_COLUMNS + ENTROPY_COLUMNS}
    for batch in loader:
        logps, ent = _reference_stats(trainer, batch, caller)
        logps, ent = trainer.accelerator.gather_for_metrics((logps.chunk(2), ent.chunk(2)))
        for key, value in zip(_LOGP_COLUMNS + ENTROPY_COLUMNS, (*logps, *ent)):
            cols[key].append(value.cpu())
    return {k: torch.cat(v) for k, v in cols.items()}


def _add_reference_columns(trainer: DPOTrainer, dataset, batch_size: int):
    """``dataset`` with the reference columns added (TRL's log-prob columns only when missing)."""
    values = _reference_pass(trainer, dataset, batch_size)
    for key in _LOGP_COLUMNS + ENTROPY_COLUMNS:
        if key not in dataset.column_names:
            dataset = dataset.add_column(key, values[key].tolist())
    return dataset


class _CollateEntropies:
    """TRL's preference collator, plus the precomputed reference entropies as [B] tensors."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __call__(self, examples):
        out = self.inner(examples)
        for key in ENTROPY_COLUMNS:
            if key in examples[0]:
                out[key] = torch.tensor([float(e[key]) for e in examples])
        return out


def _precompute_entropies(trainer: DPOTrainer) -> None:
    """Give the precomputed datasets the reference entropies (one reference pass, before training)."""
    args = trainer.args
    if trainer.train_dataset is not None and ENTROPY_COLUMNS[0] not in trainer.train_dataset.column_names:
        trainer.train_dataset = _add_reference_columns(
            trainer, trainer.train_dataset, args.precompute_ref_batch_size or args.per_device_train_batch_size)
    evals = trainer.eval_dataset
    size = args.precompute_ref_batch_size or args.per_device_eval_batch_size
    if isinstance(evals, dict):
        trainer.eval_dataset = {
            k: v if ENTROPY_COLUMNS[0] in v.column_names else _add_reference_columns(trainer, v, size)
            for k, v in evals.items()}
    elif evals is not None and ENTROPY_COLUMNS[0] not in evals.column_names:
        trainer.eval_dataset = _add_reference_columns(trainer, evals, size)


def estimate_phi_star(trainer: DPOTrainer) -> float:
    """phi* = "auto": 1 / mean over the training pairs of -ln e(x), e(x) from the reference's token entropies
    (:func:`mallowspo_fast.auto_phi_star`): read from the precomputed columns, or one no-grad reference pass over
    the training set (all ranks)."""
    entropies, empties = [], []
    for batch in trainer.get_train_dataloader():
        batch = trainer._prepare_inputs(batch)
        if ENTROPY_COLUMNS[0] in batch:
            ew, el = batch[ENTROPY_COLUMNS[0]], batch[ENTROPY_COLUMNS[1]]
        else:
            ew, el = _reference_stats(trainer, batch)[1].chunk(2)
        n_w, n_l = batch["completion_mask"][..., 1:].sum(1).chunk(2)
        e = losses.pair_entropy(ew.float(), el.float(), trainer._mpf_vocab_size)
        e, empty = trainer.accelerator.gather_for_metrics((e, losses.empty_response_pairs(n_w, n_l)))
        entropies.append(e.cpu())
        empties.append(empty.cpu())
    return losses.auto_phi_star(torch.cat(entropies), empty_pairs=torch.cat(empties))


# ---------------------------------------------------------------------------------------------------------------
# The loss


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
    pre_ent = {k: inputs.pop(k) for k in ENTROPY_COLUMNS if k in inputs}  # not model inputs
    pairs = list(zip(trainer.loss_types, trainer.loss_weights, strict=True))
    ours = [(t, w) for t, w in pairs if t in OUR_LOSS_TYPES]
    if not ours:
        return inner(model, inputs, return_outputs)
    theirs = [(t, w) for t, w in pairs if t not in OUR_LOSS_TYPES] or [("sigmoid", 0.0)]
    with trainer._mpf_recorder.record() as recorded, _loss_types(trainer, *map(list, zip(*theirs, strict=True))):
        result = inner(model, inputs, return_outputs)
    expected = 1 if trainer.precompute_ref_logps else 2
    if len(recorded) != expected:
        raise RuntimeError(f"patch_dpo_trainer: expected {expected} forward(s) through the fused head (policy"
                           f"{'' if expected == 1 else ', reference'}), saw {len(recorded)} (was the head replaced "
                           "after patching?)")
    loss, outputs = result if return_outputs else (result, None)
    mask = inputs["completion_mask"][..., 1:]
    seq_len = mask.size(1)
    pw, pl = recorded[0].log_probs[:, -seq_len:].sum(1).chunk(2)
    if trainer.precompute_ref_logps:
        rw, rl = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        ew, el = (pre_ent[k].to(pw.device) for k in ENTROPY_COLUMNS)
    else:
        rw, rl = recorded[1].log_probs[:, -seq_len:].sum(1).detach().chunk(2)
        ew, el = _response_entropy(recorded[1], mask).chunk(2)
    nw, nl = mask.sum(1).chunk(2)
    vocab = trainer._mpf_vocab_size
    c = losses.neg_log_dispersion(ew, el, vocab, phi_star=float(trainer._mpf_phi_star), chosen_num_tokens=nw,
                                  rejected_num_tokens=nl)
    out = losses.preference_loss(pw, pl, rw, rl, loss_type=[t for t, _ in ours], loss_weights=[w for _, w in ours],
                                 beta=trainer.beta, label_smoothing=trainer.label_smoothing, neg_log_dispersion=c,
                                 chosen_num_tokens=nw, rejected_num_tokens=nl)
    _log_dispersion(trainer, out, pw, pl, c, losses.pair_entropy(ew, el, vocab), losses.empty_response_pairs(nw, nl))
    loss = loss + out.loss
    return (loss, outputs) if return_outputs else loss


def _log_dispersion(trainer, out, pw, pl, c, entropy, empty) -> None:
    mode = "train" if trainer.model.training else "eval"
    gathered = trainer.accelerator.gather_for_metrics(
        (out.chosen_rewards, out.rejected_rewards, pw.detach(), pl.detach(), c, entropy, empty))
    metrics = losses.preference_metrics(*gathered[:4], neg_log_dispersion=gathered[4], pair_entropy=gathered[5],
                                        empty_pairs=gathered[6])
    for key, value in metrics.items():
        if key.startswith("dispersion/"):
            trainer._metrics[mode][key].append(float(value))


# ---------------------------------------------------------------------------------------------------------------
# Wiring


def _install_head(trainer: DPOTrainer, settings: _Settings) -> None:
    """Our head on the trainer's models, with the recorder the MallowsPO losses read (idempotent)."""
    if getattr(trainer, "_mpf_recorder", None) is None:
        trainer._mpf_recorder = Recorder()
        patch_trainer(trainer, backend=settings.backend, chunk_size=settings.chunk_size,
                      padding_free=settings.padding_free, recorder=trainer._mpf_recorder,
                      extra_outputs=("entropy",) if _uses_mallows(trainer) else ())


def _setup(trainer: DPOTrainer, settings: _Settings) -> None:
    _check(trainer, settings)
    _install_head(trainer, settings)
    trainer._mpf_ready = True
    policy = trainer.accelerator.unwrap_model(trainer.model)
    policy = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    trainer._mpf_vocab_size = int(param_shape(policy.get_output_embeddings().weight)[0])
    trainer._mpf_phi_star = settings.phi_star
    if not _uses_mallows(trainer):
        return
    if trainer.precompute_ref_logps:
        _precompute_entropies(trainer)
        trainer._set_signature_columns_if_needed()
        trainer._signature_columns = list(dict.fromkeys([*trainer._signature_columns, *ENTROPY_COLUMNS]))
        if not isinstance(trainer.data_collator, _CollateEntropies):
            trainer.data_collator = _CollateEntropies(trainer.data_collator)
    if settings.phi_star == "auto":
        trainer._mpf_phi_star = estimate_phi_star(trainer)


def _settings_from(args: Any, **overrides: Any) -> _Settings:
    s = _Settings(phi_star=getattr(args, "phi_star", losses.DEFAULT_PHI_STAR),
                  backend=getattr(args, "logprob_backend", None), chunk_size=getattr(args, "logprob_chunk_size", None),
                  padding_free=bool(getattr(args, "padding_free", False)))
    for key, value in overrides.items():
        if value is not None:
            setattr(s, key, value)
    return s


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

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        """With a MallowsPO loss, TRL's precompute becomes one reference pass that stores the log-probs and the
        mean entropies (TRL's own pass, its cache file aside, otherwise)."""
        if not _uses_mallows(self):
            return super()._precompute_ref_logps(dataset, name, batch_size)
        _install_head(self, _settings_from(self.args))
        return _add_reference_columns(self, dataset, batch_size)


def patch_dpo_trainer(trainer: DPOTrainer, *, phi_star: float | str | None = None, backend: str | None = None,
                      chunk_size: int | None = None, padding_free: bool | None = None) -> DPOTrainer:
    """Give an existing ``DPOTrainer`` (or subclass) instance the fused head and the MallowsPO loss types.

    Call it after constructing the trainer and before ``train()``. The instance's own ``_compute_loss``
    (a subclass override included) keeps computing TRL's loss types and metrics; the MallowsPO terms are
    added to it. Settings default to those of a :class:`MallowsDPOConfig` ``args``, else the library defaults.
    With ``precompute_ref_log_probs=True`` and a MallowsPO loss, one reference pass adds the entropy columns.

    Returns:
        the same trainer.

    Raises:
        TypeError: ``trainer`` is not a ``trl.DPOTrainer``.
        ValueError: a bad ``phi_star``, ``ld_alpha`` with a MallowsPO loss, or what
            :func:`~mallowspo_fast.integrations.trl_head.patch_trainer` raises.
    """
    if not isinstance(trainer, DPOTrainer):
        raise TypeError(f"patch_dpo_trainer: expected a trl.DPOTrainer instance, found {type(trainer).__name__}")
    if getattr(trainer, "_mpf_ready", False):
        return trainer
    _setup(trainer, _settings_from(trainer.args, phi_star=phi_star, backend=backend, chunk_size=chunk_size,
                                   padding_free=padding_free))
    inner = trainer._compute_loss
    trainer._compute_loss = types.MethodType(
        lambda self, model, inputs, return_outputs: _compute_loss(self, inner, model, inputs, return_outputs), trainer)
    return trainer
