"""Preference losses and the MallowsPO dispersion estimator (pure functions of small tensors)."""

__all__: list[str] = []
