"""mallowspo-fast: fused Triton kernels and a lean DeepSpeed trainer for MallowsPO and the DPO family.

Public API (a contract: code outside this repository calls these names)::

    import mallowspo_fast as mpf
    mpf.token_logprobs(logits, labels, ...)      # -> TokenLogprobs(logps, entropy)
    mpf.sequence_logprobs(logits, labels, ...)   # -> SequenceLogprobs(logps, entropy, num_tokens)
    mpf.preference_loss(...), mpf.neg_log_dispersion(...), mpf.kto_loss(...), mpf.orpo_loss(...)
"""

from ._version import __version__
from .losses import *  # noqa: F401,F403  (the loss layer defines its own __all__)
from .losses import __all__ as _losses_all
from .ops import *  # noqa: F401,F403
from .ops import __all__ as _ops_all

__all__ = ["__version__", *_ops_all, *_losses_all]
