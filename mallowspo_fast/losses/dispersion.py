"""The MallowsPO dispersion estimator c(x) = −log φ(x), from reference-model token entropies.

Per response y: ē(y) = mean_t H_t / log V, with H_t the natural-log entropy of the reference model's
next-token distribution at each response position and V the full output size (logits.shape[-1]).
Per pair: ē(x) = ½ (ē(y_w) + ē(y_l)) and c(x) = −φ* · ln max(ē(x), 1e-6), so φ(x) = ē(x)^φ*.
The mean entropies are exactly ``SequenceLogprobs.entropy`` of the reference forward pass.

A response with no response tokens has no entropy; its pair gets the neutral c = 1 (the DPO weight).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._checks import batch_tensor, real_number, same_batch

__all__ = [
    "DEFAULT_PHI_STAR",
    "ENTROPY_FLOOR",
    "pair_entropy",
    "empty_response_pairs",
    "neg_log_dispersion",
    "auto_phi_star",
]

DEFAULT_PHI_STAR = 0.29  # official `neg_log_dispersion_mean` (tuned for Llama-3-8B on UltraFeedback)
ENTROPY_FLOOR = 1e-6  # ē(x) is floored here before the log: a fully confident pair gets c = φ*·13.8
NEUTRAL_NEG_LOG_DISPERSION = 1.0


def _check_vocab_size(vocab_size: object, where: str) -> int:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"{where}: vocab_size must be an int >= 2 (logits.shape[-1]), got {vocab_size!r}")
    return vocab_size


def pair_entropy(chosen_entropy: torch.Tensor, rejected_entropy: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Normalised pair entropy ē(x) = ½ (H̄_w + H̄_l) / log V, in [0, 1] up to rounding.

    Args:
        chosen_entropy: [B] mean token entropy (nats) of each chosen response, e.g. the reference
            model's ``SequenceLogprobs.entropy`` for the chosen rows.
        rejected_entropy: [B] same for the rejected responses.
        vocab_size: V, the size of the output distribution (logits.shape[-1]).

    Returns:
        ē(x) [B], detached, in the entropies' dtype. Pairs with an empty response are not special-cased
        here (see :func:`empty_response_pairs`).

    Raises:
        TypeError: an entropy that is not a floating-point tensor [B].
        ValueError: entropies of different shapes or devices, or a ``vocab_size`` that is not an int >= 2.

    Examples:
        >>> e = pair_entropy(*ref.entropy.chunk(2), ref_logits.shape[-1])    # collect over the training set
    """
    where = "pair_entropy"
    batch_tensor(chosen_entropy, "chosen_entropy", where)
    batch_tensor(rejected_entropy, "rejected_entropy", where)
    same_batch(where, "chosen_entropy", chosen_entropy, rejected_entropy=rejected_entropy)
    log_v = math.log(_check_vocab_size(vocab_size, where))
    return (0.5 * (chosen_entropy.detach() + rejected_entropy.detach()) / log_v).to(chosen_entropy.dtype)


def empty_response_pairs(chosen_num_tokens: torch.Tensor, rejected_num_tokens: torch.Tensor) -> torch.Tensor:
    """Bool [B]: pairs whose chosen or rejected response has no response token (ē undefined).

    ``int(empty_response_pairs(...).sum())`` is the count to log; the metrics helper reports it as
    ``dispersion/empty_pairs`` without a host sync.

    Args:
        chosen_num_tokens: [B] response token counts of the chosen answers (``SequenceLogprobs.num_tokens``).
        rejected_num_tokens: [B] the same for the rejected answers.

    Returns:
        Bool [B], True where either count is 0.

    Raises:
        TypeError: counts that are not a tensor [B] of numbers (bool tensors are refused).
        ValueError: counts of different shapes or devices.
    """
    where = "empty_response_pairs"
    batch_tensor(chosen_num_tokens, "chosen_num_tokens", where, floating=False)
    batch_tensor(rejected_num_tokens, "rejected_num_tokens", where, floating=False)
    same_batch(where, "chosen_num_tokens", chosen_num_tokens, rejected_num_tokens=rejected_num_tokens)
    return (chosen_num_tokens == 0) | (rejected_num_tokens == 0)


def _check_phi_star(phi_star: object, where: str) -> float:
    if isinstance(phi_star, str):
        raise ValueError(
            f"{where}: phi_star={phi_star!r} is not a number. phi_star='auto' is resolved once over the "
            "training set, not per batch: compute it with auto_phi_star(pair_entropies) and pass the float"
        )
    return real_number(phi_star, "phi_star", where, low=0.0, low_open=True)


def neg_log_dispersion(
    chosen_entropy: torch.Tensor,
    rejected_entropy: torch.Tensor,
    vocab_size: int,
    *,
    phi_star: float = DEFAULT_PHI_STAR,
    chosen_num_tokens: torch.Tensor | None = None,
    rejected_num_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pair neg-log dispersion c(x) = −φ* · ln max(ē(x), 1e-6) of MallowsPO (spec §2).

    Args:
        chosen_entropy: [B] per-sequence MEAN token entropy in nats of the chosen responses under the
            reference model (``SequenceLogprobs.entropy``); detached here, c is a constant.
        rejected_entropy: [B] same for the rejected responses.
        vocab_size: V = logits.shape[-1] (the normaliser log V).
        phi_star: φ* > 0 (official name ``neg_log_dispersion_mean``, default 0.29). For "auto"
            compute the float once with :func:`auto_phi_star` over the training set.
        chosen_num_tokens: [B] response-token counts of the chosen responses
            (``SequenceLogprobs.num_tokens``). Give both counts to map pairs with an empty response to
            the neutral c = 1.0; without them such a pair's entropy reads as 0 and c = φ*·ln(1e6).
        rejected_num_tokens: [B] the same for the rejected responses.

    Returns:
        c [B] in the entropies' dtype, ≥ 0, never NaN (ē is clamped to [1e-6, 1]).

    Raises:
        ValueError: ``phi_star`` not a positive number ("auto" included: resolve it with
            :func:`auto_phi_star` first), only one of the two token counts, a bad ``vocab_size``, or
            tensors of different shapes.
        TypeError: an entropy or a count that is not a tensor [B] of the right kind.

    Examples:
        >>> ref = sequence_logprobs(ref_logits, labels)          # rows: chosen then rejected
        >>> ent_w, ent_l = ref.entropy.chunk(2); n_w, n_l = ref.num_tokens.chunk(2)
        >>> c = neg_log_dispersion(ent_w, ent_l, ref_logits.shape[-1],
        ...                        chosen_num_tokens=n_w, rejected_num_tokens=n_l)
    """
    where = "neg_log_dispersion"
    phi_star = _check_phi_star(phi_star, where)
    e = pair_entropy(chosen_entropy, rejected_entropy, vocab_size)
    # ē ≤ 1 in exact arithmetic; the upper clamp keeps rounding from giving a negative c.
    c = -phi_star * torch.log(e.clamp(ENTROPY_FLOOR, 1.0))
    if (chosen_num_tokens is None) != (rejected_num_tokens is None):
        raise ValueError(f"{where}: give both chosen_num_tokens and rejected_num_tokens, or neither")
    if chosen_num_tokens is not None:
        same_batch(where, "chosen_entropy", chosen_entropy, chosen_num_tokens=chosen_num_tokens,
                   rejected_num_tokens=rejected_num_tokens)
        empty = empty_response_pairs(chosen_num_tokens, rejected_num_tokens)
        c = torch.where(empty, torch.full_like(c, NEUTRAL_NEG_LOG_DISPERSION), c)
    return c


def auto_phi_star(
    pair_entropies: torch.Tensor | Sequence[float],
    *,
    empty_pairs: torch.Tensor | None = None,
) -> float:
    """φ* = 1 / mean_x(−ln max(ē(x), 1e-6)): the scale that makes the mean c(x) equal 1.

    With this φ* the average MallowsPO-θ weight is 1, so β keeps the meaning it has in DPO. Call it
    once, over the whole training set (e.g. during the reference precompute pass), and pass the
    result as ``phi_star``; a per-batch φ* would make c depend on the batch composition.

    Args:
        pair_entropies: ē(x) for every training pair ([N] tensor or sequence of floats), e.g. the
            concatenated :func:`pair_entropy` outputs.
        empty_pairs: optional bool [N] from :func:`empty_response_pairs`; those pairs are left out.

    Returns:
        φ* as a Python float (this reads the values on the host once).

    Raises:
        ValueError: no usable pair, NaN or inf entropies, a mask of another length, or every ē(x)
            equal to 1 (all-uniform predictions: no scale).
        TypeError: ``empty_pairs`` that is not a bool tensor.

    Examples:
        >>> phi_star = auto_phi_star(torch.cat(all_pair_entropies), empty_pairs=torch.cat(all_empty))
        >>> c = neg_log_dispersion(ent_w, ent_l, vocab_size, phi_star=phi_star)
    """
    where = "auto_phi_star"
    e = pair_entropies if isinstance(pair_entropies, torch.Tensor) else torch.tensor(list(pair_entropies))
    e = e.detach().to(torch.float64).reshape(-1)
    if empty_pairs is not None:
        if not isinstance(empty_pairs, torch.Tensor) or empty_pairs.dtype != torch.bool:
            raise TypeError(f"{where}: empty_pairs must be a bool tensor, got {empty_pairs!r}")
        if empty_pairs.numel() != e.numel():
            raise ValueError(
                f"{where}: empty_pairs has {empty_pairs.numel()} entries but pair_entropies has {e.numel()}"
            )
        e = e[~empty_pairs.reshape(-1).to(e.device)]
    if e.numel() == 0:
        raise ValueError(f"{where}: no pair entropy to average (empty input or every pair empty)")
    if not bool(torch.isfinite(e).all()):
        raise ValueError(f"{where}: pair_entropies contain NaN or inf")
    mean_neg_log = float(-torch.log(e.clamp(ENTROPY_FLOOR, 1.0)).mean())
    if mean_neg_log <= 0.0:
        raise ValueError(
            f"{where}: every pair entropy is 1 (uniform predictions), so mean(-ln ē) = 0 and no φ* "
            "makes the mean weight 1; pass a fixed phi_star instead"
        )
    return 1.0 / mean_neg_log
