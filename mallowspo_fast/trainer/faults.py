"""Fault injection points for the reliability tests, and the error raised on non-finite values.

The tests set ``MALLOWSPO_FAST_FAULT`` to ``<point>@<step>`` or ``<point>@<step>:<rank>`` and the process
kills itself with SIGKILL when it reaches that point at that optimizer step (on that rank; any rank when no
rank is given), after printing the time to stderr; with ``MALLOWSPO_FAST_FAULT_SIGNAL=SIGSTOP`` it freezes
instead (a hung rank). Without the variable each point is a dictionary lookup and nothing else. Points:

- ``save:engine_file``: inside DeepSpeed's save, right after its first file was written;
- ``save:engine_saved``, ``save:rng_saved``, ``save:state_written``, ``save:manifest_written``: between the
  files of a checkpoint in its temporary directory;
- ``save:renamed``: the checkpoint is visible, the ``latest`` pointer not yet updated;
- ``save:latest_written``: before older checkpoints are pruned;
- ``step:forward``: in an optimizer step, after a forward and before its backward.
"""

from __future__ import annotations

import os
import signal
import sys
import time

FAULT_ENV = "MALLOWSPO_FAST_FAULT"
SIGNAL_ENV = "MALLOWSPO_FAST_FAULT_SIGNAL"
SAVE_POINTS = ("save:engine_file", "save:engine_saved", "save:rng_saved", "save:state_written",
               "save:manifest_written", "save:renamed", "save:latest_written")
STEP_POINTS = ("step:forward",)


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient norm stopped the run before the update was applied."""


def _parse(spec: str) -> tuple[str, int, int | None]:
    try:
        point, rest = spec.split("@", 1)
        step, _, rank = rest.partition(":")
        parsed = (point, int(step), int(rank) if rank else None)
    except ValueError:
        parsed = None
    if parsed is None or parsed[0] not in SAVE_POINTS + STEP_POINTS:
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected '<point>@<step>[:<rank>]' with a point in "
                         f"{SAVE_POINTS + STEP_POINTS}")
    return parsed


def fault_point(point: str, step: int, rank: int) -> None:
    """SIGKILL this process when ``MALLOWSPO_FAST_FAULT`` names ``point`` at ``step`` (and ``rank``)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    want, at, on_rank = _parse(spec)
    if want == point and at == step and on_rank in (None, rank):
        sig = signal.Signals[os.environ.get(SIGNAL_ENV, "SIGKILL")]
        print(f"{FAULT_ENV}: {sig.name} at {point}@{step} on rank {rank}, time {time.time():.3f}", file=sys.stderr,
              flush=True)
        os.kill(os.getpid(), sig)
