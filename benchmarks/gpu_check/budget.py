"""The wall-time budget of a GPU check and the cases it runs in order, or skips with a reason.

A case is started only when the time left covers its estimate; a started case gets the time left as
its hard limit (the runner stops it there). Estimates are refined as the run goes: once a case of a
kind (subject and provider) has run, later cases of that kind are estimated with the ratio of measured
to estimated time of the ones before, so a machine slower than the static estimates skips early rather
than overrunning.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class PlanCase:
    """One unit of the plan: a correctness group (one child process) or one sweep case."""

    part: str  # "correctness", "op" or "linear"
    name: str
    estimate_s: float
    payload: dict[str, Any] = field(default_factory=dict)
    kind: str = ""  # cases of one kind share the calibration of their estimates

    def __post_init__(self):
        if self.estimate_s < 0:
            raise ValueError(f"PlanCase {self.name!r}: estimate_s must be >= 0, got {self.estimate_s}")
        self.kind = self.kind or self.part


@dataclass
class Skipped:
    case: PlanCase
    reason: str


class Budget:
    """Wall-time budget in seconds from ``start`` (default: now) on ``clock`` (injectable for tests);
    ``reserve_s`` of it is kept for writing the results after the last case."""

    def __init__(self, total_s: float, clock: Callable[[], float] = time.monotonic, start: float | None = None,
                 reserve_s: float = 0.0):
        if not total_s >= 0 or not reserve_s >= 0:
            raise ValueError(f"Budget: total_s and reserve_s must be numbers >= 0, got {total_s!r}, {reserve_s!r}")
        self.total_s = float(total_s)
        self.reserve_s = float(reserve_s)
        self.clock = clock
        self.start = clock() if start is None else start
        self._ratio: dict[str, list[float]] = {}

    def elapsed(self) -> float:
        return self.clock() - self.start

    def remaining(self) -> float:
        """Seconds left for cases (the reserve excluded)."""
        return max(0.0, self.total_s - self.reserve_s - self.elapsed())

    def estimate(self, case: PlanCase) -> float:
        """The case's estimate scaled by measured / estimated time of the cases of its kind so far."""
        seen = self._ratio.get(case.kind)
        return case.estimate_s * (sum(seen) / len(seen) if seen else 1.0)

    def record(self, case: PlanCase, seconds: float) -> None:
        if case.estimate_s > 0:
            self._ratio.setdefault(case.kind, []).append(seconds / case.estimate_s)

    def admit(self, case: PlanCase) -> str | None:
        """None when ``case`` may start now, else the reason it is skipped."""
        left, need = self.remaining(), self.estimate(case)
        if left <= 0:
            return f"time budget of {self.total_s:.0f} s exhausted"
        if need > left:
            return f"time budget: {left:.0f} s left, the case needs ~{need:.0f} s"
        return None


def run_plan(plan: list[PlanCase], budget: Budget, execute: Callable[[PlanCase, Budget], Any],
             log: Callable[[str], None] = print) -> tuple[list[tuple[PlanCase, Any]], list[Skipped]]:
    """Run ``plan`` in order within ``budget``: ``execute(case, budget)`` for each admitted case;
    the others are returned as skipped with their reason. Returns (done, skipped)."""
    done: list[tuple[PlanCase, Any]] = []
    skipped: list[Skipped] = []
    for case in plan:
        reason = budget.admit(case)
        if reason is not None:
            skipped.append(Skipped(case, reason))
            log(f"  skip {case.part:11s} {case.name}: {reason}")
            continue
        t0 = budget.clock()
        out = execute(case, budget)
        budget.record(case, budget.clock() - t0)
        done.append((case, out))
    return done, skipped
