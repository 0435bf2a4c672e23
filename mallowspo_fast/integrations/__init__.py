"""Our fused op and losses inside other RLHF code (TRL, OpenRLHF, verl).

This package sits above ``ops`` and ``losses``; nothing below imports it. Importing it never needs TRL,
OpenRLHF or verl:

- :mod:`.trl_utils`, :mod:`.openrlhf`, :mod:`.verl`: drop-in replacements of the per-token log-prob,
  entropy and masked-reduction functions those libraries call (and of TRL's ``ChunkedLogProbFunction``),
  under their names, argument orders and defaults, with the result dtypes and side effects of the peers'
  current releases, computed by the fused op (one pass over the logits, gradients flow).
- :mod:`.trl` (needs the ``[trl]`` extra): a ``DPOTrainer`` subclass, a ``DPOConfig`` subclass and
  :func:`~mallowspo_fast.integrations.trl.patch_dpo_trainer` for existing trainer instances.
"""

from . import openrlhf, trl_utils, verl

__all__ = ["openrlhf", "trl_utils", "verl"]
