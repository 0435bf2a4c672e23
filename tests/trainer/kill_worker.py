"""Runs training runs that kill themselves (SIGKILL) at fault points, for the reliability tests.

    python kill_worker.py '[{"fault": "save:renamed@2", "config": {...}}, ...]'

Imports the trainer once, then forks one child per run, so that each run pays for training only and not for
importing torch, DeepSpeed and transformers again. Prints one JSON line: per run, how the child ended
(``signal`` or ``exit`` and the number) and its wall time in seconds.
"""

from __future__ import annotations

import json
import os
import sys
import time

import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401  (imported lazily by deepspeed.initialize)
import transformers.models.llama.modeling_llama  # noqa: F401  (the tiny test model)

from mallowspo_fast.trainer import load_config, loop  # imported once, before forking


def main() -> None:
    runs = json.loads(sys.argv[1])
    results = []
    for run in runs:
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # the child: one training run, expected to die at its fault point
            os.environ["MALLOWSPO_FAST_FAULT"] = run["fault"]
            code = 0
            try:
                loop.train(load_config(None, run["config"]))
            except BaseException as e:  # noqa: BLE001  (reported through the exit status)
                print(f"run failed: {e!r}", file=sys.stderr)
                code = 3
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        ended = (["signal", os.WTERMSIG(status)] if os.WIFSIGNALED(status) else ["exit", os.WEXITSTATUS(status)])
        results.append({"fault": run["fault"], "ended": ended, "seconds": time.perf_counter() - t0})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
