"""Ops: launchers, autograd Functions, the functional API and the pure-PyTorch paths."""

from .linear import linear_sequence_logprobs, linear_token_logprobs
from .logprobs import SequenceLogprobs, TokenLogprobs, sequence_logprobs, token_logprobs

__all__ = ["TokenLogprobs", "SequenceLogprobs", "token_logprobs", "sequence_logprobs",
           "linear_token_logprobs", "linear_sequence_logprobs"]
