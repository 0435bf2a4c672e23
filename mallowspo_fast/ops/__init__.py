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
from .vocab_parallel import (
    vocab_parallel_sequence_logprobs,
    vocab_parallel_token_entropy,
    vocab_parallel_token_logprobs,
)
from .vocab_parallel_linear import vocab_parallel_linear_sequence_logprobs, vocab_parallel_linear_token_logprobs

__all__ = ["IGNORE_INDEX", "TokenLogprobs", "TokenEntropy", "SequenceLogprobs", "TokenStats",
           "token_logprobs", "token_entropy", "sequence_logprobs",
           "linear_token_logprobs", "linear_sequence_logprobs",
           "vocab_parallel_token_logprobs", "vocab_parallel_token_entropy", "vocab_parallel_sequence_logprobs",
           "vocab_parallel_linear_token_logprobs", "vocab_parallel_linear_sequence_logprobs"]
