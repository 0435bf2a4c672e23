"""Testing utilities: float64 references with gradients, input makers and per-dtype tolerances.

The test suite and the GPU check (``python -m benchmarks.gpu_check``) compare the ops against the same
references, on the same kinds of inputs, with the same tolerances: this module is their one copy. It is
not part of ``mallowspo_fast.__all__``; import it as ``from mallowspo_fast import testing``.

The references run the naive op of :mod:`mallowspo_fast.ops.naive` in float64 on the same (rounded)
input values the op under test sees, on a fresh float64 leaf whose ``.grad`` is the float64 gradient.
A result ``x`` of dtype ``d`` passes against its reference ``r`` when ``|x - r| <= atol + rtol·|r|``
with the tolerances of ``d`` (:func:`tolerances`), scaled for a logit transform by
:func:`transform_scales`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .ops.logprobs import IGNORE_INDEX
from .ops.naive import naive_sequence_logprobs, naive_token_entropy, naive_token_logprobs, naive_token_stats
from .ops.transform import IDENTITY, LogitTransform

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
"""Where the tests put their tensors: the GPU when there is one (otherwise the kernels run under the
Triton interpreter on CPU)."""
BACKENDS = ["torch", "triton"]
"""The backends with a fused op, which every op test runs."""
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
"""The logits dtypes of a model's output layer."""
ALL_DTYPES = [*DTYPES, torch.float64]
"""Every logits dtype the Triton path accepts (fp64 logits are computed in float64)."""
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
"""Short name of each dtype (test ids, the GPU check's rows)."""
DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}
"""The dtype of each short name."""

# Values (logp, H, lse, statistics) are fp32 whatever the input (float64 for fp64 logits); the reference
# sees the same rounded inputs in float64.
VALUE_ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4, torch.float64: 1e-10}
"""Absolute tolerance of the values by logits dtype."""
VALUE_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5, torch.float64: 1e-10}
"""Relative tolerance of the values by logits dtype."""
# Gradients are written in the logits dtype: that dtype's rounding of values <= ~1.
GRAD_ATOL = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float64: 1e-12}
"""Absolute tolerance of the logits' gradient by logits dtype."""
GRAD_RTOL = {torch.float32: 1e-2, torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float64: 1e-8}
"""Relative tolerance of the logits' gradient by logits dtype."""
NO_LABELS_GRAD_FACTOR = 4
"""Without labels the entropy gradient p·(log p + H) exceeds 1 in magnitude: this many times
:data:`GRAD_ATOL`."""
# Matmul outputs scale with their largest entry: fp32 is exact up to its rounding; bf16 gradients carry the
# rounding of the chunk logit gradient (bf16, as in the logits-level op) and of the result; fp16 keeps
# bf16's bound (its rounding is finer).
LINEAR_GRAD_REL = {torch.float32: 2e-6, torch.bfloat16: 1.2e-2, torch.float16: 1.2e-2, torch.float64: 1e-12}
"""Memory mode: the parameter gradients' tolerance relative to the largest entry of the reference."""
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-24, torch.float16: 2.0**-24,
                 torch.float64: 2.0**-53}
"""Unit roundoff of the memory mode's matmul accumulation by dtype (fp32 for the half dtypes): a K-term
sum may be off by up to ``K·u·(|A|·|B|)`` elementwise, in any summation order."""


class Tolerances(NamedTuple):
    """The tolerances of one logits dtype.

    Attributes:
        value_atol: absolute tolerance of the values.
        value_rtol: relative tolerance of the values.
        grad_atol: absolute tolerance of the logits' gradient.
        grad_rtol: relative tolerance of the logits' gradient.
        linear_grad_rel: memory-mode parameter gradients, relative to the largest reference entry.
        unit_roundoff: unit roundoff of the memory mode's matmul accumulation.
    """

    value_atol: float
    value_rtol: float
    grad_atol: float
    grad_rtol: float
    linear_grad_rel: float
    unit_roundoff: float


def tolerances(dtype: torch.dtype | str) -> Tolerances:
    """The tolerances of logits of ``dtype``.

    Args:
        dtype: a torch dtype or its short name (``"fp32"``, ``"bf16"``, ``"fp16"``, ``"fp64"``).

    Returns:
        The :class:`Tolerances` of that dtype.

    Raises:
        ValueError: ``dtype`` is not one of the four.
    """
    key = DTYPES_BY_NAME.get(dtype) if isinstance(dtype, str) else dtype
    if key not in VALUE_ATOL:
        raise ValueError(f"tolerances: expected one of {list(DTYPES_BY_NAME)} or their torch dtypes, got {dtype!r}")
    return Tolerances(VALUE_ATOL[key], VALUE_RTOL[key], GRAD_ATOL[key], GRAD_RTOL[key], LINEAR_GRAD_REL[key],
                      UNIT_ROUNDOFF[key])


def transform_scales(logits: torch.Tensor, transform: LogitTransform) -> tuple[float, float]:
    """How much a logit transform widens the tolerances: fp32 values carry eps·|z| and gradients are
    multiplied by dz/dy.

    Args:
        logits: the logits y the transform is applied to (any float dtype; -inf allowed).
        transform: the logit transform.

    Returns:
        (value scale, gradient scale): max |z| / 10 and max |dz/dy|, each at least 1.
    """
    z = transform.apply(logits.detach().double())
    finite = z[torch.isfinite(z)]
    zmax = float(finite.abs().max()) if finite.numel() else 0.0
    slope = abs(transform.post * (transform.pre if transform.has_softcap else 1.0))
    return max(1.0, zmax / 10), max(1.0, slope)


def scaled_tolerances(dtype: torch.dtype | str, logits: torch.Tensor, transform: LogitTransform) -> Tolerances:
    """The tolerances of ``dtype`` widened for a logit transform (:func:`transform_scales`): the values'
    absolute tolerance times the value scale, the gradient's times both scales.

    Args:
        dtype: a torch dtype or its short name.
        logits: the logits y the transform is applied to.
        transform: the logit transform.

    Returns:
        The scaled :class:`Tolerances` (relative tolerances and the memory mode's unchanged).

    Raises:
        ValueError: ``dtype`` is not one of the four.
    """
    vscale, gscale = transform_scales(logits, transform)
    tol = tolerances(dtype)
    return tol._replace(value_atol=tol.value_atol * vscale, grad_atol=tol.grad_atol * vscale * gscale)


# ------------------------------------------------------------------------------------------ references


def _leaf64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double().requires_grad_(True)


def ref_token(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
              temperature: float = 1.0, transform: LogitTransform | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 per-token log-probs and entropies on the same (rounded) input values.

    Args:
        logits: [..., V] logits of any float dtype.
        labels: [...] int64 labels.
        ignore_index: the label of masked positions (they give 0).
        temperature: divisor of the logits (ignored when ``transform`` is given).
        transform: the logit transform.

    Returns:
        (x, logps, entropy): ``x`` is the float64 leaf the outputs are computed from (its ``.grad`` is the
        reference gradient after a backward); ``logps`` and ``entropy`` are float64 [...].
    """
    x = _leaf64(logits)
    logps, entropy = naive_token_logprobs(x, labels, ignore_index, temperature, torch.float64, transform)
    return x, logps, entropy


def ref_sequence(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                 temperature: float = 1.0, transform: LogitTransform | None = None
                 ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """float64 per-sequence log-probs (masked sum), entropies (masked mean) and token counts.

    Args:
        logits: [B, T, V] logits of any float dtype.
        labels: [B, T] int64 labels.
        ignore_index: the label of masked positions.
        temperature: divisor of the logits (ignored when ``transform`` is given).
        transform: the logit transform.

    Returns:
        (x, (logps, entropy, num_tokens)): the float64 leaf and the [B] outputs (float64, float64, int64).
    """
    x = _leaf64(logits)
    return x, naive_sequence_logprobs(x, labels, ignore_index, temperature, torch.float64, transform)


def ref_entropy(logits: torch.Tensor, temperature: float = 1.0, transform: LogitTransform | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 entropy and logsumexp of every row (the op without labels).

    Args:
        logits: [..., V] logits of any float dtype.
        temperature: divisor of the logits (ignored when ``transform`` is given).
        transform: the logit transform.

    Returns:
        (x, entropy, lse): the float64 leaf and the float64 [...] outputs.
    """
    x = _leaf64(logits)
    entropy, lse = naive_token_entropy(x, temperature, torch.float64, transform)
    return x, entropy, lse


def ref_stats(logits: torch.Tensor, labels: torch.Tensor | None, ignore_index: int = IGNORE_INDEX,
              transform: LogitTransform = IDENTITY) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """float64 per-token statistics of ``return_stats=True`` (not differentiable).

    Args:
        logits: [..., V] logits of any float dtype.
        labels: [...] int64 labels, or None (the op without labels).
        ignore_index: the label of masked positions (they give 0 / False).
        transform: the logit transform.

    Returns:
        (log_sum_sq_probs, mean_logits, is_top1): log Σp², the mean transformed logit (float64 [...]) and
        whether the label is the first argmax (bool [...]; None without labels).
    """
    _, _, log_sum_sq, mean, top1 = naive_token_stats(logits.detach(), labels, ignore_index, transform,
                                                     torch.float64)
    return log_sum_sq, mean, top1


class LinearReference(NamedTuple):
    """The float64 reference of the memory mode and the leaves its gradients reach.

    Attributes:
        hidden: float64 leaf of the hidden states.
        weight: float64 leaf of the output weight.
        bias: float64 leaf of the bias, or None.
        logits: the float64 logits the reference saw (their ``.grad`` is kept).
        outputs: (logps, entropy) per token, or (logps, entropy, num_tokens) per sequence.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    logits: torch.Tensor
    outputs: tuple[torch.Tensor, ...]


def ref_linear(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, *,
               sequence: bool, rounded_logits: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX,
               temperature: float = 1.0, transform: LogitTransform | None = None) -> LinearReference:
    """float64 memory mode on the logits the op sees. In a half dtype the matmul rounds the logits, so
    their float64 values are those rounded logits, while the gradient flows on to hidden, weight and
    bias in float64 (straight-through).

    Args:
        hidden: [B, T, H] hidden states.
        weight: [V, H] output weight.
        bias: [V] bias, or None.
        labels: [B, T] int64 labels.
        sequence: per-sequence outputs (else per token).
        rounded_logits: the logits as the op computes them; default ``F.linear(hidden, weight, bias)``
            in the inputs' dtype.
        ignore_index: the label of masked positions.
        temperature: divisor of the logits (ignored when ``transform`` is given).
        transform: the logit transform.

    Returns:
        The :class:`LinearReference`.
    """
    h, w = _leaf64(hidden), _leaf64(weight)
    b = None if bias is None else _leaf64(bias)
    exact = F.linear(h, w, b)
    if rounded_logits is None:
        rounded_logits = F.linear(hidden.detach(), weight.detach(), None if bias is None else bias.detach())
    logits = exact + (rounded_logits.detach().double() - exact).detach()
    logits.retain_grad()
    fn = naive_sequence_logprobs if sequence else naive_token_logprobs
    return LinearReference(h, w, b, logits, fn(logits, labels, ignore_index, temperature, torch.float64, transform))


# -------------------------------------------------------------------------------------------- inputs


def random_labels(shape: Sequence[int], vocab: int, mask_frac: float = 0.25, ignore_index: int = IGNORE_INDEX,
                  generator: torch.Generator | None = None, device: str = DEVICE) -> torch.Tensor:
    """Uniform labels in [0, vocab) with a random fraction masked.

    Args:
        shape: the labels' shape.
        vocab: labels are drawn from ``[0, vocab)``.
        mask_frac: probability that a position is masked.
        ignore_index: the label of masked positions.
        generator: a CPU generator (the draws do not depend on the device).
        device: where the labels go.

    Returns:
        int64 labels of ``shape``.
    """
    labels = torch.randint(0, vocab, tuple(shape), generator=generator).to(device)
    drop = torch.rand(tuple(shape), generator=generator).to(device) < mask_frac
    return labels.masked_fill(drop, ignore_index)


def sequence_labels(batch: int, seq: int, vocab: int, generator: torch.Generator, *, mask_frac: float = 0.25,
                    high: int | None = None, first_label: int = 0, mask_last_sequence: bool = False,
                    ignore_index: int = IGNORE_INDEX, device: str = DEVICE) -> torch.Tensor:
    """[B, T] labels of :func:`random_labels` whose first token is never masked (no all-masked batch) and,
    optionally, whose last sequence is all masked.

    Args:
        batch: B.
        seq: T.
        vocab: V.
        generator: a CPU generator.
        mask_frac: probability that a position is masked.
        high: labels are drawn from ``[0, high)`` (default V).
        first_label: the label of the first token.
        mask_last_sequence: mask every token of the last sequence.
        ignore_index: the label of masked positions.
        device: where the labels go.

    Returns:
        int64 [B, T] labels.
    """
    labels = random_labels((batch, seq), high or vocab, mask_frac, ignore_index, generator, "cpu")
    labels[0, 0] = first_label
    if mask_last_sequence:
        labels[-1] = ignore_index
    return labels.to(device)


def shifted_logits(batch: int, seq: int, vocab: int, dtype: torch.dtype, generator: torch.Generator, *,
                   scale: float = 2.0, device: str = DEVICE) -> torch.Tensor:
    """[B, T + 1, V] normal logits: the op is called on the shifted view ``[:, :-1]`` (no copy, the row
    stride jumps at sequence boundaries), as a causal model's loss does.

    Args:
        batch: B.
        seq: T.
        vocab: V.
        dtype: the logits dtype (drawn in fp32, then rounded).
        generator: a CPU generator.
        scale: standard deviation.
        device: where the logits go.

    Returns:
        The [B, T + 1, V] logits (a leaf).
    """
    return (torch.randn(batch, seq + 1, vocab, generator=generator) * scale).to(device, dtype)


def linear_inputs(batch: int, seq: int, dim: int, vocab: int, dtype: torch.dtype, generator: torch.Generator, *,
                  bias: bool = False, device: str = DEVICE
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Hidden states and an output layer whose logits have a standard deviation of about 2.

    Args:
        batch: B.
        seq: T.
        dim: H.
        vocab: V.
        dtype: the dtype of all three.
        generator: a CPU generator.
        bias: draw a bias too.
        device: where they go.

    Returns:
        (hidden [B, T, H], weight [V, H], bias [V] or None).
    """
    hidden = torch.randn(batch, seq, dim, generator=generator).to(device, dtype)
    weight = (torch.randn(vocab, dim, generator=generator) * 2 * dim**-0.5).to(device, dtype)
    b = (torch.randn(vocab, generator=generator) * 0.5).to(device, dtype) if bias else None
    return hidden, weight, b


def random_grads(shape: Sequence[int], generator: torch.Generator, device: str = DEVICE
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two fp32 upstream gradients, one for each output of the op.

    Args:
        shape: the outputs' shape.
        generator: a CPU generator.
        device: where they go.

    Returns:
        (g, h).
    """
    return (torch.randn(tuple(shape), generator=generator).to(device),
            torch.randn(tuple(shape), generator=generator).to(device))


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor full of NaN: any element a kernel forgets to write shows up in the comparison.

    Args:
        t: the tensor whose shape, dtype and device to take.

    Returns:
        The NaN tensor.
    """
    return torch.full_like(t, float("nan"))
