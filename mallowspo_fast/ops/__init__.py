"""Ops: launchers, autograd Functions, the functional API and the pure-PyTorch paths."""

from .logprobs import SequenceLogprobs, TokenLogprobs, sequence_logprobs, token_logprobs

__all__ = ["TokenLogprobs", "SequenceLogprobs", "token_logprobs", "sequence_logprobs"]
