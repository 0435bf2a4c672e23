"""Model-level memory mode: run a causal LM's backbone and go from its last hidden states straight to
per-sequence log-probs, with the output layer applied chunk by chunk (:mod:`.linear`).

Why a module and not just a function: under DeepSpeed ZeRO-3 every parameter is sharded and is only
gathered around the ``forward`` of the module that owns it (and again before that module's backward).
The output-layer weight is used here outside ``lm_head.forward``, so :class:`LMHeadLogprobs` replaces
the model's output layer *as the owner of the same Parameter objects*: DeepSpeed's hooks then gather
the weight around ``head(hidden, labels)`` and again for its backward, exactly as they do for an
ordinary ``nn.Linear`` head. Tied embeddings stay tied (the head holds the embedding Parameter
itself) and the state-dict keys do not change (``lm_head.weight`` ...). Called without labels the head
returns logits like the ``nn.Linear`` it replaced, so generation and the normal forward still work.

Install the head before ``deepspeed.initialize`` (the hooks are registered there), then call the model
through a module that the engine runs (:class:`CausalLMLogprobs`), so the backbone and the head both
run inside ``engine(...)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .linear import linear_sequence_logprobs, linear_token_logprobs
from .logprobs import SequenceLogprobs, TokenLogprobs, sequence_logprobs, token_logprobs
from .transform import LogitTransform

LOGITS_MODES = ("chunked", "logits")
REDUCTIONS = ("sequence", "token")


# Config attributes of output layers that multiply the logits after the matmul, in the order a config is read
# (the first one set wins, as in TRL's fused head): Cohere's logit_scale, Muse's output_multiplier,
# Falcon-H1's lm_head_multiplier, and Granite's / MiniCPM3's logits_scaling, a divisor (HyperCLOVA X multiplies).
_SCALE_ATTRS = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
_SOFTCAP_ATTR = "final_logit_softcapping"


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def head_transform(model: nn.Module) -> LogitTransform:
    """What ``model``'s output layer does to its logits after the matmul, as a :class:`LogitTransform`
    (temperature 1): the soft cap of ``final_logit_softcapping`` and the scale of ``logit_scale``,
    ``output_multiplier``, ``lm_head_multiplier`` or ``logits_scaling``. The one place the library reads
    these attributes: the trainer's chunked mode and the TRL head apply what it returns.

    Raises:
        ValueError: naming the attribute, when one holds a value the op cannot apply (not a finite
            number, a non-positive soft cap, a zero scale) or two scale attributes disagree.

    Examples:
        >>> head_transform(gemma2_model)
        LogitTransform(temperature=1.0, softcap=30.0, logit_scale=1.0)
    """
    config = _text_config(model)
    where = f"{type(model).__name__}'s config"
    softcap = getattr(config, _SOFTCAP_ATTR, None)
    scales = {}
    for attr in _SCALE_ATTRS:
        value = getattr(config, attr, None)
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"{where} sets {attr}={value!r}; expected a number (the output layer's logit scale)")
        if attr == "logits_scaling" and getattr(config, "model_type", None) != "hyperclovax":
            value = 1.0 / value if value != 0 else float("inf")  # Granite and MiniCPM3 divide by it
        scales[attr] = float(value)
    distinct = {v for v in scales.values() if v != 1.0}
    if len(distinct) > 1:
        raise ValueError(f"{where} sets several logit scales that disagree ({scales}); the op applies one")
    scale = distinct.pop() if distinct else 1.0
    name = next((a for a, v in scales.items() if v == scale), "logit_scale")
    try:
        return LogitTransform.checked(1.0, None if softcap is None else softcap, scale, where)
    except ValueError as e:
        attr = _SOFTCAP_ATTR if "softcap" in str(e) else name
        raise ValueError(f"{where} sets {attr}={getattr(config, attr, None)!r}, which the op cannot apply: {e}") from e


class LMHeadLogprobs(nn.Module):
    """Output layer that returns logits (``head(hidden)``) or, given labels, log-probs and entropies
    computed chunk by chunk without the logits (``head(hidden, labels)``).

    Args:
        weight: the output-layer weight [V, H] (the embedding matrix with tied embeddings): the
            Parameter itself is registered here, not a copy.
        bias: optional output-layer bias [V].
        chunk_size: default token rows per chunk passed to :func:`linear_sequence_logprobs`.
        backend: default backend passed to it (None: triton on CUDA, torch elsewhere).
        transform: what the model's output layer does to the logits (:func:`head_transform`); applied
            in both calls (the logits of ``head(hidden)`` include it, as the model's own forward does).

    Called as ``head(hidden)`` it returns the logits [..., V] like the ``nn.Linear`` it replaces
    (generation keeps working); as ``head(hidden, labels)`` (hidden [B, T, H], labels [B, T] already
    aligned) it returns ``SequenceLogprobs`` [B] without the logits.

    Examples:
        >>> head = install_lm_head_logprobs(model)          # model.lm_head is now this module
        >>> seq = head(hidden[:, :-1], labels[:, 1:])
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None = None, *, chunk_size: int | None = None,
                 backend: str | None = None, transform: LogitTransform | None = None) -> None:
        super().__init__()
        self.transform = transform or LogitTransform()
        self.weight = weight
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = bias
        self.chunk_size = chunk_size
        self.backend = backend

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        ignore_index: int = -100,
        temperature: float = 1.0,
        reduction: str = "sequence",
        chunk_size: int | None = None,
        backend: str | None = None,
        return_logits_mean: bool = False,
    ) -> torch.Tensor | SequenceLogprobs | TokenLogprobs | tuple:
        """``labels`` None: logits ``hidden @ weight.T + bias``. Otherwise ``hidden`` [B, T, H] and
        ``labels`` [B, T] already aligned (the caller shifts) -> SequenceLogprobs (``reduction="sequence"``)
        or TokenLogprobs (``reduction="token"``); ``chunk_size``/``backend`` None use the module's.
        ``return_logits_mean``: also return the detached mean logit (over V, then over the unmasked
        positions) of every row [B], as ``(result, means)``, from the same pass over the logits."""
        if labels is None:
            return self.transform.apply(F.linear(hidden, self.weight, self.bias))
        tf = self.transform
        kw = dict(bias=self.bias, ignore_index=ignore_index, temperature=temperature, softcap=tf.softcap,
                  logit_scale=tf.logit_scale, chunk_size=self.chunk_size if chunk_size is None else chunk_size,
                  backend=self.backend if backend is None else backend)
        if reduction not in REDUCTIONS:
            raise ValueError(f"LMHeadLogprobs: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if not return_logits_mean:
            fn = linear_sequence_logprobs if reduction == "sequence" else linear_token_logprobs
            return fn(hidden, self.weight, labels, **kw)
        # The mean logit comes from the same pass (return_stats): it is a mean of the transformed logits.
        stats = linear_token_logprobs(hidden, self.weight, labels, return_stats=True, **kw)
        return _reduce(TokenLogprobs(stats.logps, stats.entropy), labels, ignore_index, reduction), \
            masked_row_mean(stats.mean_logits.detach(), labels, ignore_index)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _reduce(tok: TokenLogprobs, labels: torch.Tensor, ignore_index: int, reduction: str):
    """TokenLogprobs [B, T] -> itself (``reduction="token"``) or SequenceLogprobs [B]."""
    if reduction == "token":
        return tok
    num_tokens = (labels != ignore_index).sum(-1)
    denom = num_tokens.clamp(min=1).to(tok.entropy.dtype)
    return SequenceLogprobs(tok.logps.sum(-1), tok.entropy.sum(-1) / denom, num_tokens)


def masked_row_mean(values: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean of ``values`` [B, T] over the positions where ``labels`` [B, T] != ignore_index -> [B]
    (0 for rows without any)."""
    mask = (labels != ignore_index).to(torch.float32)
    return (values.float() * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def param_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The shape of a parameter, also when ZeRO-3 has partitioned it (``ds_shape``)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def install_lm_head_logprobs(model: nn.Module, *, chunk_size: int | None = None,
                             backend: str | None = None) -> LMHeadLogprobs:
    """Replace ``model``'s output layer (``get_output_embeddings()``) by an :class:`LMHeadLogprobs`
    holding the same weight/bias Parameters. Idempotent; call it before ``deepspeed.initialize``.

    Tied embeddings stay tied and the state-dict keys do not change, so checkpoints and exports are
    those of the original model.

    Args:
        model: a Hugging Face causal LM (``get_output_embeddings()`` a linear layer).
        chunk_size: default token rows per chunk of the head.
        backend: default backend of the head.

    Returns:
        The installed head (the existing one when it is already installed).

    Raises:
        TypeError: the model's output layer is not a linear layer with a [V, H] weight.
        ValueError: the output layer transforms its logits in a way the op cannot apply
            (:func:`head_transform`).

    Examples:
        >>> head = install_lm_head_logprobs(model)
        >>> model.get_output_embeddings() is head
        True
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, LMHeadLogprobs):
        return head
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or len(param_shape(weight)) != 2:
        raise TypeError(
            f"install_lm_head_logprobs: expected a model whose get_output_embeddings() is a linear layer "
            f"with a [V, H] weight, got {type(head).__name__} on {type(model).__name__}"
        )
    new = LMHeadLogprobs(head.weight, getattr(head, "bias", None), chunk_size=chunk_size, backend=backend,
                         transform=head_transform(model))
    model.set_output_embeddings(new)
    return new


def _backbone(model: nn.Module) -> nn.Module:
    """The decoder stack producing the final (normed) hidden states: ``model.model`` for Llama-style
    models, else ``get_decoder()``."""
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module):
        return inner
    if hasattr(model, "get_decoder"):
        return model.get_decoder()
    raise TypeError(f"cannot find the backbone of {type(model).__name__}: expected .model or get_decoder()")


def model_sequence_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    logits_mode: str = "chunked",
    ignore_index: int = -100,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    backend: str | None = None,
    reduction: str = "sequence",
    return_logits_mean: bool = False,
    **model_kwargs,
) -> SequenceLogprobs | TokenLogprobs | tuple:
    """Log-probs of ``labels`` under a causal LM, by either path.

    Args:
        model: a Hugging Face causal LM (``LlamaForCausalLM`` and alike).
        input_ids: [B, T] int64 token ids.
        attention_mask: [B, T] 1 on tokens, 0 on padding (or None).
        labels: [B, T] aligned with ``input_ids`` (not shifted; -100 on prompt and padding): position
            t predicts ``labels[:, t + 1]``, the shift is done here.
        logits_mode: "chunked" (backbone + the output layer applied chunk by chunk: the [B, T, V]
            logits never exist) or "logits" (the model's forward, then :func:`sequence_logprobs`).
        ignore_index: label value of positions that do not count (default -100).
        temperature: divide the logits by this (> 0) before the softmax.
        chunk_size: chunked mode: unmasked token rows per chunk (None: the op's default).
        backend: "triton", "torch", "reference" or None (triton on CUDA, torch elsewhere).
        reduction: "sequence" -> SequenceLogprobs [B]; "token" -> TokenLogprobs [B, T - 1] (packed rows).
        return_logits_mean: also return the detached mean logit of every row over its unmasked
            positions, [B], as ``(result, means)`` (TRL's ``logits/chosen`` metric), in either mode.
        **model_kwargs: passed to the model/backbone (e.g. ``position_ids`` of packed rows).

    Returns:
        SequenceLogprobs(logps [B], entropy [B], num_tokens [B]) or TokenLogprobs(logps, entropy)
        [B, T - 1], fp32; with ``return_logits_mean`` a tuple ``(result, means [B])``.

    Raises:
        ValueError: an unknown ``logits_mode`` or ``reduction``, or what the op raises (labels out of
            range on CPU, bad temperature).
        TypeError: a model whose backbone cannot be found (no ``.model`` and no ``get_decoder()``).

    Examples:
        >>> seq = model_sequence_logprobs(model, input_ids, attention_mask, labels, logits_mode="chunked")
        >>> chosen_logps, rejected_logps = seq.logps.chunk(2)

    Under ZeRO-3 call :func:`install_lm_head_logprobs` before ``deepspeed.initialize`` and run this
    inside the engine's forward (:class:`CausalLMLogprobs`).
    """
    if logits_mode not in LOGITS_MODES:
        raise ValueError(f"logits_mode must be one of {LOGITS_MODES}, got {logits_mode!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    shifted = labels[:, 1:]
    kw = dict(ignore_index=ignore_index, temperature=temperature, backend=backend)
    if logits_mode == "logits":
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs).logits
        if not return_logits_mean:
            fn = sequence_logprobs if reduction == "sequence" else token_logprobs
            return fn(logits[:, :-1], shifted, **kw)
        stats = token_logprobs(logits[:, :-1], shifted, return_stats=True, **kw)
        return (_reduce(TokenLogprobs(stats.logps, stats.entropy), shifted, ignore_index, reduction),
                masked_row_mean(stats.mean_logits.detach(), shifted, ignore_index))
    out = _backbone(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    head = model.get_output_embeddings()
    if isinstance(head, LMHeadLogprobs):
        # Through the module call, so ZeRO-3's hooks gather the weight for forward and backward.
        return head(hidden[:, :-1], shifted, reduction=reduction, chunk_size=chunk_size,
                    return_logits_mean=return_logits_mean, **kw)
    # Not installed: the same computation on the output layer's Parameters (no ZeRO-3 hooks needed here).
    transient = LMHeadLogprobs(head.weight, getattr(head, "bias", None), transform=head_transform(model))
    return transient.forward(hidden[:, :-1], shifted, reduction=reduction, chunk_size=chunk_size,
                             return_logits_mean=return_logits_mean, **kw)


class CausalLMLogprobs(nn.Module):
    """The module to hand to ``deepspeed.initialize``: ``forward(input_ids, attention_mask, labels)``
    -> :func:`model_sequence_logprobs` of the wrapped causal LM, so that the backbone and the output
    layer both run inside ``engine(...)``. With ``logits_mode="chunked"`` the model's output layer is
    replaced by :class:`LMHeadLogprobs` (same Parameters, same state-dict keys under ``model.``).

    The wrapped model stays reachable as ``.model`` (e.g. for ``save_pretrained``).

    Args:
        model: a Hugging Face causal LM.
        logits_mode: "chunked" (memory mode) or "logits" (the model's forward, then the fused op).
        chunk_size: chunked mode: unmasked token rows per chunk (None: the op's default).
        backend: "triton", "torch", "reference" or None (triton on CUDA, torch elsewhere).

    Raises:
        ValueError: an unknown ``logits_mode``.
        TypeError: chunked mode on a model whose output layer is not a linear layer with a [V, H] weight.

    Examples:
        >>> module = CausalLMLogprobs(model, logits_mode="chunked")
        >>> engine, *_ = deepspeed.initialize(model=module, config=ds_config, model_parameters=params)
        >>> seq = engine(input_ids, attention_mask, labels)     # SequenceLogprobs [B]
    """

    def __init__(self, model: nn.Module, *, logits_mode: str = "chunked", chunk_size: int | None = None,
                 backend: str | None = None) -> None:
        super().__init__()
        if logits_mode not in LOGITS_MODES:
            raise ValueError(f"logits_mode must be one of {LOGITS_MODES}, got {logits_mode!r}")
        self.model = model
        self.logits_mode = logits_mode
        self.chunk_size = chunk_size
        self.backend = backend
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        # Read now: under ZeRO-3 the weight is a partitioned placeholder outside the head's forward.
        self.vocab_size = param_shape(head.weight)[0] if head is not None else model.config.vocab_size
        if logits_mode == "chunked":
            install_lm_head_logprobs(model, chunk_size=chunk_size, backend=backend)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, *, ignore_index: int = -100, temperature: float = 1.0,
                reduction: str = "sequence", return_logits_mean: bool = False,
                **model_kwargs) -> SequenceLogprobs | TokenLogprobs | tuple:
        if labels is None:
            raise ValueError("CausalLMLogprobs.forward: labels [B, T] (aligned with input_ids) are required")
        return model_sequence_logprobs(
            self.model, input_ids, attention_mask, labels, logits_mode=self.logits_mode,
            ignore_index=ignore_index, temperature=temperature, chunk_size=self.chunk_size,
            backend=self.backend, reduction=reduction, return_logits_mean=return_logits_mean, **model_kwargs,
        )
