"""The non-finite guard: no update with a non-finite loss or gradient norm is ever applied.

Per micro-batch, with no host read: the rows whose loss or policy log-probs are not finite are recorded on
the device, and the loss handed to backward is multiplied by 1 (finite loss: exactly the same gradients) or
by NaN (non-finite loss: every gradient becomes NaN). DeepSpeed's ZeRO optimizers (stages 1-3, and bf16 at
stage 0) check the global gradient norm before they update and discard the update when it is not finite,
without stepping the learning-rate schedule; a non-finite loss thus takes the same path as an overflowing
gradient. At zero_stage 0 in fp32 the engine has no such check, so the guard computes the gradient norm
itself before the step (one host read per optimizer step, only in that configuration).

After the step, ``engine.was_step_applied()`` (a host value the engine already has) says whether the update
happened. When it did not: ``on_nonfinite: stop`` raises :class:`NonFiniteError` naming the step and the rows
of the batch (no checkpoint is written, so the last one is the last good state); ``skip`` counts it and
raises after ``max_nonfinite_in_a_row`` skipped updates in a row. The SFT warm-up has a guard of its own.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .faults import NonFiniteError
from .launch import DistState

logger = logging.getLogger("mallowspo_fast.trainer")


class NonFiniteGuard:
    """The guard of one engine. ``on_nonfinite`` and ``max_in_a_row`` are the config's ``on_nonfinite`` and
    ``max_nonfinite_in_a_row``. The errors name the step as ``step_name`` N and end with ``kept``: what is
    still intact ("no checkpoint was written, so the last checkpoint in ... is intact")."""

    def __init__(self, state: DistState, engine: Any, *, on_nonfinite: str, max_in_a_row: int, zero_stage: int,
                 bf16: bool, kept: str, step_name: str = "optimizer step", skipped: int = 0) -> None:
        self.state, self.engine = state, engine
        self.on_nonfinite, self.max_in_a_row = on_nonfinite, max_in_a_row
        self.kept, self.step_name = kept, step_name
        self.skipped = skipped  # updates skipped since the start of the run (restored on resume)
        self.in_a_row = 0
        self._rows: list[tuple[torch.Tensor, torch.Tensor]] = []
        # fp32 at stage 0: a plain torch optimizer without an overflow check
        self.own_norm = zero_stage == 0 and not bf16

    def loss_for_backward(self, loss: torch.Tensor, index: torch.Tensor, *per_row: torch.Tensor) -> torch.Tensor:
        """``loss`` times 1 when it and every row of the micro-batch are finite, else times NaN.

        ``index`` [B]: the dataset index of each row; ``per_row``: tensors of [k·B] values, k blocks of B rows
        (a paired forward's log-probs are [2B]: chosen rows, then rejected rows)."""
        rows_ok = torch.ones_like(index, dtype=torch.bool)
        for values in per_row:
            rows_ok = rows_ok & torch.isfinite(values.detach()).view(-1, index.numel()).all(0)
        self._rows.append((index.detach(), ~rows_ok))
        ok = torch.isfinite(loss.detach()) & rows_ok.all()
        return loss * torch.where(ok, 1.0, float("nan")).to(loss.dtype)

    def before_step(self, step: int) -> None:
        """At the accumulation boundary, before ``engine.step()``: the own gradient-norm check (stage 0 fp32)."""
        if not self.own_norm:
            return
        grads = [p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(grads)) if grads else torch.zeros(())
        if not bool(torch.isfinite(norm)):
            what = self._describe(self._rows)
            self._rows = []
            self._raise(step, what)

    def after_step(self, step: int) -> bool:
        """After the boundary ``engine.step()``: True when the update was applied; otherwise stop or count."""
        applied = self.engine.was_step_applied()
        rows = self._rows
        self._rows = []
        if applied:
            self.in_a_row = 0
            return True
        what = self._describe(rows)
        if self.on_nonfinite == "stop":
            self._raise(step, what)
        self.skipped += 1
        self.in_a_row += 1
        logger.warning("%s %d: %s; the update was skipped (on_nonfinite=skip: %d in a row, %d in all)",
                       self.step_name, step, what, self.in_a_row, self.skipped)
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteError(f"{self.step_name} {step}: {self.in_a_row} updates in a row were skipped for "
                                 f"non-finite values (max_nonfinite_in_a_row={self.max_in_a_row}); "
                                 f"the last: {what}; {self.kept}")
        return False

    def _describe(self, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> str:
        """Which rows (dataset index, over all ranks) had a non-finite loss or log-prob."""
        local = sorted(int(i) for index, bad in rows for i in index[bad.to(index.device)].tolist())
        if self.state.world_size > 1:
            import torch.distributed as dist

            gathered: list[Any] = [None] * self.state.world_size
            dist.all_gather_object(gathered, local, group=self.state.control_group)
            local = sorted(i for part in gathered for i in part)
        if local:
            return f"non-finite loss or log-probs in rows {local} of the training split (dataset index)"
        return "non-finite gradient norm (every row's loss and log-probs were finite)"

    def _raise(self, step: int, what: str) -> None:
        raise NonFiniteError(f"{self.step_name} {step}: {what}; the update was not applied and {self.kept} "
                             "(on_nonfinite=skip skips such updates)")
