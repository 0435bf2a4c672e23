"""Ops: launchers, autograd Functions, the functional API and the pure-PyTorch paths."""

from .linear import linear_sequence_logprobs, linear_token_logprobs
from .logprobs import (
    IGNORE_INDEX,
    SequenceLogprobs,
    TokenEntropy,
    TokenLogprobs,
    TokenStats,
    sequence_logprobs,
    token_entropy,
    token_logprobs,
)

__all__ = ["IGNORE_INDEX", "TokenLogprobs", "TokenEntropy", "SequenceLogprobs", "TokenStats",
           "token_logprobs", "token_entropy", "sequence_logprobs",
           "linear_token_logprobs", "linear_sequence_logprobs"]
