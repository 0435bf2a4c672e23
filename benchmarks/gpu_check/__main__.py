"""``python -m benchmarks.gpu_check``: see :mod:`benchmarks.gpu_check.run` (``--help``)."""

import sys
import time

STARTED = time.monotonic()  # the budget counts the imports that follow

from .run import main  # noqa: E402

sys.exit(main(started=STARTED))
