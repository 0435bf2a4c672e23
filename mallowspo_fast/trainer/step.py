"""One forward over the concatenated chosen+rejected batch, and the loss and metrics of a batch.

Shared by training, evaluation and the reference pass. Batches come from ``data.PreferenceCollator``:
rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected, labels unshifted with -100 on prompt and
padding. KTO batches (``data.KTOCollator``) have the same [2B, T] shape: B prompt+completion rows, then
B prompt+mismatched-completion rows for the KL estimate. Nothing here reads a value on the host.

The loss settings arrive as the keyword arguments of the loss function (``TrainConfig.loss_kwargs()``),
not as the whole config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .. import losses
from ..ops import IGNORE_INDEX, sequence_logprobs
from ..ops.lm_head import CausalLMLogprobs


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


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def forward_logprobs(model: Any, batch: dict[str, torch.Tensor], *, backend: str | None,
                     logits_mean: bool = False) -> ForwardOutput:
    """Run ``model`` (a DeepSpeed engine or a module) once and reduce its logits with the fused op
    (``backend``: the config's ``logprob_backend``, "auto" included).

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


def preference_batch_loss(policy: ForwardOutput, ref: ReferenceBatch | None, loss_kwargs: Mapping[str, Any],
                          phi_star: float | None = None) -> BatchLoss:
    """Loss and metrics of one batch from the policy forward and the reference values.

    ``loss_kwargs``: the keyword arguments of ``preference_loss`` (``loss_type``, ``beta``, ...), or
    ``{"loss_type": "orpo", "beta": λ}`` for ``orpo_loss``. ``phi_star``: the dispersion scale of the Mallows
    losses (None: no dispersion c(x) is computed)."""
    pw, pl = policy.logps.chunk(2)
    nw, nl = policy.num_tokens.chunk(2)
    c = entropy = empty = None
    if ref is not None:
        empty = losses.empty_response_pairs(nw, nl)
        entropy = losses.pair_entropy(ref.chosen_entropy, ref.rejected_entropy, ref.vocab_size)
        if phi_star is not None:
            c = losses.neg_log_dispersion(ref.chosen_entropy, ref.rejected_entropy, ref.vocab_size,
                                          phi_star=phi_star, chosen_num_tokens=nw, rejected_num_tokens=nl)
    kwargs = dict(loss_kwargs)
    if kwargs["loss_type"] == "orpo":
        out = losses.orpo_loss(pw, pl, nw, nl, beta=kwargs["beta"])
    else:
        out = losses.preference_loss(
            pw, pl, None if ref is None else ref.chosen_logps, None if ref is None else ref.rejected_logps,
            neg_log_dispersion=c, chosen_num_tokens=nw, rejected_num_tokens=nl, **kwargs,
        )
    lw = ll = None
    if policy.logits_mean is not None:
        lw, ll = policy.logits_mean.chunk(2)
    metrics = losses.preference_metrics(out.chosen_rewards, out.rejected_rewards, pw.detach(), pl.detach(),
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
    m = losses.preference_metrics(
        values["chosen_rewards"], values["rejected_rewards"], values["chosen_logps"], values["rejected_logps"],
        chosen_logits_mean=values.get("chosen_logits_mean"), rejected_logits_mean=values.get("rejected_logits_mean"),
        neg_log_dispersion=values.get("neg_log_dispersion"), pair_entropy=values.get("pair_entropy"),
        empty_pairs=values["empty_pairs"].bool() if has("empty_pairs") else None,
    )
    m["loss"] = values["losses"].float().mean()
    return m


# ----------------------------------------------------------------------------------------------------
# KTO (unpaired rows; batches from data.KTOCollator: B completion rows, then B KL rows)
KTO_SPLITS = (("chosen", True), ("rejected", False))  # TRL's names for desirable / undesirable rows


def kto_sums(rewards: torch.Tensor, logps: torch.Tensor, logits_mean: torch.Tensor | None,
             labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's additive KTO metrics: ``{rewards,logps,logits}/{chosen,rejected}_sum`` and ``count/{chosen,
    rejected}`` (float32 0-dim), summed over steps and ranks (never averaged) before the means are taken."""
    out = {}
    for split, flag in KTO_SPLITS:
        mask = (labels == flag).float()
        out[f"count/{split}"] = mask.sum()
        for name, value in (("rewards", rewards), ("logps", logps), ("logits", logits_mean)):
            if value is not None:
                out[f"{name}/{split}_sum"] = (value.detach().float() * mask).sum()
    return out


def kto_means(metrics: dict[str, float]) -> dict[str, float]:
    """``rewards/chosen`` etc. (sum / count; NaN without such rows) and ``rewards/margins`` from the sums."""
    out = {}
    for split, _ in KTO_SPLITS:
        count = metrics.get(f"count/{split}")
        if count is None:
            continue
        for name in ("rewards", "logps", "logits"):
            if f"{name}/{split}_sum" in metrics:
                out[f"{name}/{split}"] = metrics[f"{name}/{split}_sum"] / count if count > 0 else float("nan")
    if "rewards/chosen" in out and "rewards/rejected" in out:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


def kto_reference_point(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor,
                        world_size: int = 1) -> torch.Tensor:
    """z0: the mean log-ratio over the KL rows of every rank (sum and count all-reduced, so every rank must
    call this once per micro-batch), clamped >= 0 and detached (TRL's convention)."""
    stats = torch.stack([(policy_kl_logps.detach().float() - ref_kl_logps.float()).sum(),
                         torch.tensor(float(policy_kl_logps.numel()), device=policy_kl_logps.device)])
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
    return (stats[0] / stats[1]).clamp(min=0)


def kto_batch_loss(policy: ForwardOutput, ref: ReferenceBatch, labels: torch.Tensor, loss_kwargs: Mapping[str, Any],
                   world_size: int = 1) -> BatchLoss:
    """KTO loss and metrics of one micro-batch. ``policy`` and ``ref`` cover the [2B] rows of a KTO batch:
    ``ref.chosen_logps`` holds the reference log-probs of the completion rows, ``ref.rejected_logps`` those
    of the KL rows (the two halves, as for a paired batch), from a live forward or the precomputed table.
    ``loss_kwargs``: the keyword arguments of ``kto_loss`` (``beta``, ``desirable_weight``,
    ``undesirable_weight``)."""
    pol, pol_kl = policy.logps.chunk(2)
    z0 = kto_reference_point(pol_kl, ref.rejected_logps, world_size)
    out = losses.kto_loss(pol, ref.chosen_logps, labels, kl=z0, **loss_kwargs)
    logits = None if policy.logits_mean is None else policy.logits_mean.chunk(2)[0]
    metrics = kto_sums(out.rewards, pol, logits, labels)
    metrics.update(loss=out.loss.detach().float(), kl=out.kl.float())
    per_example = {"losses": out.losses.detach(), "policy_logps": pol.detach(), "ref_logps": ref.chosen_logps,
                   "policy_kl_logps": pol_kl.detach(), "ref_kl_logps": ref.rejected_logps, "label": labels.float()}
    if logits is not None:
        per_example["logits_mean"] = logits
    return BatchLoss(out.loss, out.losses.detach(), metrics, per_example)


def kto_metrics_from_examples(values: dict[str, torch.Tensor],
                              loss_kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Exact KTO metrics over a whole evaluation set: z0 is re-estimated over all of its KL rows."""
    labels = values["label"].bool()
    z0 = kto_reference_point(values["policy_kl_logps"], values["ref_kl_logps"])
    out = losses.kto_loss(values["policy_logps"], values["ref_logps"], labels, kl=z0, **loss_kwargs)
    m = kto_sums(out.rewards, values["policy_logps"], values.get("logits_mean"), labels)
    m.update({k: torch.tensor(v) for k, v in kto_means({k: float(v) for k, v in m.items()}).items()})
    m.update(loss=out.loss.float(), kl=out.kl.float())
    return m


def chosen_rows(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The prompt+chosen half of a collated batch (for the SFT warm-up), with the rows' ``index`` if any."""
    b = batch["input_ids"].shape[0] // 2
    return {k: batch[k][:b] for k in ("input_ids", "attention_mask", "labels", "index") if k in batch}


def sft_batch_loss(out: ForwardOutput) -> torch.Tensor:
    """Token-mean NLL over the rows of ``out`` (the SFT warm-up objective on chosen responses)."""
    return -out.logps.sum() / out.num_tokens.sum().clamp(min=1).to(out.logps.dtype)
