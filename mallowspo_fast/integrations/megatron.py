"""Drop-ins for the vocab-parallel log-prob and entropy functions of Megatron-based RLHF code, computed by
the vocab-parallel op (one pass over each rank's shard, two all-reduces of O(N) floats; docs/vocab-parallel.md).

- Megatron-core 0.16.1, ``megatron/core/tensor_parallel/cross_entropy.py``:
  :func:`vocab_parallel_cross_entropy` (what verl, NeMo-RL and others call for vocab-parallel log-probs).
- verl 0.9.1, ``verl/utils/megatron/tensor_parallel.py`` (verl's Megatron backend):
  :func:`vocab_parallel_log_probs_from_logits`, :func:`vocab_parallel_entropy`,
  :func:`vocab_parallel_entropy_with_chunking`, :func:`vocab_parallel_sum_pi_squared`.

Same names, argument orders, defaults and result dtypes as the peers. The peers take the tensor-parallel group
from Megatron's ``parallel_state``; so do the drop-ins, unless a ``group`` keyword names one (an addition of
ours, for code that runs without ``parallel_state``). Megatron's even split of the vocabulary holds: rank r of
the group holds ids ``[r · V_r, (r + 1) · V_r)``. Neither Megatron nor verl is imported when this module is
(``parallel_state`` only when a call needs the group and none is given).

Differences from the peers, all documented per function: the logits are never written (Megatron's
cross-entropy turns fp32 logits into their softmax in place, which is why verl clones them first); the
label-smoothing branch is not offered; a target of -100 gives 0 and no gradient, and other targets outside
[0, V) raise on CPU (NaN on CUDA), where Megatron, which has no ignore index, returns the logsumexp.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..ops import IGNORE_INDEX, vocab_parallel_token_entropy, vocab_parallel_token_logprobs
from ._common import check_logits, check_logits_labels, in_dtype

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_log_probs_from_logits", "vocab_parallel_entropy",
           "vocab_parallel_entropy_with_chunking", "vocab_parallel_sum_pi_squared", "tensor_parallel_group"]

MEGATRON_CORE_VERSION = "0.16.1"
VERL_VERSION = "0.9.1"


def tensor_parallel_group(group: dist.ProcessGroup | None = None, where: str = "tensor_parallel_group"):
    """The tensor-parallel group of a drop-in: ``group`` when given, else Megatron's
    ``parallel_state.get_tensor_model_parallel_group()`` (the peers' source) once Megatron's model parallelism is
    initialized; otherwise a RuntimeError saying so."""
    if group is not None:
        return group
    try:
        from megatron.core import parallel_state
    except ImportError:
        parallel_state = None
    if parallel_state is None or not parallel_state.model_parallel_is_initialized():
        raise RuntimeError(f"{where}: no tensor-parallel group: Megatron's parallel_state is not initialized "
                           "(megatron.core.parallel_state.initialize_model_parallel) and no group= was given")
    return parallel_state.get_tensor_model_parallel_group()


def _even_split_start(logits: torch.Tensor, group) -> int:
    """Megatron's ``VocabUtility.vocab_range_from_per_partition_vocab_size``: rank r starts at r · V_r."""
    return dist.get_rank(group) * logits.shape[-1]


def vocab_parallel_cross_entropy(vocab_parallel_logits: torch.Tensor, target: torch.Tensor,
                                 label_smoothing: float = 0.0, *, group: dist.ProcessGroup | None = None
                                 ) -> torch.Tensor:
    """Cross-entropy ``logsumexp(z) − z[target]`` of logits split by vocabulary over the tensor-parallel ranks.

    Source: Megatron-core 0.16.1, ``megatron/core/tensor_parallel/cross_entropy.py::vocab_parallel_cross_entropy(
    vocab_parallel_logits, target, label_smoothing=0.0)``.

    Args:
        vocab_parallel_logits: [..., V_r] this rank's shard (Megatron: [s, b, V / tp]), any float dtype.
        target: [...] global vocabulary ids, the same on every rank.
        label_smoothing: must be 0.0 (Megatron's smoothing branch is not offered: its mean over the vocabulary is
            taken per shard).
        group: the tensor-parallel group (ours; default: Megatron's ``parallel_state``).

    Returns:
        [...] fp32, differentiable in the logits (as Megatron: it computes in fp32). Every rank gets the same.

    Differences from Megatron: the logits are not modified (Megatron overwrites fp32 logits with their softmax);
    a target of -100 gives 0 and no gradient, other targets outside [0, V) raise a ValueError on CPU (NaN on
    CUDA), where Megatron returns the logsumexp.
    """
    where = "vocab_parallel_cross_entropy"
    check_logits_labels(vocab_parallel_logits, target, where)
    if label_smoothing != 0.0:
        raise ValueError(f"{where}: label_smoothing must be 0.0 here (the drop-in serves log-probs), got "
                         f"{label_smoothing!r}")
    pg = tensor_parallel_group(group, where)
    out = vocab_parallel_token_logprobs(vocab_parallel_logits, target, group=pg, ignore_index=IGNORE_INDEX,
                                        vocab_start=_even_split_start(vocab_parallel_logits, pg))
    return in_dtype(-out.logps, torch.float32)


def vocab_parallel_log_probs_from_logits(logits: torch.Tensor, labels: torch.Tensor, *,
                                         group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Log-probability of each label under softmax(logits), the logits split by vocabulary over the ranks.

    Source: verl 0.9.1, ``verl/utils/megatron/tensor_parallel.py::vocab_parallel_log_probs_from_logits(logits,
    labels)`` (``-vocab_parallel_cross_entropy(logits, labels)`` of Megatron-core).

    Returns:
        [...] fp32 (as verl), differentiable; identical on every rank. Differences: as
        :func:`vocab_parallel_cross_entropy` (the logits are never written, so verl's defensive clone before it
        is no longer needed).
    """
    where = "vocab_parallel_log_probs_from_logits"
    check_logits_labels(logits, labels, where)
    pg = tensor_parallel_group(group, where)
    out = vocab_parallel_token_logprobs(logits, labels, group=pg, vocab_start=_even_split_start(logits, pg))
    return in_dtype(out.logps, torch.float32)


def vocab_parallel_entropy(vocab_parallel_logits: torch.Tensor, *,
                           group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Entropy (nats) of softmax of the full-vocabulary logits at every position, from each rank's shard.

    Source: verl 0.9.1, ``verl/utils/megatron/tensor_parallel.py::vocab_parallel_entropy(vocab_parallel_logits)``
    (``_VocabParallelEntropy``: three all-reduces; here two, in one pass).

    Args:
        vocab_parallel_logits: [..., V_r] this rank's shard (verl: [total_nnz, V / tp]).
        group: the tensor-parallel group (ours; default: Megatron's ``parallel_state``).

    Returns:
        [...] in the logits' dtype (as verl), computed in fp32 (float64 for float64 logits), differentiable.
    """
    where = "vocab_parallel_entropy"
    check_logits(vocab_parallel_logits, where)
    pg = tensor_parallel_group(group, where)
    ent = vocab_parallel_token_entropy(vocab_parallel_logits, group=pg).entropy
    return in_dtype(ent, vocab_parallel_logits.dtype)


def vocab_parallel_entropy_with_chunking(vocab_parallel_logits: torch.Tensor, chunk_size: int = 2048, *,
                                         group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """:func:`vocab_parallel_entropy` as verl's chunked variant returns it.

    Source: verl 0.9.1, ``verl/utils/megatron/tensor_parallel.py::vocab_parallel_entropy_with_chunking(
    vocab_parallel_logits, chunk_size=2048)``. verl chunks the sequence dimension to bound its [N, V_r]
    temporaries; the fused op has none, so ``chunk_size`` is accepted and unused.

    Returns:
        ``vocab_parallel_logits.shape[:-1]`` in the default dtype (verl writes the chunks into ``torch.zeros``),
        differentiable. verl slices dimension 1 and so needs [b, s, V_r] logits; any leading shape works here.
    """
    where = "vocab_parallel_entropy_with_chunking"
    check_logits(vocab_parallel_logits, where)
    pg = tensor_parallel_group(group, where)
    ent = vocab_parallel_token_entropy(vocab_parallel_logits, group=pg).entropy
    return in_dtype(ent, torch.get_default_dtype())


def vocab_parallel_sum_pi_squared(vocab_parallel_logits: torch.Tensor, *,
                                  group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Σ p² of softmax of the full-vocabulary logits at every position, from each rank's shard.

    Source: verl 0.9.1, ``verl/utils/megatron/tensor_parallel.py::vocab_parallel_sum_pi_squared(
    vocab_parallel_logits)`` (three all-reduces; here the statistics of the same two as the entropy, which come
    with it).

    Returns:
        [...] in the logits' dtype (as verl), non-destructive as verl's. Not differentiable (verl's is, through
        its torch ops; its callers use it as a weight of the advantages).
    """
    where = "vocab_parallel_sum_pi_squared"
    check_logits(vocab_parallel_logits, where)
    pg = tensor_parallel_group(group, where)
    with torch.no_grad():
        stats = vocab_parallel_token_entropy(vocab_parallel_logits, group=pg, return_stats=True)
    return in_dtype(stats.log_sum_sq_probs.exp(), vocab_parallel_logits.dtype)
