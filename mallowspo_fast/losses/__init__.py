"""Preference losses and the MallowsPO dispersion estimator (pure functions of small tensors).

Nothing here imports models, data, DeepSpeed or the trainer: every function takes per-sequence
tensors ([B] log-probs, entropies, token counts) and returns tensors.
"""

from .dispersion import (
    DEFAULT_PHI_STAR,
    auto_phi_star,
    empty_response_pairs,
    neg_log_dispersion,
    pair_entropy,
)
from .kto_orpo import KTOLossOutput, kto_loss, orpo_loss
from .metrics import preference_metrics
from .phi_link import mallows_phi_link, mallows_phi_link_nll
from .preference import LOSS_TYPES, PreferenceLossOutput, preference_loss

__all__ = [
    "LOSS_TYPES",
    "DEFAULT_PHI_STAR",
    "PreferenceLossOutput",
    "KTOLossOutput",
    "preference_loss",
    "kto_loss",
    "orpo_loss",
    "neg_log_dispersion",
    "pair_entropy",
    "empty_response_pairs",
    "auto_phi_star",
    "mallows_phi_link",
    "mallows_phi_link_nll",
    "preference_metrics",
]
