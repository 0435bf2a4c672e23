"""Shared pieces of the fuzz tests: the default / slow test pair and common strategies."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FUZZ_PROFILE = "mallowspo-fuzz"
SLOW_PROFILE = "mallowspo-fuzz-slow"
_COMMON = {
    "deadline": None,
    "print_blob": True,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
}
# The default profile is derandomized (the same examples on every run: the default suite never turns red
# by chance); the slow profile draws new examples on every run.
settings.register_profile(FUZZ_PROFILE, max_examples=30, derandomize=True, **_COMMON)
settings.register_profile(SLOW_PROFILE, max_examples=400, derandomize=False, **_COMMON)
HANG_GUARD_S = {FUZZ_PROFILE: 120, SLOW_PROFILE: 1800}

CLEAR_ERRORS = (ValueError, TypeError)


def fuzz_pair(*strategies: st.SearchStrategy, scale: float = 1, **named: st.SearchStrategy) -> Callable:
    """``test_x, test_x_slow = fuzz_pair(...)(check_x)``: the same property under the default profile and,
    marked ``slow``, under the big one; ``scale`` multiplies both example counts (up for cheap properties,
    down for slow ones)."""

    def make(fn: Callable) -> tuple[Callable, Callable]:
        fast_profile, slow_profile = settings.get_profile(FUZZ_PROFILE), settings.get_profile(SLOW_PROFILE)
        count = lambda profile: max(1, int(profile.max_examples * scale))  # noqa: E731
        fast = settings(fast_profile, max_examples=count(fast_profile))(given(*strategies, **named)(fn))
        slow = settings(slow_profile, max_examples=count(slow_profile))(given(*strategies, **named)(fn))
        return fast, pytest.mark.slow(slow)

    return make


# Anything JSON can hold, nested a little: the junk a broken export writes into a field.
json_scalars = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(
    max_size=8
)
json_junk = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
