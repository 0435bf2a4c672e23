"""The unpaired (KTO) and SFT-coupled, reference-free (ORPO) losses (spec §3, TRL's forms)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._checks import batch_tensor, non_empty, per_example_or_scalar, real_number, same_batch
from .preference import PreferenceLossOutput, sequence_nll

__all__ = ["KTOLossOutput", "kto_loss", "orpo_loss"]


class KTOLossOutput(NamedTuple):
    """Result of :func:`kto_loss` (a named tuple).

    Attributes:
        loss: scalar mean of ``losses`` (what to backpropagate).
        losses: [B] weighted per-example loss.
        rewards: [B] detached β·(log π_θ − log π_ref).
        kl: 0-dim detached reference point z0 that was used.
    """

    loss: torch.Tensor
    losses: torch.Tensor
    rewards: torch.Tensor
    kl: torch.Tensor


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    *,
    policy_kl_logps: torch.Tensor | None = None,
    ref_kl_logps: torch.Tensor | None = None,
    kl: torch.Tensor | float | None = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOLossOutput:
    """KTO on unpaired (prompt, completion, label) rows, in TRL's form.

    With r = log π_θ(y|x) − log π_ref(y|x) and the reference point z0 (a batch estimate of
    KL(π_θ ‖ π_ref): mean r over mismatched prompt/completion pairs, clamped ≥ 0, detached):

        desirable (label True):     λ_D · (1 − σ(β(r − z0)))
        undesirable (label False):  λ_U · (1 − σ(β(z0 − r)))

    1 − σ(x) is evaluated as σ(−x). The loss is the mean over the B rows.

    Args:
        policy_logps: [B] summed completion log-probs under the policy, floating point.
        ref_logps: [B] the same under the reference model (detached here).
        labels: [B] bool, True for desirable completions.
        policy_kl_logps: [M] policy log-probs of mismatched completions (each prompt paired with
            another row's completion), to estimate z0 here.
        ref_kl_logps: [M] the same under the reference model.
        kl: the z0 to use instead (e.g. already averaged across ranks; clamped ≥ 0); give this or the
            KL log-probs.
        beta: β > 0.
        desirable_weight: λ_D ≥ 0 (TRL's name).
        undesirable_weight: λ_U ≥ 0 (TRL's name).

    Returns:
        KTOLossOutput(loss, losses [B], rewards [B], kl).

    Raises:
        ValueError: ``beta`` ≤ 0, a negative weight, both or neither of ``kl`` and the KL log-probs,
            or tensors whose shapes differ.
        TypeError: ``labels`` not a bool tensor, or a log-prob argument not a floating-point tensor.

    Examples:
        >>> out = kto_loss(pol, ref, labels, policy_kl_logps=pol_kl, ref_kl_logps=ref_kl, beta=0.1)
        >>> out.loss.backward()
    """
    where = "kto_loss"
    beta = real_number(beta, "beta", where, low=0.0, low_open=True)
    lam_d = real_number(desirable_weight, "desirable_weight", where, low=0.0)
    lam_u = real_number(undesirable_weight, "undesirable_weight", where, low=0.0)
    pol = batch_tensor(policy_logps, "policy_logps", where)
    ref = batch_tensor(ref_logps, "ref_logps", where).detach().to(pol.dtype)
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.bool:
        raise TypeError(f"{where}: labels must be a bool tensor [B] (True = desirable), got {labels!r}")
    same_batch(where, "policy_logps", pol, ref_logps=ref, labels=labels)
    non_empty(pol, "policy_logps", where, unit="row")

    if kl is not None:
        if policy_kl_logps is not None or ref_kl_logps is not None:
            raise ValueError(f"{where}: give either kl or (policy_kl_logps, ref_kl_logps), not both")
        if isinstance(kl, torch.Tensor):
            if kl.dim() != 0 or not kl.is_floating_point():
                raise ValueError(f"{where}: kl must be a 0-dim float tensor or a number, got {kl!r}")
            z0 = kl.detach().to(device=pol.device, dtype=pol.dtype)
        else:
            z0 = torch.tensor(real_number(kl, "kl", where), dtype=pol.dtype, device=pol.device)
        z0 = z0.clamp(min=0)
    else:
        if policy_kl_logps is None or ref_kl_logps is None:
            raise ValueError(
                f"{where}: the reference point z0 needs policy_kl_logps and ref_kl_logps (log-probs of "
                "mismatched prompt/completion pairs), or an explicit kl (0.0 disables it)"
            )
        pk = batch_tensor(policy_kl_logps, "policy_kl_logps", where)
        rk = batch_tensor(ref_kl_logps, "ref_kl_logps", where)
        same_batch(where, "policy_kl_logps", pk, ref_kl_logps=rk)
        if pk.numel() == 0:
            raise ValueError(f"{where}: policy_kl_logps is empty; the KL estimate needs at least one pair")
        z0 = (pk.detach() - rk.detach()).to(pol.dtype).mean().clamp(min=0)

    r = pol - ref
    desirable = lam_d * torch.sigmoid(-beta * (r - z0))
    undesirable = lam_u * torch.sigmoid(-beta * (z0 - r))
    losses = torch.where(labels, desirable, undesirable)
    return KTOLossOutput(loss=losses.mean(), losses=losses, rewards=(beta * r).detach(), kl=z0)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0: log(−expm1(x)) near 0, log1p(−eˣ) further out (both exact there)."""
    near = x > -0.6931471805599453
    return torch.where(near, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_num_tokens: torch.Tensor,
    rejected_num_tokens: torch.Tensor,
    *,
    beta: float = 0.1,
    chosen_nll: torch.Tensor | float | None = None,
) -> PreferenceLossOutput:
    """ORPO: SFT on the chosen response plus λ·(odds-ratio loss); no reference model.

    With ā = log π(y|x) / |y| (length-normalised, clamped below 0) and
    log odds(y) = ā − log(1 − exp(ā)), per pair:

        NLL_w + λ · softplus(−(log odds(y_w) − log odds(y_l)))

    λ is TRL's ``beta`` (default 0.1). NLL_w is ``chosen_nll`` if given, else the mean token NLL of the
    chosen response −π_w / n_w (TRL uses the batch token mean −Σπ_w / Σn_w: pass it as ``chosen_nll``
    to reproduce it exactly). Rewards are TRL's β·ā.

    Args:
        policy_chosen_logps: [B] summed response log-probs of the chosen answers under the policy.
        policy_rejected_logps: [B] the same for the rejected answers.
        chosen_num_tokens: [B] response token counts of the chosen answers (zeros read as 1).
        rejected_num_tokens: [B] the same for the rejected answers.
        beta: λ > 0.
        chosen_nll: optional [B] or scalar NLL replacing −π_w / n_w.

    Returns:
        PreferenceLossOutput(loss, losses [B], chosen_rewards, rejected_rewards, nll_loss [B],
        log_odds_ratio [B]).

    Raises:
        ValueError: ``beta`` ≤ 0, or tensors of different shapes or devices.
        TypeError: log-probs that are not floating-point tensors [B], or counts that are not numbers.

    Examples:
        >>> seq = sequence_logprobs(logits[:, :-1], labels[:, 1:])          # no reference model
        >>> out = orpo_loss(*seq.logps.chunk(2), *seq.num_tokens.chunk(2), beta=0.1)
        >>> out.loss.backward()
    """
    where = "orpo_loss"
    beta = real_number(beta, "beta", where, low=0.0, low_open=True)
    pw = batch_tensor(policy_chosen_logps, "policy_chosen_logps", where)
    pl = batch_tensor(policy_rejected_logps, "policy_rejected_logps", where).to(pw.dtype)
    batch_tensor(chosen_num_tokens, "chosen_num_tokens", where, floating=False)
    batch_tensor(rejected_num_tokens, "rejected_num_tokens", where, floating=False)
    same_batch(where, "policy_chosen_logps", pw, policy_rejected_logps=pl, chosen_num_tokens=chosen_num_tokens,
               rejected_num_tokens=rejected_num_tokens)
    non_empty(pw, "policy_chosen_logps", where)

    # ā = 0 (probability 1) would make log(1 − e^ā) = −inf; the clamp keeps it finite.
    ceiling = -torch.finfo(pw.dtype).eps
    a_w = (pw / chosen_num_tokens.clamp(min=1).to(pw.dtype)).clamp(max=ceiling)
    a_l = (pl / rejected_num_tokens.clamp(min=1).to(pw.dtype)).clamp(max=ceiling)
    log_odds_ratio = (a_w - _log1mexp(a_w)) - (a_l - _log1mexp(a_l))
    if chosen_nll is None:
        nll = sequence_nll(pw, chosen_num_tokens)
    else:
        nll = per_example_or_scalar(chosen_nll, "chosen_nll", where, pw)
    losses = nll + beta * F.softplus(-log_odds_ratio)
    return PreferenceLossOutput(
        loss=losses.mean(),
        losses=losses,
        chosen_rewards=(beta * a_w).detach(),
        rejected_rewards=(beta * a_l).detach(),
        nll_loss=nll.detach(),
        log_odds_ratio=log_odds_ratio.detach(),
    )
