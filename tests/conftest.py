"""Shared test configuration."""

import os

import pytest
import torch

# Deterministic CPU math for the whole suite; the Triton interpreter is enabled by the kernel tests'
# own fixtures (TRITON_INTERPRET must be set before triton compiles a kernel).
torch.use_deterministic_algorithms(False)
SHARED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared")


@pytest.fixture(scope="session")
def shared_data_dir() -> str:
    """../shared/data beside the repository (real preference data for tests)."""
    path = os.path.normpath(os.path.join(SHARED_DIR, "data"))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"expected the shared data folder at {path}")
    return path
