"""A tiny causal transformer LM, built from a config, that trains many copies at once.

Every parameter carries a leading ensemble dimension E, and every matrix product is a batched product
over it, so E policies (one per method and β) train in one forward and one backward: each copy's
parameters receive gradient from its own loss only, and Adam is per coordinate, so the copies are
independent runs that share the data order. Pre-norm (RMS) blocks, causal multi-head attention, GELU
MLP, learned positions, untied output head; right padding needs no mask (padding comes after every
real token and its labels are −100).

Log-probs and entropies go through the library's op (``mpf.sequence_logprobs``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import mallowspo_fast as mpf


@dataclass(frozen=True)
class TinyLMConfig:
    vocab_size: int
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 128
    max_len: int = 16

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"TinyLMConfig: d_model ({self.d_model}) must be a multiple of n_heads "
                             f"({self.n_heads})")


def init_params(cfg: TinyLMConfig, seed: int) -> dict[str, torch.Tensor]:
    """One model (E = 1): N(0, 0.02²) weights, residual projections scaled by 1/√(2·layers), unit norms."""
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(1, *shape, generator=gen) * std

    d, resid = cfg.d_model, 0.02 / math.sqrt(2 * cfg.n_layers)
    p = {"tok": normal(cfg.vocab_size, d), "pos": normal(cfg.max_len, d), "norm_f": torch.ones(1, d),
         "head": normal(d, cfg.vocab_size)}
    for i in range(cfg.n_layers):
        p |= {f"norm1_{i}": torch.ones(1, d), f"qkv_{i}": normal(d, 3 * d), f"out_{i}": normal(d, d, std=resid),
              f"norm2_{i}": torch.ones(1, d), f"up_{i}": normal(d, cfg.d_ff), f"down_{i}": normal(cfg.d_ff, d,
                                                                                              std=resid)}
    return p


def replicate(params: dict[str, torch.Tensor], copies: int) -> dict[str, torch.Tensor]:
    """E = ``copies`` independent, trainable copies of a one-model parameter set."""
    return {k: v.detach().expand(copies, *v.shape[1:]).clone().requires_grad_(True) for k, v in params.items()}


def _rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight[:, None, None, :]


def _bmm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [E, B, T, a] @ w [E, a, b] -> [E, B, T, b] as one batched matrix product."""
    e, b, t, _ = x.shape
    return torch.bmm(x.reshape(e, b * t, -1), w).view(e, b, t, -1)


def forward(params: dict[str, torch.Tensor], cfg: TinyLMConfig, ids: torch.Tensor,
            positions: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [E, B, T, V] of ids [B, T] (every copy reads the same sequences), or only at ``positions``
    [B, R] (logits [E, B, R, V]: the output head is a third of the model's work, and only the response
    positions are read)."""
    if ids.dim() != 2 or ids.shape[1] > cfg.max_len:
        raise ValueError(f"forward: expected ids [B, T] with T <= {cfg.max_len}, got {tuple(ids.shape)}")
    e = params["tok"].shape[0]
    bsz, t = ids.shape
    h, dh = cfg.n_heads, cfg.d_model // cfg.n_heads
    x = params["tok"][:, ids] + params["pos"][:, None, :t]
    causal = torch.full((t, t), -math.inf, dtype=x.dtype).triu(1).expand(e * bsz * h, t, t)
    for i in range(cfg.n_layers):
        qkv = _bmm(_rms(x, params[f"norm1_{i}"]), params[f"qkv_{i}"])
        q, k, v = qkv.view(e * bsz, t, 3, h, dh).permute(2, 0, 3, 1, 4).reshape(3, e * bsz * h, t, dh)
        # Sequences are a dozen tokens: plain batched products beat the fused attention kernel here.
        scores = torch.baddbmm(causal, q, k.transpose(1, 2), alpha=1.0 / math.sqrt(dh))
        att = torch.bmm(torch.softmax(scores, -1), v).view(e, bsz, h, t, dh)
        x = x + _bmm(att.transpose(2, 3).reshape(e, bsz, t, cfg.d_model), params[f"out_{i}"])
        x = x + _bmm(F.gelu(_bmm(_rms(x, params[f"norm2_{i}"]), params[f"up_{i}"])), params[f"down_{i}"])
    if positions is not None:
        x = x.gather(2, positions[None, :, :, None].expand(e, -1, -1, cfg.d_model))
    return _bmm(_rms(x, params["norm_f"]), params["head"])


def response_window(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logit positions [B, R] that predict the response tokens (R = the longest response; shorter
    rows repeat their last position) and the labels there [B, R] (−100 on the repeats)."""
    on = labels != -100
    count = on.sum(1)
    start = on.int().argmax(1)
    r = torch.arange(int(count.max()))
    inside = r[None, :] < count[:, None]
    positions = start[:, None] + torch.minimum(r[None, :], (count - 1).clamp(min=0)[:, None])
    return positions, torch.where(inside, labels.gather(1, positions), torch.full_like(positions, -100))


def sequence_stats(params: dict[str, torch.Tensor], cfg: TinyLMConfig, ids: torch.Tensor,
                   labels: torch.Tensor) -> mpf.SequenceLogprobs:
    """Per copy and sequence: summed response log-prob, mean response-token entropy, token count, each
    [E, B] (labels [B, T − 1] aligned with logits[:, :-1], −100 off the response)."""
    positions, window_labels = response_window(labels)
    logits = forward(params, cfg, ids, positions)
    e, b = logits.shape[:2]
    out = mpf.sequence_logprobs(logits.reshape(e * b, *logits.shape[2:]), window_labels.repeat(e, 1))
    return mpf.SequenceLogprobs(out.logps.view(e, b), out.entropy.view(e, b), out.num_tokens.view(e, b))


@torch.no_grad()
def evaluate_sequences(params: dict[str, torch.Tensor], cfg: TinyLMConfig, ids: np.ndarray, labels: np.ndarray,
                       chunk: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """(log-prob, mean entropy) float64 [E, N] of N sequences, in chunks of rows."""
    logps, ents = [], []
    for s in range(0, len(ids), chunk):
        out = sequence_stats(params, cfg, torch.as_tensor(ids[s:s + chunk]), torch.as_tensor(labels[s:s + chunk]))
        logps.append(out.logps.double())
        ents.append(out.entropy.double())
    return torch.cat(logps, 1).numpy(), torch.cat(ents, 1).numpy()


def train_sft(cfg: TinyLMConfig, ids: np.ndarray, labels: np.ndarray, *, steps: int, batch: int, lr: float,
              seed: int) -> dict[str, torch.Tensor]:
    """One model trained by next-token cross-entropy on the response tokens (shuffled epochs, Adam with a
    linear warm-up over the first 5% of steps and a cosine decay); returns its parameters (E = 1)."""
    params = replicate(init_params(cfg, seed), 1)
    opt = torch.optim.Adam(params.values(), lr=lr)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = np.random.default_rng(seed)
    order = np.empty(0, dtype=np.int64)
    ids_t, labels_t = torch.as_tensor(ids), torch.as_tensor(labels)
    for _ in range(steps):
        if order.size < batch:
            order = np.concatenate([order, rng.permutation(len(ids))])
        idx, order = torch.as_tensor(order[:batch]), order[batch:]
        out = sequence_stats(params, cfg, ids_t[idx], labels_t[idx])
        loss = -out.logps.sum() / out.num_tokens.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return {k: v.detach() for k, v in params.items()}
