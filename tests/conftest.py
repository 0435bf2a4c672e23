"""Shared test configuration."""

import os

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter on CPU tensors. The flag must be set
# before the kernels are decorated (at import of mallowspo_fast._kernels), hence here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared")


@pytest.fixture(scope="session")
def shared_data_dir() -> str:
    """../shared/data beside the repository (real preference data for tests)."""
    path = os.path.normpath(os.path.join(SHARED_DIR, "data"))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"expected the shared data folder at {path}")
    return path
