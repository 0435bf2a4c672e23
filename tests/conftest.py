"""Shared test configuration."""

import os

import torch

# Without a GPU the Triton kernels run under the interpreter on CPU tensors. The flag must be set
# before the kernels are decorated (at import of mallowspo_fast._kernels), hence here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
