"""pytest-benchmark entry: ``pytest benchmarks/ --benchmark-only`` (timing only; memory is in the runner).

Shapes can be changed from the command line: ``--bench-n 8192 --bench-vocab 128256 --bench-dtype bf16``
(and ``--bench-hidden 4096`` for the memory mode).
"""

from __future__ import annotations

import pytest

from .harness import default_device


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mallowspo-fast benchmarks")
    group.addoption("--bench-device", default=None, help="cuda or cpu (default: cuda when available)")
    group.addoption("--bench-n", type=int, default=None, help="tokens N of the op benchmarks")
    group.addoption("--bench-vocab", type=int, default=None, help="vocabulary V of the op benchmarks")
    group.addoption("--bench-dtype", default=None, choices=["bf16", "fp16", "fp32"])
    group.addoption("--bench-hidden", type=int, default=None, help="hidden size H of the memory-mode benchmarks")


@pytest.fixture(scope="session")
def bench_config(request: pytest.FixtureRequest) -> dict:
    opt = request.config.getoption
    device = opt("--bench-device") or default_device()
    cuda = device.startswith("cuda")
    return {
        "device": device,
        "n": opt("--bench-n") or (8192 if cuda else 1024),
        "vocab": opt("--bench-vocab") or (128256 if cuda else 32000),
        "hidden": opt("--bench-hidden") or (4096 if cuda else 256),
        "dtype": opt("--bench-dtype") or ("bf16" if cuda else "fp32"),
        "rounds": 30 if cuda else 5,
        "warmup": 5 if cuda else 1,
    }
