"""What the output layer does to the logits before the softmax, and the per-row statistics the op keeps.

Some models transform the output layer's product ``y = hidden @ W.T + b`` before the softmax: a logit
scale (Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``, Falcon-H1's ``lm_head_multiplier``,
...), a soft cap (Gemma-2/3's ``final_logit_softcapping``), and every sampler divides by a temperature.
The op applies them in the order those models and TRL's fused head do::

    z = softcap · tanh(scale · y / softcap) / T      (with a soft cap)
    z = scale · y / T                                 (without)

Every backend computes the same two-multiplier form ``z = post · tanh(pre · y)`` (or ``z = post · y``),
whose derivative is ``dz/dy = post · pre · (1 − tanh²(pre · y))`` (or ``post``): without a soft cap the
scale and the temperature cost nothing beyond today's single multiply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch


def _positive_finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


@dataclass(frozen=True)
class LogitTransform:
    """``z = softcap · tanh(logit_scale · y / softcap) / temperature`` (no soft cap: ``logit_scale · y / T``).

    Attributes:
        temperature: positive, finite divisor.
        softcap: positive, finite soft cap, or None.
        logit_scale: finite, non-zero multiplier applied first.
    """

    temperature: float = 1.0
    softcap: float | None = None
    logit_scale: float = 1.0

    @classmethod
    def checked(cls, temperature: object, softcap: object, logit_scale: object, where: str) -> LogitTransform:
        """The transform of these arguments, or a ValueError naming ``where`` and the bad value."""
        if not _positive_finite(temperature):
            raise ValueError(f"{where}: temperature must be a positive finite number, got {temperature!r}")
        if softcap is not None and not _positive_finite(softcap):
            raise ValueError(f"{where}: softcap must be None or a positive finite number, got {softcap!r}")
        if not (isinstance(logit_scale, (int, float)) and not isinstance(logit_scale, bool)
                and math.isfinite(logit_scale) and logit_scale != 0):
            raise ValueError(f"{where}: logit_scale must be a finite non-zero number, got {logit_scale!r}")
        return cls(float(temperature), None if softcap is None else float(softcap), float(logit_scale))

    @property
    def has_softcap(self) -> bool:
        return self.softcap is not None

    @property
    def pre(self) -> float:
        """Multiplier inside the tanh (``scale / softcap``); 1.0 without a soft cap (unused)."""
        return self.logit_scale / self.softcap if self.softcap is not None else 1.0

    @property
    def post(self) -> float:
        """Multiplier outside the tanh (``softcap / T``), or the whole multiplier ``scale / T``."""
        if self.softcap is not None:
            return self.softcap / self.temperature
        return self.logit_scale / self.temperature

    @property
    def is_identity(self) -> bool:
        return self.softcap is None and self.post == 1.0

    def apply(self, y: torch.Tensor) -> torch.Tensor:
        """z of ``y`` in ``y``'s dtype (the references call it in float64; the paths in fp32)."""
        if self.softcap is not None:
            return torch.tanh(y * self.pre) * self.post
        return y * self.post if self.post != 1.0 else y


IDENTITY = LogitTransform()


class RowStats(NamedTuple):
    """What one pass of a backend's forward returns for logits [B, T, V]: [B, T] tensors, each its own
    allocation, in the accumulation dtype (float64 for float64 logits, else fp32). Masked rows (label ==
    ignore_index) hold 0 everywhere (False for ``is_top1``).

    Attributes:
        logps: z[label] − lse; None without labels. Out-of-range labels give NaN on accelerators.
        entropy: H = lse − Σ softmax(z)·z.
        lse: logsumexp(z) (what the backward recomputes the probabilities from).
        log_sum_sq_probs: log Σ p²; None unless asked for.
        mean_logits: mean of z over the vocabulary; None unless asked for.
        is_top1: bool, label == argmax(z) (first index on ties); None unless asked for, or without labels.
        lse_lo: what rounding lse to its dtype left out (lse + lse_lo to about twice the precision), so that
            a backward recomputing log p = (z − lse) − lse_lo stays exact for large logits; None when a
            backend does not provide it.
    """

    logps: torch.Tensor | None
    entropy: torch.Tensor
    lse: torch.Tensor
    log_sum_sq_probs: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    lse_lo: torch.Tensor | None = None
