"""Shared test configuration."""

import os
import warnings

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter on CPU tensors. The flag must be set
# before the kernels are decorated (at import of mallowspo_fast._kernels), hence here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _no_process_group_left_behind(request):
    """A test that initialises torch.distributed in the test process must destroy its group: a later test
    initialising its own would fail with "trying to initialize the default process group twice"."""
    import torch.distributed as dist

    before = dist.is_available() and dist.is_initialized()
    yield
    if not before and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # destroyed here so that the next tests start clean, and reported
        warnings.warn(f"{request.node.nodeid} left torch.distributed's default process group initialised",
                      stacklevel=1)
