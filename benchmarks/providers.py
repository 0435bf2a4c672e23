"""Who computes the per-token log-prob / entropy in a benchmark: ours, the reference, and peers.

Every provider answers the same question the op answers (docs/kernels.md, "What the kernels compute") so
that the comparison is like for like:

* token level: ``fn(logits [N, V], labels [N]) -> (logp [N] fp32, entropy [N] fp32 or None)``
* sequence level: ``fn(logits [B, T, V], labels [B, T]) -> (logps [B], entropy [B] or None, num_tokens [B])``

Masked labels (``IGNORE_INDEX``) give 0. Peers that cannot compute the entropy return None and the
tables say so ("log-prob only"): they do less work than we do.

Two baselines compile the reference: ``compiled`` compiles the per-token function only (the loss around
it stays eager), ``compiled-loss`` compiles the whole loss a user would write (one log-softmax, the
gather, the entropy and the masked sums in one graph, forward and backward). The latter answers at the
loss level only: :func:`token_loss_fn` (op subject) and ``benchmarks.loss_step`` (the preference loss).

Peers are optional: TRL's one-call ``selective_log_softmax_and_entropy`` (TRL >= 1.16) and Liger-Kernel's
cross entropy with ``reduction="none"``. When a peer is not installed (or needs CUDA on a CPU run)
building it raises :class:`Unavailable` and the tables show the reason instead of numbers.

The memory mode (``linear`` subject) asks the same question one level up, from the hidden states and
the output weight: ``fn(hidden [B, T, H], weight [V, H], labels [B, T]) -> (logps [B], entropy [B] or
None)``, providers :data:`LINEAR_PROVIDERS` (TRL's fused head ``ChunkedLogProbFunction`` among them).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F

import mallowspo_fast as mpf
from mallowspo_fast.ops import IGNORE_INDEX
from mallowspo_fast.ops.naive import naive_sequence_logprobs, naive_token_logprobs

PROVIDERS = ("ours", "reference", "compiled", "compiled-loss", "trl", "liger")
DESCRIPTIONS = {
    "ours": "mallowspo-fast (triton on CUDA, chunked torch path elsewhere)",
    "reference": "naive eager reference (full log-softmax)",
    "compiled": "torch.compile of the naive per-token reference only (log-softmax, gather, entropy); the loss "
                "around it stays eager",
    "compiled-loss": "torch.compile of the whole loss a user would write: one log-softmax, the gather, the "
                     "entropy and the masked sums (op: Σ g·logp + h·H over the unmasked tokens; loss step: the "
                     "sequence sums and the preference loss) in one graph, forward and backward",
    "trl": "TRL selective_log_softmax_and_entropy (TRL >= 1.16): log-probs and entropies from one call; on CUDA "
           "one Triton kernel that reads the logits once (its entropy is log Z − Σp·z over the unshifted logits), "
           "elsewhere TRL's torch fallback (selective_log_softmax + entropy_from_logits, two passes)",
    "liger": "Liger-Kernel cross entropy, reduction='none' (log-prob only)",
}
# Peers that compute less than we do are flagged in the tables.
LOGP_ONLY = {"liger"}
# Baselines that answer at the loss level only (no per-token outputs): the op subject differentiates their loss.
LOSS_LEVEL = {"compiled-loss"}

LINEAR_PROVIDERS = ("ours-chunked", "ours-logits", "reference", "compiled", "trl", "liger")
LINEAR_DESCRIPTIONS = {
    "ours-chunked": "mpf.linear_sequence_logprobs: the memory mode, one chunk of logits at a time",
    "ours-logits": "F.linear, then mpf.sequence_logprobs on the materialised logits",
    "reference": "F.linear, then the naive eager reference (full log-softmax)",
    "compiled": "torch.compile of F.linear + the naive reference",
    "trl": "TRL's fused LM head, trl.kernels.ChunkedLogProbFunction (TRL >= 1.16), outputs log_probs and "
           "entropy: [4096-token x 32768-column] logits tiles by matmul, each folded into online-logsumexp "
           "statistics (a Triton kernel on CUDA, torch ops elsewhere); the backward recomputes each tile. Scores "
           "only the unmasked tokens on CUDA and every token elsewhere, as TRL's own head does",
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
    try:
        from trl.trainer.utils import selective_log_softmax_and_entropy
    except ImportError as e:  # TRL before 1.16
        raise Unavailable("unsupported", f"needs TRL >= 1.16 (selective_log_softmax_and_entropy): {e}") from e

    def fn(logits, labels):
        mask = labels != IGNORE_INDEX
        safe = torch.where(mask, labels, torch.zeros_like(labels))
        logp, entropy = selective_log_softmax_and_entropy(logits, safe, row_mask=mask)
        return _masked(logp, entropy, mask)

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
    if provider in LOSS_LEVEL:
        raise ValueError(f"provider {provider!r} computes a whole loss, not per-token outputs: use token_loss_fn")
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


def whole_token_loss(logits: torch.Tensor, labels: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Σ over the unmasked tokens of g·logp + h·H, as a user writes it: one log-softmax in fp32, the gather,
    -(p·log p).sum for the entropy, the masked sum. ``g``, ``h`` [N] are per-token weights (with g = 1 and
    h = 0.5: Σ logp + 0.5·Σ H); the other providers' backward receives the same upstream values."""
    mask = labels != IGNORE_INDEX
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return torch.where(mask, g * logp + h * entropy, 0.0).sum()


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def token_loss_fn(provider: str, device: str) -> LossFn:
    """``loss(logits [N, V], labels [N], g [N], h [N]) -> Σ g·logp + Σ h·entropy`` (the op subject's scalar):
    the provider's per-token outputs weighted eagerly, or, for ``compiled-loss``, the whole loss in one
    compiled graph. A log-prob-only provider contributes Σ g·logp."""
    missing = availability(provider, device)
    if missing is not None:
        raise Unavailable(*missing)
    if provider == "compiled-loss":
        return torch.compile(whole_token_loss, dynamic=False)
    tok = token_fn(provider, device)

    def loss(logits, labels, g, h):
        logp, entropy = tok(logits, labels)
        out = (logp * g).sum()
        return out + (entropy * h).sum() if entropy is not None else out

    return loss


def sequence_fn(provider: str, device: str) -> SequenceFn:
    """Per-sequence masked sum of log-probs, masked mean entropy, token counts."""
    missing = availability(provider, device)
    if missing is not None:
        raise Unavailable(*missing)
    if provider in LOSS_LEVEL:
        raise ValueError(f"provider {provider!r} computes a whole loss, not sequence outputs (see loss_step)")
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
    return availability(provider, device) if provider in ("liger", "trl") else None


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


def trl_chunked_logprobs() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """``fn(hidden [N, H], weight [V, H], bias [V] or None, targets [N]) -> (logps [N], entropy [N])`` of TRL's
    fused head as TRL's own patched forward calls it (temperature 1, its vocabulary tile width, outputs
    log_probs and entropy); raises Unavailable without TRL >= 1.16."""
    if importlib.util.find_spec("trl") is None:
        raise Unavailable("not installed", "pip install trl")
    try:
        from trl.kernels import ChunkedLogProbFunction
    except ImportError as e:
        raise Unavailable("unsupported", f"needs TRL >= 1.16 (trl.kernels.ChunkedLogProbFunction): {e}") from e
    try:  # the vocabulary tile width TRL's head uses (a private constant; its 1.16 value otherwise)
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as width
    except ImportError:
        width = 32768

    def fn(hidden, weight, bias, targets):
        logps, entropy, *_ = ChunkedLogProbFunction.apply(hidden, weight, bias, targets, 1.0, width, None, 1.0,
                                                          ("log_probs", "entropy"))
        return logps, entropy

    return fn


def _trl_linear_fn(device: str) -> LinearFn:
    head = trl_chunked_logprobs()
    # TRL's head scores only the unmasked tokens where its Triton fold runs (CUDA), every token elsewhere
    # (targets clamped to 0, outputs masked afterwards).
    compact = device.startswith("cuda")

    def fn(hidden, weight, labels):
        mask = labels != IGNORE_INDEX
        if compact:
            logp_rows, ent_rows = head(hidden[mask], weight, None, labels[mask])
            logp = logp_rows.new_zeros(mask.shape).masked_scatter(mask, logp_rows)
            entropy = ent_rows.new_zeros(mask.shape).masked_scatter(mask, ent_rows)
        else:
            logp, entropy = head(hidden.reshape(-1, hidden.shape[-1]), weight, None, labels.clamp(min=0).reshape(-1))
            logp, entropy = _masked(logp.view(mask.shape), entropy.view(mask.shape), mask)
        num_tokens = mask.sum(-1)
        return logp.sum(-1), entropy.sum(-1) / num_tokens.clamp(min=1)

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
    if provider == "trl":
        return _trl_linear_fn(device)
    return _liger_linear_fn()
