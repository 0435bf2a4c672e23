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

import torch

from .harness import RESULT_MARKER, Result, run_in_process
from .providers import Unavailable

SUBJECTS = ("op", "linear", "loss_step", "train_step", "accumulation", "accuracy")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m benchmarks.worker '<json spec>'")
    spec = json.loads(argv[0])
    if spec.get("subject") not in SUBJECTS:
        raise SystemExit(f"worker: subject must be one of {SUBJECTS}, got {spec.get('subject')!r}")
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    torch.manual_seed(spec.get("seed", 0))
    module = importlib.import_module(f"benchmarks.{spec['subject']}")
    try:
        if hasattr(module, "evaluate"):
            result = module.evaluate(spec)
        else:
            result = run_in_process(module.build_case(spec), spec)
    except Unavailable as e:
        result = Result(spec, e.status, notes=e.reason)
    except torch.OutOfMemoryError as e:
        result = Result(spec, "error", notes=f"out of memory: {str(e).splitlines()[0][:200]}")
    data = dataclasses.asdict(result)
    del data["spec"]
    print(RESULT_MARKER + json.dumps(data), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
