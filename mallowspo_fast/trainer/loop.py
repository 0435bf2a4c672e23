"""The training recipe: data, optional SFT warm-up, reference pass, the loop, checkpoints, export.

One readable loop. Per optimizer step and per micro-batch: collate (chosen rows then rejected rows; for
KTO, completion rows then the mismatched KL rows) -> one forward over the 2B rows -> fused log-prob /
entropy op -> loss -> ``engine.backward`` (DeepSpeed divides by the accumulation steps) -> ``engine.step``
(a real update only at the accumulation boundary).
The host reads values only at logging, eval and save steps.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import batches, checkpoint
from .config import TrainConfig
from .export import export_hf
from .faults import NonFiniteError, fault_point
from .guard import NonFiniteGuard
from .launch import DistState, any_rank, barrier, init_distributed, max_over_ranks
from .logs import CURVES_FILE, MetricLogger, peak_memory_mb, plot_curves
from .model import build_model, inference_engine, policy_engine
from .reference import LiveReference, ReferenceTable, cache_key, load_or_compute, model_identity
from .step import (
    chosen_rows,
    forward_logprobs,
    kto_batch_loss,
    kto_metrics_from_examples,
    metrics_from_examples,
    preference_batch_loss,
    sft_batch_loss,
    to_device,
)

logger = logging.getLogger("mallowspo_fast.trainer")


@dataclass
class TrainResult:
    """What a run produced (returned on every rank; paths are shared).

    Attributes:
        output_dir: the run's output directory.
        step: optimizer steps done.
        total_steps: optimizer steps planned.
        model_dir: the exported Hugging Face model (None when ``export_model`` is off).
        checkpoint_dir: the last checkpoint written, if any.
        metrics_path: the ``metrics.jsonl`` log.
        curves_path: the ``training_curves.png`` plot, if written.
        phi_star: the φ* used (resolved when ``phi_star: auto``).
        stopped_by: the signal that stopped the run early (``"SIGTERM"``, ...), else None.
        seconds: wall time of the run.
        train_metrics: metrics of the last logging window.
        eval_metrics: metrics of the last evaluation (``eval_`` keys).
        history: training loss at each logging step.
        eval_examples: pairs (KTO: rows) in the evaluation split, None without one.
    """

    output_dir: str
    step: int
    total_steps: int
    model_dir: str | None = None
    checkpoint_dir: str | None = None
    metrics_path: str | None = None
    curves_path: str | None = None
    phi_star: float | None = None
    stopped_by: str | None = None
    seconds: float = 0.0
    train_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    history: list[float] = field(default_factory=list)  # training loss at each logging step
    eval_examples: int | None = None


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _grad_norm(engine: Any) -> float | None:
    value = engine.get_global_grad_norm()
    return None if value is None else float(value)


def metric_logger(cfg: TrainConfig, state: DistState, total_steps: int, start_step: int, **kwargs: Any) -> MetricLogger:
    """The :class:`MetricLogger` of ``cfg``'s sinks (logging dir, report_to, progress bar)."""
    return MetricLogger(state, total_steps, start_step, log_dir=cfg.resolved_logging_dir(), report_to=cfg.report_to,
                        progress_bar=not cfg.disable_tqdm, **kwargs)


def nonfinite_guard(cfg: TrainConfig, state: DistState, engine: Any, *, kept: str, step_name: str = "optimizer step",
                    skipped: int = 0) -> NonFiniteGuard:
    """The ``on_nonfinite`` policy of ``cfg`` over ``engine`` (see :class:`NonFiniteGuard`)."""
    return NonFiniteGuard(state, engine, on_nonfinite=cfg.on_nonfinite, max_in_a_row=cfg.max_nonfinite_in_a_row,
                          zero_stage=cfg.zero_stage, bf16=cfg.bf16, kept=kept, step_name=step_name, skipped=skipped)


# ----------------------------------------------------------------------------------------------------
# SFT warm-up (a separate short phase whose exported model becomes policy and reference)
def sft_warmup(cfg: TrainConfig, state: DistState, tokenizer: Any, train_ds: Any, collator: Any,
               source: str | None) -> str:
    """Train on the chosen responses for ``sft_warmup_steps`` and export the result (the starting point of
    policy and reference); a rerun with the same settings reuses the export. Non-finite values get the main
    loop's ``on_nonfinite`` treatment; with ``stop`` nothing is exported."""
    out_dir = Path(cfg.output_dir) / "sft_warmup"
    ident = model_identity(source, cfg.model_config if source is None else None, cfg.seed)
    key = hashlib.sha256(json.dumps({
        "model": ident, "data": batches.dataset_fingerprint(train_ds), "steps": cfg.sft_warmup_steps,
        "lr": cfg.sft_learning_rate, "batch": [cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps,
                                               state.world_size], "seed": cfg.seed, "bf16": cfg.bf16,
        "warmup": [cfg.warmup_ratio, cfg.warmup_steps],
    }, sort_keys=True, default=str).encode()).hexdigest()[:20]
    key_file = out_dir / "sft_warmup_key.txt"
    if key_file.is_file() and key_file.read_text().strip() == key:
        logger.info("SFT warm-up: reusing %s", out_dir)
        return str(out_dir)
    MetricLogger.start_sft_log(cfg.resolved_logging_dir(), state)
    steps = cfg.sft_warmup_steps
    engine = policy_engine(cfg, state, build_model(cfg, source, tokenizer), steps,
                           learning_rate=cfg.sft_learning_rate, scheduler="cosine")
    order = batches.TrainOrder(len(train_ds), cfg.per_device_train_batch_size, state.world_size,
                               cfg.gradient_accumulation_steps, cfg.seed + 7919)
    log = metric_logger(cfg, state, steps, 0, resumed=True, desc="SFT warm-up")
    guard = nonfinite_guard(cfg, state, engine, step_name="SFT warm-up step",
                            kept=f"the warm-up was not exported (a rerun starts it over in {out_dir})")
    try:
        for step in range(steps):
            epoch, s = divmod(step, order.steps_per_epoch)
            pending = []  # the step's metrics, kept only if its update is applied
            for m in range(cfg.gradient_accumulation_steps):
                rows = batches.rows(train_ds, order.micro_batch(epoch, s, m, state.rank))
                batch = to_device(collator(rows), state.device)
                chosen = chosen_rows(batch)
                out = forward_logprobs(engine, chosen, backend=cfg.logprob_backend)
                loss = sft_batch_loss(out)
                engine.backward(guard.loss_for_backward(loss, chosen["index"], out.logps))
                if engine.is_gradient_accumulation_boundary():
                    guard.before_step(step + 1)
                engine.step()
                pending.append(({"sft_loss": loss.detach().float()}, batch["attention_mask"].sum()))
            if guard.after_step(step + 1):
                for metrics, tokens in pending:
                    log.accumulate(metrics, tokens)
            log.advance()
            if (step + 1) % cfg.logging_steps == 0 or step + 1 == steps:
                extras: dict[str, Any] = {"phase": "sft"}
                if cfg.on_nonfinite == "skip":
                    extras["nonfinite_skipped"] = guard.skipped
                log.log_train(step + 1, (step + 1) / order.steps_per_epoch, extras)
    except NonFiniteError:
        log.close()
        release_engines(engine)
        raise
    log.close()
    export_hf(engine, tokenizer, out_dir, state)
    if state.is_main:
        key_file.write_text(key + "\n")
    barrier(state)
    release_engines(engine)
    del engine
    return str(out_dir)


# ----------------------------------------------------------------------------------------------------
# reference
@dataclass
class Reference:
    train: ReferenceTable | None = None
    eval: ReferenceTable | None = None
    live: LiveReference | None = None
    phi_star: float | None = None

    def batch(self, batch: dict[str, torch.Tensor], split: str, device: torch.device) -> Any:
        if self.live is not None:
            return self.live(batch)
        table = self.train if split == "train" else self.eval
        return None if table is None else table.batch(batch["index"], device)


def setup_reference(cfg: TrainConfig, state: DistState, engine: Any, tokenizer: Any, train_ds: Any,
                    eval_ds: Any, collator: Any, source: str | None) -> Reference:
    """Precompute (cached) or build the live reference; resolve phi_star. Runs before any policy update,
    so with no ref_model_name_or_path the policy engine itself is the reference for the pass. The pass runs
    the split's own collator, so a KTO table holds each row's completion and KL completion; training and
    evaluation read either table by the rows' ``index``."""
    if not cfg.needs_reference:
        return Reference()
    ref_source = cfg.ref_model_name_or_path or source
    ident = model_identity(ref_source, cfg.model_config if ref_source is None else None, cfg.seed)
    separate: list[Any] = []

    def ref_model() -> Any:
        if cfg.precompute_ref_log_probs and cfg.ref_model_name_or_path is None:
            return engine
        if not separate:
            separate.append(inference_engine(cfg, state, build_model(cfg, ref_source, tokenizer)))
        return separate[0]

    ref = Reference()
    wants_table = cfg.precompute_ref_log_probs or cfg.phi_star == "auto"

    def table(ds: Any, split: str) -> ReferenceTable:
        key = reference_cache_key(cfg, ident, batches.dataset_fingerprint(ds), split)
        return load_or_compute(ref_model, ds, collator, state, key, f"reference ({split})",
                               cache_dir=cfg.resolved_ref_cache_dir(), batch_size=cfg.per_device_eval_batch_size,
                               backend=cfg.logprob_backend, progress_bar=not cfg.disable_tqdm)

    if wants_table:
        ref.train = table(train_ds, "train")
    if cfg.precompute_ref_log_probs and eval_ds is not None:
        ref.eval = table(eval_ds, "eval")
    if cfg.phi_star == "auto":
        ref.phi_star = ref.train.auto_phi_star()
        logger.info("phi_star=auto resolved to %.6f over %d training pairs", ref.phi_star, len(train_ds))
    else:
        ref.phi_star = float(cfg.phi_star)
    if not cfg.precompute_ref_log_probs:
        ref.live = LiveReference(ref_model(), cfg.logprob_backend)
        ref.train = None  # only computed for phi_star
    elif separate:
        separate.clear()  # the reference engine is not needed during training
        gc.collect()
    return ref


def reference_cache_key(cfg: TrainConfig, identity: dict, data_fingerprint: str, split: str) -> str:
    """The cache key of a split's reference values under ``cfg`` (:func:`reference.cache_key`)."""
    return cache_key(identity, data_fingerprint, split, bf16=cfg.bf16, max_length=cfg.max_length,
                     max_prompt_length=cfg.max_prompt_length, truncation_mode=cfg.truncation_mode,
                     kl_pairing_seed=cfg.kl_pairing_seed if cfg.is_kto else None)


# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(cfg: TrainConfig, state: DistState, engine: Any, eval_ds: Any, collator: Any, ref: Reference) -> dict:
    """Exact metrics over the whole eval split (sharded, padded shards masked out)."""
    engine.eval()
    sh = batches.shard(len(eval_ds), cfg.per_device_eval_batch_size, state)
    local: dict[str, list[torch.Tensor]] = defaultdict(list)
    for indices in sh.batches:
        batch = to_device(collator(batches.rows(eval_ds, indices)), state.device)
        out = forward_logprobs(engine, batch, backend=cfg.logprob_backend, logits_mean=True)
        res = batch_loss(cfg, out, ref.batch(batch, "eval", state.device), batch, ref.phi_star, world_size=1)
        for k, v in res.per_example.items():
            local[k].append(v.float())
    engine.train()
    full = batches.gather_examples(local, sh, state)
    metrics = kto_metrics_from_examples(full, cfg.loss_kwargs()) if cfg.is_kto else metrics_from_examples(full)
    return {k: float(v) for k, v in metrics.items()}


def batch_loss(cfg: TrainConfig, out: Any, ref_batch: Any, batch: dict[str, torch.Tensor], phi_star: float | None,
               world_size: int) -> Any:
    """The loss of one micro-batch: KTO (z0 averaged over ``world_size`` ranks) or a paired loss. Evaluation
    passes ``world_size=1``: its KTO z0 is re-estimated over the whole split from the gathered values."""
    if cfg.is_kto:
        return kto_batch_loss(out, ref_batch, batch["label"], cfg.loss_kwargs(), world_size)
    return preference_batch_loss(out, ref_batch, cfg.loss_kwargs(), phi_star if cfg.uses_mallows else None)


def train(cfg: TrainConfig) -> TrainResult:
    """Run the recipe described by ``cfg`` (already validated) and return what it produced.

    Loads the tokenizer, the data and the model, runs the optional SFT warm-up and the reference pass,
    then trains with evaluation, logging and checkpoints, and exports the model. Call it on every rank
    (under the ``deepspeed`` launcher or torchrun); without a launcher it runs as a single process.

    Args:
        cfg: a config from :func:`load_config`.

    Returns:
        A :class:`TrainResult` (the same on every rank).

    Raises:
        ValueError: data that cannot be loaded or is too small for one global batch, and other
            problems found once the data and the model are known, with the loader's message.
        NonFiniteError: a non-finite loss or gradient norm with ``on_nonfinite: stop`` (or too many
            skipped updates in a row with ``skip``), naming the step and the rows; no update was applied.

    Examples:
        >>> result = train(load_config("run.yaml"))
        >>> result.model_dir, result.eval_metrics["eval_rewards/accuracies"]
    """
    t0 = time.perf_counter()
    state = init_distributed(cfg.ddp_timeout)
    set_seed(cfg.seed)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)

    # --- data ---------------------------------------------------------------------------------------
    raw_train, raw_eval = batches.load_raw_splits(cfg)
    tokenizer = batches.load_tokenizer(cfg, state, raw_train)
    train_ds = batches.tokenize(cfg, raw_train, tokenizer)
    eval_ds = batches.tokenize(cfg, raw_eval, tokenizer) if raw_eval is not None else None
    collator = batches.collator(cfg, tokenizer)
    # map-style (shuffled order) or a stream
    reader = batches.train_batches(train_ds, cfg.per_device_train_batch_size, state.world_size,
                                   cfg.gradient_accumulation_steps, cfg.seed)
    total = batches.total_steps(cfg.max_steps, cfg.num_train_epochs, reader.steps_per_epoch)

    # --- model, reference, resume -------------------------------------------------------------------
    source = cfg.model_name_or_path
    if cfg.sft_warmup_steps > 0:
        source = sft_warmup(cfg, state, tokenizer, train_ds, collator, source)
    set_seed(cfg.seed)
    engine = policy_engine(cfg, state, build_model(cfg, source, tokenizer), total)
    if cfg.logits_mode == "chunked":
        logger.info("logits_mode=chunked: log-probs from the hidden states, %s rows per chunk; the [B, T, V] "
                    "logits are never materialised", cfg.logits_chunk_size or "default")
    ref = setup_reference(cfg, state, engine, tokenizer, train_ds, eval_ds, collator, source)
    step, num_tokens, skipped = 0, 0, 0
    resume = checkpoint.resolve_resume(cfg.resume_from_checkpoint, cfg.output_dir)
    if resume is not None:
        checkpoint.check_compatible(resume, cfg.logits_mode)
        client = checkpoint.load(engine, resume, state)
        step, num_tokens = int(client["step"]), int(client.get("num_tokens", 0))
        skipped = int(client.get("nonfinite_skipped", 0))
        reader.restore(client, step, resume)
        logger.info("resumed from %s at step %d", resume, step)

    # --- loop ---------------------------------------------------------------------------------------
    log = metric_logger(cfg, state, total, step, resumed=resume is not None, num_tokens=num_tokens)
    result = TrainResult(cfg.output_dir, step, total, metrics_path=str(log.path), phi_star=ref.phi_star,
                         eval_examples=None if eval_ds is None else len(eval_ds))
    saved_at = evaluated_at = -1
    engine.train()
    guard = nonfinite_guard(cfg, state, engine, skipped=skipped, kept="no checkpoint was written, so the last "
                            f"checkpoint in {cfg.output_dir} is intact")

    def client_state() -> dict[str, Any]:
        return {"step": step, **reader.position(step), "consumed_samples": step * reader.global_batch,
                "num_tokens": log.num_tokens, "phi_star": ref.phi_star, "world_size": state.world_size,
                "nonfinite_skipped": guard.skipped}

    try:
        with checkpoint.StopSignal() as stop:
            while step < total:
                pending = []  # the step's metrics, kept only if its update is applied
                for micro_rows in reader.micro_batches(step, state.rank):
                    batch = to_device(collator(micro_rows), state.device)
                    ref_batch = ref.batch(batch, "train", state.device)
                    out = forward_logprobs(engine, batch, backend=cfg.logprob_backend, logits_mean=True)
                    res = batch_loss(cfg, out, ref_batch, batch, ref.phi_star, state.world_size)
                    fault_point("step:forward", step + 1, state.rank)
                    engine.backward(guard.loss_for_backward(res.loss, batch["index"], res.losses, out.logps))
                    if engine.is_gradient_accumulation_boundary():
                        guard.before_step(step + 1)
                    engine.step()
                    pending.append((res.metrics, batch["attention_mask"].sum()))
                step += 1
                if guard.after_step(step):
                    for metrics, tokens in pending:
                        log.accumulate(metrics, tokens)
                log.advance()
                if step % cfg.logging_steps == 0 or step == total:
                    extras = {"grad_norm": _grad_norm(engine), "learning_rate": float(engine.get_lr()[0]),
                              "peak_memory_mb": max_over_ranks(peak_memory_mb(state.device), state)}
                    if cfg.on_nonfinite == "skip":
                        extras["nonfinite_skipped"] = guard.skipped
                    rec = log.log_train(step, reader.epoch_at(step), extras)
                    result.history.append(rec.get("loss", float("nan")))
                if eval_ds is not None and cfg.eval_steps and step % cfg.eval_steps == 0:
                    log.log_eval(step, reader.epoch_at(step), evaluate(cfg, state, engine, eval_ds, collator, ref))
                    evaluated_at = step
                stopping = any_rank(stop.received is not None, state)
                if stopping or (cfg.save_steps and step % cfg.save_steps == 0):
                    result.checkpoint_dir = str(checkpoint.save(engine, cfg.output_dir, step, client_state(), state,
                                                                cfg.to_dict(), cfg.save_total_limit))
                    saved_at = step
                if stopping:
                    result.stopped_by = stop.received or "a signal on another rank"
                    logger.warning("stopping at step %d (%s); checkpoint saved in %s", step, result.stopped_by,
                                   result.checkpoint_dir)
                    break
    except NonFiniteError:
        log.close()
        release_engines(engine, getattr(ref.live, "engine", None))
        raise

    # --- end: eval, checkpoint, export, curves -----------------------------------------------------
    if result.stopped_by is None:
        if eval_ds is not None and evaluated_at != step:
            log.log_eval(step, reader.epoch_at(step), evaluate(cfg, state, engine, eval_ds, collator, ref))
        if saved_at != step:
            result.checkpoint_dir = str(checkpoint.save(engine, cfg.output_dir, step, client_state(), state,
                                                        cfg.to_dict(), cfg.save_total_limit))
        if cfg.export_model:
            result.model_dir = str(export_hf(engine, tokenizer, cfg.output_dir, state))
    log.close()
    if cfg.plot_curves and state.is_main:
        png = plot_curves(log.path, Path(cfg.output_dir) / CURVES_FILE)
        result.curves_path = None if png is None else str(png)
    result.step = step
    result.train_metrics = {k: v for k, v in log.last.items() if isinstance(v, (int, float))}
    result.eval_metrics = {k: v for k, v in log.last_eval.items() if isinstance(v, (int, float))}
    result.seconds = time.perf_counter() - t0
    barrier(state)
    release_engines(engine, getattr(ref.live, "engine", None))
    return result


def release_engines(*engines: Any) -> None:
    """Free DeepSpeed engines now (their hooks and ZeRO buffers; a 2 GB gradient bucket is reserved
    even on CPU), so that a process calling ``train`` several times does not accumulate them."""
    for engine in engines:
        if engine is not None and hasattr(engine, "destroy"):
            engine.destroy()
    gc.collect()
