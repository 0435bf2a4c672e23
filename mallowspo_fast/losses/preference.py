"""Paired preference losses: the DPO family (TRL's names) and MallowsPO-θ / -φ / -IPO.

All functions take per-sequence quantities ([B] tensors): summed response log-probs of the policy and
the reference, token counts, and the dispersion c(x). Nothing here knows about models or DeepSpeed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._checks import batch_tensor, non_empty, per_example_or_scalar, real_number, same_batch
from .phi_link import mallows_phi_link_nll

__all__ = ["LOSS_TYPES", "PreferenceLossOutput", "preference_loss"]

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "simpo", "cauchy", "mallows_theta", "mallows_phi",
              "mallows_ipo")
_MALLOWS = frozenset({"mallows_theta", "mallows_phi", "mallows_ipo"})
_REFERENCE_FREE = frozenset({"simpo"})  # never read reference log-probs
_ALWAYS_LENGTH_NORMALISED = frozenset({"ipo", "simpo"})  # TRL conventions


class PreferenceLossOutput(NamedTuple):
    """Result of :func:`preference_loss` (and :func:`orpo_loss`), a named tuple.

    Attributes:
        loss: scalar, mean of ``losses`` (what to backpropagate).
        losses: [B] per-pair loss, including the SFT / RPO add-ons.
        chosen_rewards: [B] detached implicit rewards β·(log π_θ − log π_ref) of the chosen answers,
            never scaled by c(x).
        rejected_rewards: [B] the same for the rejected answers.
        nll_loss: [B] chosen NLL that entered the loss (SFT / RPO / ORPO), detached; None when unused.
        log_odds_ratio: [B] detached ORPO log odds ratio; None for the other losses.
    """

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    nll_loss: torch.Tensor | None = None
    log_odds_ratio: torch.Tensor | None = None


def _loss_types(loss_type: object, where: str) -> list[str]:
    types = [loss_type] if isinstance(loss_type, str) else loss_type
    if not isinstance(types, (list, tuple)) or len(types) == 0:
        raise ValueError(f"{where}: loss_type must be one of {LOSS_TYPES} or a non-empty list of them, "
                         f"got {loss_type!r}")
    for t in types:
        if t not in LOSS_TYPES:
            raise ValueError(f"{where}: unknown loss_type {t!r}; expected one of {LOSS_TYPES}")
    if len(set(types)) != len(types):
        raise ValueError(f"{where}: loss_type lists {list(types)} with a repeated entry")
    return list(types)


def _loss_weights(loss_weights: Sequence[float] | None, n: int, where: str) -> list[float]:
    if loss_weights is None:
        return [1.0] * n
    if isinstance(loss_weights, (int, float)) or len(loss_weights) != n:
        raise ValueError(f"{where}: loss_weights must give one weight per loss type ({n}), got {loss_weights!r}")
    return [real_number(w, f"loss_weights[{i}]", where) for i, w in enumerate(loss_weights)]


def sequence_nll(logps: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    """Mean token NLL of each sequence, −logps / n (0 for an empty sequence)."""
    return -logps / num_tokens.clamp(min=1).to(logps.dtype)


def _smoothed_sigmoid(z: torch.Tensor, eps: float) -> torch.Tensor:
    """(1−ε)·(−log σ(z)) + ε·(−log σ(−z)), with −log σ(z) = softplus(−z)."""
    loss = F.softplus(-z)
    return loss if eps == 0.0 else (1.0 - eps) * loss + eps * F.softplus(z)


def _cauchy_nll(z: torch.Tensor) -> torch.Tensor:
    """−log F(z) with F(z) = atan(z)/π + ½ the Cauchy CDF (the official ``cauchy`` loss at z = β·L).

    The official expression cancels: for z ≪ 0, atan(z)/π + ½ is a difference of two numbers near ½ (in
    float32 the loss is off by 0.2% at z = −1e6 and infinite at z = −1e8), and for z ≫ 0 the log of a
    number near 1 loses the loss's relative precision (0 at z = 1e8). Exactly, F(z) = atan2(1, −z)/π and,
    for z > 0, 1 − F(z) = atan2(1, z)/π, so z ≤ 0 uses log π − log atan2(1, −z) (≈ log(π|z|)) and z > 0
    uses −log1p(−atan2(1, z)/π) (≈ 1/(πz)). Each branch sees a clamped input, so neither produces inf or
    NaN in value or gradient on the side it does not serve.
    """
    one = torch.ones_like(z)
    left = math.log(math.pi) - torch.log(torch.atan2(one, -z.clamp(max=0.0)))
    right = -torch.log1p(-torch.atan2(one, z.clamp(min=0.0)) / math.pi)
    return torch.where(z > 0, right, left)


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    loss_type: str | Sequence[str] = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    neg_log_dispersion: torch.Tensor | float | None = None,
    chosen_num_tokens: torch.Tensor | None = None,
    rejected_num_tokens: torch.Tensor | None = None,
    length_normalization: bool = False,
    reference_free: bool = False,
    home_advantage: float = 0.0,
    mixing_alpha: float | None = None,
    simpo_gamma: float = 0.5,
    loss_weights: Sequence[float] | None = None,
    add_sft_loss: bool = False,
    sft_coef: float = 0.5,
    rpo_alpha: float | None = None,
    chosen_nll: torch.Tensor | None = None,
) -> PreferenceLossOutput:
    """Per-pair preference loss of the DPO family and MallowsPO, averaged over the batch.

    Notation (TRL's): π_w, π_l = policy log-probs of chosen / rejected, ρ_w, ρ_l the reference ones,
    ε = ``label_smoothing``, c = ``neg_log_dispersion``. The margin ("logits" in TRL's code) is

        L = (π_w − π_l) − R − γ                  when mixing_alpha is None (official default)
        L = (π_w − π_l) − α·R − (1 − α)·γ        when mixing_alpha = α (official ``if_mixing_alpha``)

    with R = ρ_w − ρ_l (0 when ``reference_free``) and γ = ``home_advantage``; with the defaults
    L = Δ, TRL's DPO margin. Per pair:

    ================  =================================================================
    sigmoid           (1−ε)·softplus(−βL) + ε·softplus(βL)        (DPO; ε > 0: cDPO)
    ipo               (L − 1/(2β))², L from length-normalised log-probs (TRL's convention: policy and
                      reference log-probs divided by the token count, whatever length_normalization)
    hinge             relu(1 − βL)                                (SLiC)
    robust            [(1−ε)·softplus(−βL) − ε·softplus(βL)] / (1−2ε), 0 ≤ ε < ½
    simpo             (1−ε)·softplus(−m) + ε·softplus(m), m = β(ā_w − ā_l) − simpo_gamma, ā the
                      length-normalised policy log-probs; ignores reference, γ and α (TRL's CPO form)
    cauchy            −log(atan(βL)/π + ½)                        (official ``cauchy``: the Cauchy
                      CDF as the link, heavy-tailed; evaluated without cancellation; ε unused)
    mallows_theta     (1−ε)·softplus(−β·c·L) + ε·softplus(β·c·L)  (official ``mallows_dpo``)
    mallows_phi       −log g_φ(β·L), φ = exp(−c), the Kendall link (s = 0 taken on the right branch)
    mallows_ipo       (c·L − 1/(2β))²                             (official ``mallows_ipo``)
    ================  =================================================================

    A list of loss types gives Σ_i w_i · loss_i per pair (``loss_weights``, default all 1). Then the
    official add-ons, in the official order: ``add_sft_loss`` adds sft_coef · NLL, and ``rpo_alpha``
    turns the loss into rpo_alpha · loss + NLL. NLL is ``chosen_nll`` if given, else the mean token NLL
    of each chosen response, −π_w / n_w (needs ``chosen_num_tokens``). This equals the official
    add_sft_loss term when length_normalization is on; the official RPO term is the batch token mean
    −Σπ_w / Σn_w: pass that scalar as ``chosen_nll`` to reproduce it exactly.

    Args:
        policy_chosen_logps: [B] summed response log-probs of the chosen answers under the policy
            (``SequenceLogprobs.logps``), floating point, with gradient.
        policy_rejected_logps: [B] the same for the rejected answers.
        ref_chosen_logps: [B] the chosen answers' log-probs under the reference model; required unless
            ``reference_free`` or every loss type is reference-free (simpo). Detached here.
        ref_rejected_logps: [B] the same for the rejected answers.
        loss_type: one of LOSS_TYPES, or a list of them (then see ``loss_weights``).
        beta: β > 0.
        label_smoothing: ε in [0, 1] (sigmoid, simpo, mallows_theta); [0, ½) for robust; unused by the
            other losses.
        neg_log_dispersion: c [B] (or a scalar) from :func:`neg_log_dispersion`; required by the
            mallows_* losses, a constant (detached). c ≡ 1 makes mallows_theta equal sigmoid.
        chosen_num_tokens: [B] integer response token counts of the chosen answers; required by ipo,
            simpo, length_normalization and the NLL add-ons without ``chosen_nll``. Zero counts are read
            as 1.
        rejected_num_tokens: [B] the same for the rejected answers.
        length_normalization: divide every log-prob (policy and reference) by its token count.
        reference_free: R = 0 (the reference is a uniform model); rewards use no reference either.
        home_advantage: γ (official name), subtracted from the margin; see ``mixing_alpha``.
        mixing_alpha: None, or α in [0, 1] to mix the reference ratio with γ (RainbowPO).
        simpo_gamma: SimPO's target margin (TRL's name and default).
        loss_weights: one weight per loss type when ``loss_type`` is a list.
        add_sft_loss: official name; add ``sft_coef`` · NLL to every pair.
        sft_coef: weight of that SFT term (official default 0.5).
        rpo_alpha: official / TRL name; None disables. loss ← rpo_alpha · loss + NLL.
        chosen_nll: optional [B] or scalar NLL to use in the add-ons instead of −π_w / n_w.

    Returns:
        PreferenceLossOutput(loss, losses [B], chosen_rewards [B], rejected_rewards [B], nll_loss).
        Rewards are β·(π − ρ) on length-normalised log-probs iff length_normalization is on or every
        loss type is always length-normalised (ipo, simpo), and without reference iff reference_free
        or every loss type is reference-free.

    Raises:
        ValueError: naming the argument: an unknown ``loss_type``, ``beta`` ≤ 0, ``label_smoothing``
            out of range, a missing reference (``ref_*_logps``) for a loss that needs it, a missing
            ``neg_log_dispersion`` for a Mallows loss, missing token counts where they are needed,
            ``loss_weights`` of the wrong length, or tensors whose batch sizes differ.
        TypeError: an argument of the wrong type: not a tensor, not floating point, a bool or a
            non-finite number.

    Examples:
        >>> seq = sequence_logprobs(policy_logits, labels); ref = ...  # rows: chosen then rejected
        >>> out = preference_loss(*seq.logps.chunk(2), *ref.logps.chunk(2), loss_type="mallows_theta",
        ...                       beta=0.1, neg_log_dispersion=c)
        >>> out.loss.backward()
    """
    where = "preference_loss"
    types = _loss_types(loss_type, where)
    weights = _loss_weights(loss_weights, len(types), where)
    beta = real_number(beta, "beta", where, low=0.0, low_open=True)
    eps_high = 0.5 if "robust" in types else 1.0
    label_smoothing = real_number(label_smoothing, "label_smoothing", where, low=0.0, high=eps_high,
                                  high_open="robust" in types)
    home_advantage = real_number(home_advantage, "home_advantage", where)
    simpo_gamma = real_number(simpo_gamma, "simpo_gamma", where)
    if mixing_alpha is not None:
        mixing_alpha = real_number(mixing_alpha, "mixing_alpha", where, low=0.0, high=1.0)
    if rpo_alpha is not None:
        rpo_alpha = real_number(rpo_alpha, "rpo_alpha", where)
    sft_coef = real_number(sft_coef, "sft_coef", where)

    pw = batch_tensor(policy_chosen_logps, "policy_chosen_logps", where)
    pl = batch_tensor(policy_rejected_logps, "policy_rejected_logps", where)
    same_batch(where, "policy_chosen_logps", pw, policy_rejected_logps=pl)
    non_empty(pw, "policy_chosen_logps", where)
    dtype = pw.dtype
    pl = pl.to(dtype)

    uses_reference = not reference_free and any(t not in _REFERENCE_FREE for t in types)
    rw = rl = None
    if uses_reference:
        for name, value in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
            if value is None:
                raise ValueError(
                    f"{where}: {name} is required for loss_type {types} (pass reference log-probs, or set "
                    "reference_free=True)"
                )
        rw = batch_tensor(ref_chosen_logps, "ref_chosen_logps", where).detach().to(dtype)
        rl = batch_tensor(ref_rejected_logps, "ref_rejected_logps", where).detach().to(dtype)
        same_batch(where, "policy_chosen_logps", pw, ref_chosen_logps=rw, ref_rejected_logps=rl)

    c = None
    if any(t in _MALLOWS for t in types):
        if neg_log_dispersion is None:
            raise ValueError(
                f"{where}: neg_log_dispersion is required for loss_type {types}: compute c(x) with "
                "mallowspo_fast.neg_log_dispersion from the reference entropies"
            )
        c = per_example_or_scalar(neg_log_dispersion, "neg_log_dispersion", where, pw).detach()

    wants_nll = add_sft_loss or rpo_alpha is not None
    needs_tokens = (length_normalization or any(t in _ALWAYS_LENGTH_NORMALISED for t in types)
                    or (wants_nll and chosen_nll is None))
    nw = nl = None
    if needs_tokens:
        for name, value in (("chosen_num_tokens", chosen_num_tokens), ("rejected_num_tokens", rejected_num_tokens)):
            if value is None:
                raise ValueError(
                    f"{where}: {name} is required here (loss_type {types}, length_normalization="
                    f"{length_normalization}, NLL add-on without chosen_nll: {wants_nll and chosen_nll is None})"
                )
        batch_tensor(chosen_num_tokens, "chosen_num_tokens", where, floating=False)
        batch_tensor(rejected_num_tokens, "rejected_num_tokens", where, floating=False)
        same_batch(where, "policy_chosen_logps", pw, chosen_num_tokens=chosen_num_tokens,
                   rejected_num_tokens=rejected_num_tokens)
        nw = chosen_num_tokens.clamp(min=1).to(dtype)
        nl = rejected_num_tokens.clamp(min=1).to(dtype)

    def logps(normalise: bool, with_reference: bool):
        a, b = (pw / nw, pl / nl) if normalise else (pw, pl)
        if not with_reference:
            return a, b, None, None
        ra, rb = (rw / nw, rl / nl) if normalise else (rw, rl)
        return a, b, ra, rb

    def margin(normalise: bool) -> torch.Tensor:
        a, b, ra, rb = logps(normalise, uses_reference)
        ref_ratio = (ra - rb) if uses_reference else torch.zeros_like(a)
        if mixing_alpha is None:
            return (a - b) - ref_ratio - home_advantage
        return (a - b) - mixing_alpha * ref_ratio - (1.0 - mixing_alpha) * home_advantage

    losses = torch.zeros_like(pw)
    for t, w in zip(types, weights):
        if t == "simpo":
            a, b, _, _ = logps(True, False)
            per_pair = _smoothed_sigmoid(beta * (a - b) - simpo_gamma, label_smoothing)
        else:
            L = margin(length_normalization or t in _ALWAYS_LENGTH_NORMALISED)
            if t == "sigmoid":
                per_pair = _smoothed_sigmoid(beta * L, label_smoothing)
            elif t == "ipo":
                per_pair = (L - 1.0 / (2.0 * beta)) ** 2
            elif t == "hinge":
                per_pair = torch.relu(1.0 - beta * L)
            elif t == "robust":
                eps = label_smoothing
                per_pair = ((1.0 - eps) * F.softplus(-beta * L) - eps * F.softplus(beta * L)) / (1.0 - 2.0 * eps)
            elif t == "cauchy":
                per_pair = _cauchy_nll(beta * L)
            elif t == "mallows_theta":
                # c > 0 multiplies the margin: the argument of σ is +β·c·L (the seed draft had −).
                per_pair = _smoothed_sigmoid(beta * c * L, label_smoothing)
            elif t == "mallows_phi":
                per_pair = mallows_phi_link_nll(beta * L, torch.exp(-c))
            else:  # mallows_ipo
                per_pair = (c * L - 1.0 / (2.0 * beta)) ** 2
        losses = losses + (per_pair if w == 1.0 else w * per_pair)

    nll = None
    if wants_nll:
        if chosen_nll is not None:
            nll = per_example_or_scalar(chosen_nll, "chosen_nll", where, pw)
        else:
            nll = sequence_nll(pw, chosen_num_tokens)
        if add_sft_loss:
            losses = losses + sft_coef * nll
        if rpo_alpha is not None:
            losses = rpo_alpha * losses + nll

    reward_ln = length_normalization or all(t in _ALWAYS_LENGTH_NORMALISED for t in types)
    a, b, ra, rb = logps(reward_ln, uses_reference)
    chosen_rewards = beta * (a - ra if uses_reference else a).detach()
    rejected_rewards = beta * (b - rb if uses_reference else b).detach()
    return PreferenceLossOutput(
        loss=losses.mean(),
        losses=losses,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        nll_loss=None if nll is None else nll.detach(),
    )
