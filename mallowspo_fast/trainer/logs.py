"""Metrics on rank 0: tqdm progress bar, a JSONL file, TensorBoard when installed, PNG curves.

Per-step metrics stay on the device as 0-dim tensors and are summed there; the only host syncs are at
logging steps, where the window is averaged over its steps and over ranks in one all-reduce.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import resource
import time
from pathlib import Path
from typing import Any

import torch

from .launch import DistState
from .step import kto_means

logger = logging.getLogger("mallowspo_fast.trainer")
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "training_curves.png"


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _all_reduce_sum(t: torch.Tensor, state: DistState) -> torch.Tensor:
    if state.world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def is_additive(key: str) -> bool:
    """A metric summed (not averaged) over a logging window and the ranks: TRL's KTO sums and counts."""
    return key.endswith("_sum") or key.startswith("count/")


def _read_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash
    return out


class MetricLogger:
    """Window accumulation, cross-rank averaging and the sinks (rank 0 writes).

    ``log_dir``: where ``metrics.jsonl`` (and TensorBoard's events) go; ``report_to`` and ``progress_bar``:
    the config's ``report_to`` and ``not disable_tqdm``."""

    def __init__(self, state: DistState, total_steps: int, start_step: int, *, log_dir: str, report_to: str,
                 progress_bar: bool, resumed: bool, num_tokens: int = 0, desc: str = "training") -> None:
        self.state = state
        self.dir = Path(log_dir)
        self.path = self.dir / METRICS_FILE
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.tokens: torch.Tensor | None = None
        self.num_tokens = num_tokens
        self.window_start = time.perf_counter()
        self.bar = self.tb = None
        self.last: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}
        if not state.is_main:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        # A resumed run keeps the records up to its step; a fresh run starts over (keeping the records of
        # the SFT warm-up that produced its starting point).
        kept = [r for r in _read_records(self.path)
                if r.get("phase") == "sft" or (resumed and r.get("step", 0) <= start_step)]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        if report_to in ("all", "tensorboard") and importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(self.dir))
        if progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True)

    # --- per step (no host sync) ------------------------------------------------------------------
    def accumulate(self, metrics: dict[str, torch.Tensor], tokens: torch.Tensor) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
        t = tokens.detach().to(torch.float64)
        self.tokens = t if self.tokens is None else self.tokens + t
        self.count += 1

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    # --- logging steps (host sync) --------------------------------------------------------------------
    def log_train(self, step: int, epoch: float, extras: dict[str, float]) -> dict[str, float]:
        """Average the window over steps and ranks and write it. Every rank must call this."""
        keys = sorted(self.sums)
        # a window whose updates were all skipped (on_nonfinite=skip) has no metrics: the same on every rank
        tokens = self.tokens if self.tokens is not None else torch.zeros((), dtype=torch.float64,
                                                                          device=self.state.device)
        vec = torch.stack([self.sums[k].float() for k in keys] + [tokens.float()])
        vec = _all_reduce_sum(vec, self.state)
        # Sums and counts (KTO's *_sum, count/*) are totals over the window and ranks, the rest are means.
        steps = max(1, self.count) * self.state.world_size
        values = [float(v) if is_additive(k) else float(v) / steps for k, v in zip(keys, vec[:-1].tolist())]
        window_tokens = float(vec[-1])
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        self.num_tokens += int(window_tokens)
        metrics = dict(zip(keys, values))
        record = {"step": step, "epoch": round(epoch, 4), **metrics, **kto_means(metrics), **extras,
                  "num_tokens": self.num_tokens, "tokens_per_second": window_tokens / elapsed}
        self.sums, self.count, self.tokens = {}, 0, None
        self.window_start = time.perf_counter()
        self.last = record
        self._write(record)
        if self.bar is not None:
            post = {"loss": f"{record.get('loss', record.get('sft_loss', float('nan'))):.4f}"}
            if "rewards/accuracies" in record:
                post["acc"] = f"{record['rewards/accuracies']:.2f}"
            self.bar.set_postfix(post)
        return record

    def log_eval(self, step: int, epoch: float, metrics: dict[str, float]) -> dict[str, float]:
        record = {"step": step, "epoch": round(epoch, 4), **{f"eval_{k}": v for k, v in metrics.items()}}
        self.last_eval = record
        self._write(record)
        if self.bar is not None:
            self.bar.write(f"eval @ step {step}: loss {metrics['loss']:.4f}, "
                           f"reward accuracy {metrics.get('rewards/accuracies', float('nan')):.3f}")
        return record

    def log_event(self, record: dict[str, Any]) -> None:
        self._write(record)

    @staticmethod
    def start_sft_log(log_dir: str, state: DistState) -> None:
        """A fresh metrics file for a run that starts with an SFT warm-up."""
        if state.is_main:
            path = Path(log_dir) / METRICS_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("", encoding="utf-8")

    def _write(self, record: dict[str, Any]) -> None:
        if not self.state.is_main:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k if k.startswith(("eval_", "sft_")) else f"train/{k}", v, record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def plot_curves(metrics_path: str | Path, png_path: str | Path) -> Path | None:
    """Training (and eval) curves from a metrics.jsonl file; None when matplotlib is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        logger.warning("matplotlib is not installed: no %s", png_path)
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = _read_records(Path(metrics_path))
    panels = [("loss", "loss"), ("rewards/accuracies", "reward accuracy"), ("rewards/margins", "reward margin"),
              ("dispersion/neg_log_mean", "neg-log dispersion c(x)"), ("learning_rate", "learning rate"),
              ("sft_loss", "SFT warm-up loss")]
    panels = [(k, t) for k, t in panels if any(r.get(k) is not None or r.get(f"eval_{k}") is not None
                                              for r in records)]
    if not panels:
        return None
    cols = 3 if len(panels) > 4 else 2
    rows_ = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(5 * cols, 3.4 * rows_), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        for prefix, style in (("", "-"), ("eval_", "o--")):
            pts = [(r.get("sft_step", r["step"]), r[prefix + key]) for r in records
                   if r.get(prefix + key) is not None]
            if pts:
                ax.plot(*zip(*pts), style, label="eval" if prefix else "train", markersize=4)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return Path(png_path)
