"""Entry point of one isolated case: ``python -m benchmarks.worker '<json spec>'``.

The spec names a subject module of this package (``op``, ``linear``, ``loss_step``, ``train_step``,
``accumulation``) that provides ``build_case(spec) -> Case`` and may raise
:class:`benchmarks.providers.Unavailable`; a subject that measures something other than time (``accuracy``)
provides ``evaluate(spec) -> Result`` instead. The result is printed as one JSON line after a marker so
that library chatter on stdout cannot corrupt it.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
from typing import Any

import torch

from .harness import RESULT_MARKER, Result, run_in_process
from .providers import Unavailable

SUBJECTS = ("op", "linear", "loss_step", "train_step", "accumulation", "accuracy")


def run_spec(spec: dict[str, Any]) -> Result:
    """One case in the calling process: the subject's ``evaluate(spec)``, or its ``build_case(spec)``
    timed by ``run_in_process``; a provider that cannot run here, or running out of memory, gives a
    result that says so. The caller's thread count is left as it is."""
    torch.manual_seed(spec.get("seed", 0))
    module = importlib.import_module(f"benchmarks.{spec['subject']}")
    try:
        if hasattr(module, "evaluate"):
            return module.evaluate(spec)
        return run_in_process(module.build_case(spec), spec)
    except Unavailable as e:
        return Result(spec, e.status, notes=e.reason)
    except torch.OutOfMemoryError as e:
        return Result(spec, "error", notes=f"out of memory: {str(e).splitlines()[0][:200]}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m benchmarks.worker '<json spec>'")
    spec = json.loads(argv[0])
    if spec.get("subject") not in SUBJECTS:
        raise SystemExit(f"worker: subject must be one of {SUBJECTS}, got {spec.get('subject')!r}")
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    result = run_spec(spec)
    data = dataclasses.asdict(result)
    del data["spec"]
    print(RESULT_MARKER + json.dumps(data), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
