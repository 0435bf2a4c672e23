"""``python -m mallowspo_fast.data``: the ``mallowspo-data`` command line."""

import sys

from .cli import main

sys.exit(main())
