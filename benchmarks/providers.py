"""Who computes the per-token log-prob / entropy in a benchmark: ours, the reference, and peers.

Every provider answers the same question the op answers (KERNELS.md §1) so that the comparison is
like for like:

* token level: ``fn(logits [N, V], labels [N]) -> (logp [N] fp32, entropy [N] fp32 or None)``
* sequence level: ``fn(logits [B, T, V], labels [B, T]) -> (logps [B], entropy [B] or None, num_tokens [B])``

Masked labels (``IGNORE_INDEX``) give 0. Peers that cannot compute the entropy return None and the
tables say so ("log-prob only"): they do less work than we do.

Peers are optional: TRL's ``selective_log_softmax`` + ``entropy_from_logits`` and Liger-Kernel's
cross entropy with ``reduction="none"``. When a peer is not installed (or needs CUDA on a CPU run)
building it raises :class:`Unavailable` and the tables show the reason instead of numbers.

The memory mode (``linear`` subject) asks the same question one level up, from the hidden states and
the output weight: ``fn(hidden [B, T, H], weight [V, H], labels [B, T]) -> (logps [B], entropy [B] or
None)``, providers :data:`LINEAR_PROVIDERS`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F

import mallowspo_fast as mpf
from mallowspo_fast.ops.naive import naive_sequence_logprobs, naive_token_logprobs

IGNORE_INDEX = -100

PROVIDERS = ("ours", "reference", "compiled", "trl", "liger")
DESCRIPTIONS = {
    "ours": "mallowspo-fast (triton on CUDA, chunked torch path elsewhere)",
    "reference": "naive eager reference (full log-softmax)",
    "compiled": "torch.compile of the naive reference",
    "trl": "TRL selective_log_softmax + entropy_from_logits",
    "liger": "Liger-Kernel cross entropy, reduction='none' (log-prob only)",
}
# Peers that compute less than we do are flagged in the tables.
LOGP_ONLY = {"liger"}

LINEAR_PROVIDERS = ("ours-chunked", "ours-logits", "reference", "compiled", "liger")
LINEAR_DESCRIPTIONS = {
    "ours-chunked": "mpf.linear_sequence_logprobs: the memory mode, one chunk of logits at a time",
    "ours-logits": "F.linear, then mpf.sequence_logprobs on the materialised logits",
    "reference": "F.linear, then the naive eager reference (full log-softmax)",
    "compiled": "torch.compile of F.linear + the naive reference",
    "liger": "Liger-Kernel fused linear cross entropy, reduction='none' (log-prob only; its gradient is "
             "computed in the forward and scaled by one upstream value)",
}

TokenFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
SequenceFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]


class Unavailable(Exception):
    """A provider that cannot run here; ``status`` is what the tables print ("not installed", ...)."""

    def __init__(self, status: str, reason: str):
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason


def ours_backend(device: str) -> str:
    return "triton" if device.startswith("cuda") else "torch"


def availability(provider: str, device: str) -> tuple[str, str] | None:
    """None when ``provider`` can run on ``device``; else (status, reason). Cheap: imports nothing."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")
    if provider == "trl" and importlib.util.find_spec("trl") is None:
        return "not installed", "pip install trl"
    if provider == "liger":
        if importlib.util.find_spec("liger_kernel") is None:
            return "not installed", "pip install liger-kernel"
        if not device.startswith("cuda"):
            return "unsupported", "Liger-Kernel runs on CUDA only"
    return None


def _masked(logp: torch.Tensor, entropy: torch.Tensor | None, mask: torch.Tensor):
    zero = torch.zeros((), dtype=torch.float32, device=logp.device)
    logp = torch.where(mask, logp.float(), zero)
    return logp, (torch.where(mask, entropy.float(), zero) if entropy is not None else None)


def _trl_token_fn() -> TokenFn:
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    def fn(logits, labels):
        mask = labels != IGNORE_INDEX
        safe = torch.where(mask, labels, torch.zeros_like(labels))
        return _masked(selective_log_softmax(logits, safe), entropy_from_logits(logits), mask)

    return fn


def _liger_token_fn() -> TokenFn:
    from liger_kernel.transformers import LigerCrossEntropyLoss

    ce = LigerCrossEntropyLoss(reduction="none", ignore_index=IGNORE_INDEX)

    def fn(logits, labels):
        shape = labels.shape
        loss = ce(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        return _masked(-loss.view(shape), None, labels != IGNORE_INDEX)

    return fn


def token_fn(provider: str, device: str) -> TokenFn:
    """The per-token function of ``provider``; raises Unavailable when it cannot run here."""
    missing = availability(provider, device)
    if missing is not None:
        raise Unavailable(*missing)
    if provider == "ours":
        backend = ours_backend(device)

        def fn(logits, labels):
            out = mpf.token_logprobs(logits, labels, ignore_index=IGNORE_INDEX, backend=backend)
            return out.logps, out.entropy

        return fn
    if provider == "reference":
        return lambda logits, labels: naive_token_logprobs(logits, labels, IGNORE_INDEX)
    if provider == "compiled":
        compiled = torch.compile(naive_token_logprobs, dynamic=False)
        return lambda logits, labels: compiled(logits, labels, IGNORE_INDEX)
    if provider == "trl":
        return _trl_token_fn()
    return _liger_token_fn()


def sequence_fn(provider: str, device: str) -> SequenceFn:
    """Per-sequence masked sum of log-probs, masked mean entropy, token counts."""
    missing = availability(provider, device)
    if missing is not None:
        raise Unavailable(*missing)
    if provider == "ours":
        backend = ours_backend(device)

        def fn(logits, labels):
            out = mpf.sequence_logprobs(logits, labels, ignore_index=IGNORE_INDEX, backend=backend)
            return out.logps, out.entropy, out.num_tokens

        return fn
    if provider == "reference":
        return lambda logits, labels: naive_sequence_logprobs(logits, labels, IGNORE_INDEX)
    if provider == "compiled":
        compiled = torch.compile(naive_sequence_logprobs, dynamic=False)
        return lambda logits, labels: compiled(logits, labels, IGNORE_INDEX)
    tok = token_fn(provider, device)

    def reduce(logits, labels):
        logp, entropy = tok(logits, labels)
        num_tokens = (labels != IGNORE_INDEX).sum(-1)
        mean_entropy = entropy.sum(-1) / num_tokens.clamp(min=1) if entropy is not None else None
        return logp.sum(-1), mean_entropy, num_tokens

    return reduce


# ----------------------------------------------------------------------------------------------------
# Hidden-state level (the memory mode)

LinearFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def linear_availability(provider: str, device: str) -> tuple[str, str] | None:
    """As :func:`availability`, for the providers of the ``linear`` subject."""
    if provider not in LINEAR_PROVIDERS:
        raise ValueError(f"unknown linear provider {provider!r}; expected one of {LINEAR_PROVIDERS}")
    return availability("liger", device) if provider == "liger" else None


def _reference_linear(hidden, weight, labels):
    logps, entropy, _ = naive_sequence_logprobs(F.linear(hidden, weight), labels, IGNORE_INDEX)
    return logps, entropy


def _liger_linear_fn() -> LinearFn:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    flce = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="none")

    def fn(hidden, weight, labels):
        out = flce(weight, hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1))
        loss = out[0] if isinstance(out, (tuple, list)) else getattr(out, "loss", out)
        logp, _ = _masked(-loss.view(labels.shape), None, labels != IGNORE_INDEX)
        return logp.sum(-1), None

    return fn


def linear_fn(provider: str, device: str, chunk_size: int | None = None) -> LinearFn:
    """Per-sequence log-prob sums and mean entropies from hidden states and the output weight."""
    missing = linear_availability(provider, device)
    if missing is not None:
        raise Unavailable(*missing)
    backend = ours_backend(device)
    if provider == "ours-chunked":
        def chunked(hidden, weight, labels):
            out = mpf.linear_sequence_logprobs(hidden, weight, labels, ignore_index=IGNORE_INDEX,
                                               chunk_size=chunk_size, backend=backend)
            return out.logps, out.entropy

        return chunked
    if provider == "ours-logits":
        def logits_path(hidden, weight, labels):
            out = mpf.sequence_logprobs(F.linear(hidden, weight), labels, ignore_index=IGNORE_INDEX,
                                        backend=backend)
            return out.logps, out.entropy

        return logits_path
    if provider == "reference":
        return _reference_linear
    if provider == "compiled":
        return torch.compile(_reference_linear, dynamic=False)
    return _liger_linear_fn()
