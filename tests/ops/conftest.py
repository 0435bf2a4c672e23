"""Fixtures shared by the op tests."""

from __future__ import annotations

import pytest

from mallowspo_fast.ops import torch_path as tp


@pytest.fixture
def backend(request, monkeypatch):
    """A backend name for the op, parametrised indirectly: "torch-eager" and "torch-compiled" force the two
    routes of the torch backend (and give "torch"); "triton" and "reference" pass through."""
    name = request.param
    if name.startswith("torch"):
        monkeypatch.setenv(tp.COMPILE_ENV, "1" if name == "torch-compiled" else "0")
        monkeypatch.setattr(tp._CompileState, "failed", None)
        if name == "torch-compiled" and not tp._compiler_available():
            pytest.fail("the compiled route needs a C++ compiler, and this machine has none")
        return "torch"
    return name
