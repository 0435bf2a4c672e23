"""``python -m mallowspo_fast.train CONFIG.yaml [key=value ...]`` (same as ``mallowspo-train``).

Also the module the launchers start: ``deepspeed --num_gpus 2 --module mallowspo_fast.train ...`` or
``torchrun --nproc_per_node 2 -m mallowspo_fast.train ...``.
"""

import sys

from .trainer.cli import main

if __name__ == "__main__":
    sys.exit(main())
