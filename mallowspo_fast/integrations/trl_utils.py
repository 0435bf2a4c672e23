"""Drop-ins for TRL's ``trl.trainer.utils`` log-prob and entropy helpers (TRL 1.16.0), computed by the fused op.

Same names, argument orders and defaults as the TRL functions; the differences are stated per function.
Outputs are fp32 whatever the logits dtype (TRL returns the logits dtype on its eager path). Importing this
module does not import TRL.
"""

from __future__ import annotations

import torch

from ._common import every_row_entropy, label_logprobs

__all__ = ["selective_log_softmax", "entropy_from_logits", "selective_log_softmax_and_entropy"]


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, temperature: float = 1.0,
                          row_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``log_softmax(logits / temperature)`` gathered at ``index``, in one pass over the logits.

    Source: TRL 1.16.0, ``trl/trainer/utils.py::selective_log_softmax(logits, index, temperature=1.0,
    row_mask=None)``.

    Args:
        logits: [..., V].
        index: [...] (one label per row) or [..., K] (K labels per row, e.g. top-K).
        temperature: positive divisor of the logits.
        row_mask: optional, shape of ``index``; rows where it is 0 give 0 (and no gradient).

    Returns:
        fp32 log-probs, shape of ``index``.
    """
    if temperature <= 0:
        raise ValueError(f"selective_log_softmax: expected a positive temperature, found {temperature!r}")
    if isinstance(index, torch.Tensor) and isinstance(logits, torch.Tensor) and index.dim() == logits.dim():
        # K labels per row: logsumexp of every row from the op (one pass), then K gathers.
        lse = every_row_entropy(logits, temperature=temperature, where="selective_log_softmax").lse
        out = torch.gather(logits, -1, index.long()).float() / temperature - lse.unsqueeze(-1)
        if row_mask is not None:
            out = out.masked_fill(row_mask == 0, 0.0)
        return out
    return label_logprobs(logits, index, temperature=temperature, row_mask=row_mask,
                          where="selective_log_softmax").logps


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) at every position, one pass of the fused op.

    Source: TRL 1.16.0, ``trl/trainer/utils.py::entropy_from_logits(logits, chunk_size=128)``.
    ``chunk_size`` is accepted for compatibility and unused: the op streams each row once and keeps no
    ``[chunk, V]`` temporaries.

    Returns:
        fp32, shape ``logits.shape[:-1]``, differentiable.
    """
    del chunk_size
    return every_row_entropy(logits, where="entropy_from_logits").entropy


def selective_log_softmax_and_entropy(logits: torch.Tensor, index: torch.Tensor, entropy_requires_grad: bool = True,
                                      temperature: float = 1.0,
                                      row_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected log-probs and per-row entropies in one pass over the logits.

    Source: TRL 1.16.0, ``trl/trainer/utils.py::selective_log_softmax_and_entropy(logits, index,
    entropy_requires_grad=True, temperature=1.0, row_mask=None)``. Both come from the same pass of the
    fused op (TRL's eager path makes two); ``index`` has one label per row.

    Returns:
        (logps, entropy), fp32, shape of ``index``; 0 where ``row_mask == 0``.
    """
    if temperature <= 0:
        raise ValueError(f"selective_log_softmax_and_entropy: expected a positive temperature, found {temperature!r}")
    out = label_logprobs(logits, index, temperature=temperature, row_mask=row_mask,
                         where="selective_log_softmax_and_entropy")
    return out.logps, out.entropy if entropy_requires_grad else out.entropy.detach()
