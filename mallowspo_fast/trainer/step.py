"""One forward over the concatenated chosen+rejected batch, and the loss and metrics of a batch.

Shared by training, evaluation and the reference pass. Batches come from ``data.PreferenceCollator``:
rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected, labels unshifted with -100 on prompt and
padding. Nothing here reads a value on the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import losses as L
from ..ops import sequence_logprobs
from ..ops.lm_head import CausalLMLogprobs
from .config import TrainConfig

IGNORE_INDEX = -100


@dataclass
class ForwardOutput:
    """Per-row outputs of one forward over [2B, T]: log-probs (with gradient when the model has one),
    mean entropies, response token counts, the mean logit over response positions (detached) and the
    output size V."""

    logps: torch.Tensor
    entropy: torch.Tensor
    num_tokens: torch.Tensor
    logits_mean: torch.Tensor | None
    vocab_size: int


def backend_arg(cfg: TrainConfig) -> str | None:
    return None if cfg.logprob_backend == "auto" else cfg.logprob_backend


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def forward_logprobs(model: Any, batch: dict[str, torch.Tensor], *, backend: str | None,
                     logits_mean: bool = False) -> ForwardOutput:
    """Run ``model`` (a DeepSpeed engine or a module) once and reduce its logits with the fused op.

    The logits [2B, T, V] are only ever read by the op (and, when ``logits_mean``, by one detached mean
    over V): no log-softmax copy of them is made. With ``logits_mode: chunked`` the module is a
    ``CausalLMLogprobs`` and the logits are never materialised at all.
    """
    module = getattr(model, "module", model)
    if isinstance(module, CausalLMLogprobs):
        res = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                    ignore_index=IGNORE_INDEX, return_logits_mean=logits_mean)
        seq, means = res if logits_mean else (res, None)
        return ForwardOutput(seq.logps, seq.entropy, seq.num_tokens, means, module.vocab_size)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logits = out.logits
    labels = batch["labels"][:, 1:]
    seq = sequence_logprobs(logits[:, :-1], labels, backend=backend)
    means = None
    if logits_mean:
        with torch.no_grad():
            mask = (labels != IGNORE_INDEX).to(torch.float32)
            row = logits[:, :-1].detach().mean(-1, dtype=torch.float32)
            means = (row * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    return ForwardOutput(seq.logps, seq.entropy, seq.num_tokens, means, logits.shape[-1])


@dataclass
class ReferenceBatch:
    """Reference values of a batch ([B] each; entropies and vocab size for the dispersion)."""

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_entropy: torch.Tensor
    rejected_entropy: torch.Tensor
    vocab_size: int

    @classmethod
    def from_forward(cls, out: ForwardOutput) -> ReferenceBatch:
        lw, ll = out.logps.detach().chunk(2)
        ew, el = out.entropy.detach().chunk(2)
        return cls(lw, ll, ew, el, out.vocab_size)


@dataclass
class BatchLoss:
    loss: torch.Tensor  # scalar with gradient
    losses: torch.Tensor  # [B] detached
    metrics: dict[str, torch.Tensor]  # 0-dim float32 tensors (TRL keys + dispersion)
    per_example: dict[str, torch.Tensor]  # [B] detached values, for exact eval aggregation


def preference_batch_loss(cfg: TrainConfig, policy: ForwardOutput, ref: ReferenceBatch | None,
                          phi_star: float | None) -> BatchLoss:
    """Loss and metrics of one batch from the policy forward and the reference values."""
    pw, pl = policy.logps.chunk(2)
    nw, nl = policy.num_tokens.chunk(2)
    c = entropy = empty = None
    if ref is not None:
        empty = L.empty_response_pairs(nw, nl)
        entropy = L.pair_entropy(ref.chosen_entropy, ref.rejected_entropy, ref.vocab_size)
        if phi_star is not None and cfg.uses_mallows:
            c = L.neg_log_dispersion(ref.chosen_entropy, ref.rejected_entropy, ref.vocab_size, phi_star=phi_star,
                                     chosen_num_tokens=nw, rejected_num_tokens=nl)
    if cfg.loss_types == ["orpo"]:
        out = L.orpo_loss(pw, pl, nw, nl, beta=cfg.beta)
    else:
        out = L.preference_loss(
            pw, pl,
            None if ref is None else ref.chosen_logps, None if ref is None else ref.rejected_logps,
            loss_type=cfg.loss_type, loss_weights=cfg.loss_weights, beta=cfg.beta,
            label_smoothing=cfg.label_smoothing, neg_log_dispersion=c,
            chosen_num_tokens=nw, rejected_num_tokens=nl, length_normalization=cfg.length_normalization,
            reference_free=cfg.reference_free, home_advantage=cfg.home_advantage, mixing_alpha=cfg.mixing_alpha,
            simpo_gamma=cfg.simpo_gamma, add_sft_loss=cfg.add_sft_loss, sft_coef=cfg.sft_coef,
            rpo_alpha=cfg.rpo_alpha,
        )
    lw = ll = None
    if policy.logits_mean is not None:
        lw, ll = policy.logits_mean.chunk(2)
    metrics = L.preference_metrics(out.chosen_rewards, out.rejected_rewards, pw.detach(), pl.detach(),
                                   chosen_logits_mean=lw, rejected_logits_mean=ll, neg_log_dispersion=c,
                                   pair_entropy=entropy, empty_pairs=empty)
    metrics["loss"] = out.loss.detach().float()
    if out.nll_loss is not None:
        metrics["nll_loss"] = out.nll_loss.float().mean()
    per_example = {"losses": out.losses.detach(), "chosen_rewards": out.chosen_rewards,
                   "rejected_rewards": out.rejected_rewards, "chosen_logps": pw.detach(),
                   "rejected_logps": pl.detach()}
    if lw is not None:
        per_example.update(chosen_logits_mean=lw, rejected_logits_mean=ll)
    if c is not None:
        per_example["neg_log_dispersion"] = c
    if entropy is not None:
        per_example.update(pair_entropy=entropy, empty_pairs=empty.float())
    return BatchLoss(out.loss, out.losses.detach(), metrics, per_example)


def metrics_from_examples(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Exact metrics over a whole evaluation set from gathered per-example values."""
    has = values.__contains__
    m = L.preference_metrics(
        values["chosen_rewards"], values["rejected_rewards"], values["chosen_logps"], values["rejected_logps"],
        chosen_logits_mean=values.get("chosen_logits_mean"), rejected_logits_mean=values.get("rejected_logits_mean"),
        neg_log_dispersion=values.get("neg_log_dispersion"), pair_entropy=values.get("pair_entropy"),
        empty_pairs=values["empty_pairs"].bool() if has("empty_pairs") else None,
    )
    m["loss"] = values["losses"].float().mean()
    return m


def chosen_rows(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The prompt+chosen half of a collated batch (for the SFT warm-up)."""
    b = batch["input_ids"].shape[0] // 2
    return {k: batch[k][:b] for k in ("input_ids", "attention_mask", "labels")}


def sft_batch_loss(out: ForwardOutput) -> torch.Tensor:
    """Token-mean NLL over the rows of ``out`` (the SFT warm-up objective on chosen responses)."""
    return -out.logps.sum() / out.num_tokens.sum().clamp(min=1).to(out.logps.dtype)
