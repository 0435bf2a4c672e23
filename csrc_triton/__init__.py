"""Triton kernels of mallowspo-fast (installed as ``mallowspo_fast._kernels``).

Kernels only: no autograd, no allocation, no policy. Launchers live in ``mallowspo_fast.ops``.
"""

from .logprobs import (
    _sequence_reduce_kernel,
    _token_logprobs_bwd_kernel,
    _token_logprobs_fwd_kernel,
)

__all__ = ["_token_logprobs_fwd_kernel", "_token_logprobs_bwd_kernel", "_sequence_reduce_kernel"]
