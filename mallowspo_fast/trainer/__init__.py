"""The lean DeepSpeed trainer: config, engine setup, loop, checkpoints, logging, CLI."""
