"""Per-step training metrics with TRL's keys, as 0-dim tensors (no host sync)."""

from __future__ import annotations

import torch

from ._checks import batch_tensor, same_batch

__all__ = ["preference_metrics"]


def _mean(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float().mean()


def preference_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    *,
    chosen_logits_mean: torch.Tensor | None = None,
    rejected_logits_mean: torch.Tensor | None = None,
    neg_log_dispersion: torch.Tensor | None = None,
    pair_entropy: torch.Tensor | None = None,
    empty_pairs: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Batch metrics for logging, every value a detached float32 0-dim tensor on the inputs' device.

    Nothing here reads a value on the host: call it every step, stack or accumulate the tensors, and
    synchronise only at logging steps (average over the window and across ranks there).

    Keys (TRL's): ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies`` (fraction of pairs
    with r_w > r_l; 0 when π_θ = π_ref), ``rewards/margins``, ``logps/chosen``, ``logps/rejected``;
    ``logits/chosen`` and ``logits/rejected`` when the mean logits are given. Ours:
    ``dispersion/neg_log_mean`` and ``dispersion/neg_log_std`` (population std, 0 for one pair) of c(x)
    when ``neg_log_dispersion`` is given; ``dispersion/entropy_mean`` (mean normalised pair entropy
    ē(x), empty pairs left out) when ``pair_entropy`` is given; ``dispersion/empty_pairs`` (count of
    pairs with an empty response) when ``empty_pairs`` is given.

    Args:
        chosen_rewards: [B] from :class:`PreferenceLossOutput` (``chosen_rewards``).
        rejected_rewards: [B] likewise (``rejected_rewards``).
        chosen_logps: [B] policy log-probs of the chosen answers (as the loss used them).
        rejected_logps: [B] the same for the rejected answers.
        chosen_logits_mean: mean policy logit over the chosen response positions, any shape
            (averaged here).
        rejected_logits_mean: the same over the rejected response positions.
        neg_log_dispersion: c [B] from :func:`neg_log_dispersion`.
        pair_entropy: ē(x) [B] from :func:`pair_entropy`.
        empty_pairs: bool [B] from :func:`empty_response_pairs`.

    Returns:
        dict of metric name -> 0-dim float32 tensor.

    Raises:
        TypeError: a reward or log-prob that is not a floating-point tensor [B], or ``empty_pairs`` that
            is not a bool tensor.
        ValueError: tensors of different shapes or devices, or only one of the two logit means.

    Examples:
        >>> out = preference_loss(pi_w, pi_l, ref_w, ref_l, loss_type="mallows_theta", neg_log_dispersion=c)
        >>> metrics = preference_metrics(out.chosen_rewards, out.rejected_rewards, pi_w, pi_l,
        ...                              neg_log_dispersion=c)
        >>> {k: float(v) for k, v in metrics.items()}       # one host sync, at logging steps only
    """
    where = "preference_metrics"
    for name, t in (("chosen_rewards", chosen_rewards), ("rejected_rewards", rejected_rewards),
                    ("chosen_logps", chosen_logps), ("rejected_logps", rejected_logps)):
        batch_tensor(t, name, where)
    same_batch(where, "chosen_rewards", chosen_rewards, rejected_rewards=rejected_rewards,
               chosen_logps=chosen_logps, rejected_logps=rejected_logps)
    rw, rl = chosen_rewards.detach(), rejected_rewards.detach()
    out = {
        "rewards/chosen": _mean(rw),
        "rewards/rejected": _mean(rl),
        "rewards/accuracies": _mean((rw > rl).float()),
        "rewards/margins": _mean(rw - rl),
        "logps/chosen": _mean(chosen_logps),
        "logps/rejected": _mean(rejected_logps),
    }
    if (chosen_logits_mean is None) != (rejected_logits_mean is None):
        raise ValueError(f"{where}: give both chosen_logits_mean and rejected_logits_mean, or neither")
    if chosen_logits_mean is not None:
        out["logits/chosen"] = _mean(chosen_logits_mean)
        out["logits/rejected"] = _mean(rejected_logits_mean)
    if neg_log_dispersion is not None:
        c = batch_tensor(neg_log_dispersion, "neg_log_dispersion", where).detach().float()
        same_batch(where, "chosen_rewards", chosen_rewards, neg_log_dispersion=c)
        out["dispersion/neg_log_mean"] = c.mean()
        out["dispersion/neg_log_std"] = c.std(correction=0)
    if empty_pairs is not None:
        if not isinstance(empty_pairs, torch.Tensor) or empty_pairs.dtype != torch.bool:
            raise TypeError(f"{where}: empty_pairs must be a bool tensor [B], got {empty_pairs!r}")
        same_batch(where, "chosen_rewards", chosen_rewards, empty_pairs=empty_pairs)
        out["dispersion/empty_pairs"] = empty_pairs.float().sum()
    if pair_entropy is not None:
        e = batch_tensor(pair_entropy, "pair_entropy", where).detach().float()
        same_batch(where, "chosen_rewards", chosen_rewards, pair_entropy=e)
        keep = torch.ones_like(e) if empty_pairs is None else (~empty_pairs).float()
        # Masked mean without reading the count on the host: 0 when every pair is empty.
        out["dispersion/entropy_mean"] = (e * keep).sum() / keep.sum().clamp(min=1.0)
    return out
