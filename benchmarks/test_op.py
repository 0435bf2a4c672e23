"""Op, memory-mode and loss-step timings through pytest-benchmark (one process; see ``python -m benchmarks``
for isolated cases with peak memory, bandwidth or FLOP rate, and ratios)."""

from __future__ import annotations

import pytest
import torch

from . import linear, loss_step, op
from .providers import PROVIDERS, Unavailable


def _synchronized(fn, device: str):
    if not device.startswith("cuda"):
        return fn

    def run(*args):
        out = fn(*args)
        torch.cuda.synchronize()
        return out

    return run


def _case_or_skip(module, spec: dict):
    try:
        return module.build_case(spec)
    except Unavailable as e:
        pytest.skip(f"{spec['provider']}: {e.status} ({e.reason})")


@pytest.mark.parametrize("pass_", op.PASSES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_op(benchmark, bench_config, provider: str, pass_: str) -> None:
    cfg = bench_config
    spec = {"subject": "op", "provider": provider, "pass": pass_, "device": cfg["device"], "n": cfg["n"],
            "vocab": cfg["vocab"], "dtype": cfg["dtype"]}
    case = _case_or_skip(op, spec)
    benchmark.extra_info.update(spec, bytes=case.bytes_moved)
    benchmark.pedantic(_synchronized(case.fn, cfg["device"]), setup=lambda: ((case.setup(),), {}),
                       rounds=cfg["rounds"], warmup_rounds=cfg["warmup"], iterations=1)


@pytest.mark.parametrize("pass_", linear.PASSES)
@pytest.mark.parametrize("provider", linear.PROVIDERS)
def test_linear(benchmark, bench_config, provider: str, pass_: str) -> None:
    cfg = bench_config
    spec = {"subject": "linear", "provider": provider, "pass": pass_, "device": cfg["device"], "n": cfg["n"],
            "hidden": cfg["hidden"], "vocab": cfg["vocab"], "dtype": cfg["dtype"]}
    case = _case_or_skip(linear, spec)
    benchmark.extra_info.update(spec, flops=case.flops)
    benchmark.pedantic(_synchronized(case.fn, cfg["device"]), setup=lambda: ((case.setup(),), {}),
                       rounds=cfg["rounds"], warmup_rounds=cfg["warmup"], iterations=1)


@pytest.mark.parametrize("loss", loss_step.LOSSES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_loss_step(benchmark, bench_config, provider: str, loss: str) -> None:
    cfg = bench_config
    cuda = cfg["device"].startswith("cuda")
    spec = {"subject": "loss_step", "provider": provider, "loss": loss, "device": cfg["device"], "batch": 4,
            "seq": 1024 if cuda else 256, "vocab": cfg["vocab"], "dtype": cfg["dtype"]}
    case = _case_or_skip(loss_step, spec)
    benchmark.extra_info.update(spec, bytes=case.bytes_moved)
    benchmark.pedantic(_synchronized(case.fn, cfg["device"]), setup=lambda: ((case.setup(),), {}),
                       rounds=cfg["rounds"], warmup_rounds=cfg["warmup"], iterations=1)
