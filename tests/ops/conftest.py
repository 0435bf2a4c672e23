"""Fixtures shared by the op tests."""

from __future__ import annotations

import pytest

from mallowspo_fast.ops import cpu_native
from mallowspo_fast.ops import torch_path as tp

ROUTES = {"torch-eager": ("0", "0"), "torch-compiled": ("1", "0"), "torch-native": ("1", "1")}


@pytest.fixture
def backend(request, monkeypatch):
    """A backend name for the op, parametrised indirectly: "torch-eager", "torch-compiled" and
    "torch-native" force the three routes of the torch backend on CPU (and give "torch"): the eager chunks,
    the Inductor loops, the native C loops (fp32/bf16 without soft cap or statistics; the Inductor loops
    serve the rest). "triton" and "reference" pass through."""
    name = request.param
    if name.startswith("torch"):
        compile_mode, native = ROUTES[name]
        monkeypatch.setenv(tp.COMPILE_ENV, compile_mode)
        monkeypatch.setenv(cpu_native.NATIVE_ENV, native)
        monkeypatch.setattr(tp._CompileState, "failed", None)
        if name != "torch-eager" and not tp._compiler_available():
            pytest.fail(f"the {name} route needs a C/C++ compiler, and this machine has none")
        if name == "torch-native" and cpu_native.library() is None:
            pytest.fail(f"the native CPU kernels did not build: {cpu_native._State.failed}")
        return "torch"
    return name
