"""Argument checks shared by the loss functions: say what was expected, what was found and where."""

from __future__ import annotations

import math

import torch


def batch_tensor(x: object, name: str, where: str, *, floating: bool = True) -> torch.Tensor:
    """A 1-D tensor [B]; floating point unless ``floating`` is False (token counts may be integers)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor of shape [B], got {type(x).__name__}")
    if x.dim() != 1:
        raise ValueError(f"{where}: {name} must have shape [B] (one value per example), got {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{where}: {name} must be a floating-point tensor, got {x.dtype}")
    if not floating and x.dtype == torch.bool:
        raise TypeError(f"{where}: {name} must hold counts (int or float), got {x.dtype}")
    return x


def same_batch(where: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every tensor in ``others`` has the shape and device of ``ref``."""
    for name, t in others.items():
        if t is None:
            continue
        if t.shape != ref.shape:
            raise ValueError(
                f"{where}: {name} has shape {tuple(t.shape)} but {ref_name} has shape {tuple(ref.shape)}; "
                "all per-example tensors must be [B] with the same B"
            )
        if t.device != ref.device:
            raise ValueError(f"{where}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def real_number(x: object, name: str, where: str, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number (not a bool) inside the given bounds."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise TypeError(f"{where}: {name} must be a finite real number, got {x!r}")
    x = float(x)
    too_low = low is not None and (x <= low if low_open else x < low)
    too_high = high is not None and (x >= high if high_open else x > high)
    if too_low or too_high:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ValueError(f"{where}: {name} must lie in {interval}, got {x}")
    return x


def per_example_or_scalar(x: object, name: str, where: str, ref: torch.Tensor) -> torch.Tensor:
    """A tensor [B] matching ``ref`` or a scalar (0-dim tensor or number), returned in ref's dtype."""
    if isinstance(x, bool):
        raise TypeError(f"{where}: {name} must be a tensor [B] or a number, got a bool")
    if isinstance(x, (int, float)):
        return torch.full_like(ref, float(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a tensor [B] or a number, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{where}: {name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0:
        return x.to(ref.dtype).expand_as(ref)
    if x.shape != ref.shape:
        raise ValueError(f"{where}: {name} must have shape {tuple(ref.shape)} (or be a scalar), got {tuple(x.shape)}")
    if x.device != ref.device:
        raise ValueError(f"{where}: {name} is on {x.device} but the log-probs are on {ref.device}")
    return x.to(ref.dtype)


def non_empty(x: torch.Tensor, name: str, where: str, *, unit: str = "pair") -> None:
    """At least one example: the mean over an empty batch would be a silent NaN."""
    if x.numel() == 0:
        raise ValueError(
            f"{where}: {name} is empty (shape {tuple(x.shape)}); expected at least one {unit} (B >= 1), "
            "the mean loss over an empty batch is undefined"
        )
