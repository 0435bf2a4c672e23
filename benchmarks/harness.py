"""One harness for every benchmark: timing, peak memory, isolated cases, device facts.

A *case* is one measurement (subject x provider x shape x dtype x pass). Each case runs in its own
subprocess (``python -m benchmarks.worker``) so that one provider's allocator state, compiled graphs
or leaked memory never shows up in another provider's figures, and so that CPU peak RSS belongs to
that case alone.

Inside the case process:

* timing: ``warmup`` untimed runs, then ``repeats`` timed runs; we report the median and the 20th /
  80th percentiles. On CUDA a pair of events brackets each timed call; on CPU ``perf_counter``.
  A case may have an untimed ``setup`` (e.g. the forward before a timed backward).
* memory: after timing, freed memory is handed back to the OS (``malloc_trim``), the peak counter is
  reset, and one more run (setup + timed part) is made. *Extra peak* = peak − memory when only the
  inputs exist − the outputs every implementation must return when the subject names them
  (``Case.output_bytes``: the memory mode's parameter gradients). CUDA: ``max_memory_allocated``; CPU:
  the kernel's high-water mark of resident memory (``VmHWM``, reset by writing 5 to
  ``/proc/self/clear_refs``).

Conditions (``spec["condition"]``, CPU cases): ``quiet`` (nothing else runs), ``thread`` (a Python thread
reads ``/proc/self/statm`` every 0.5 ms during the case, as a logger or data loader would: it wants the
GIL between small ops and a core now and then) and ``thread+mmap`` (the same, with glibc's
``MALLOC_MMAP_THRESHOLD_=65536`` in the case's environment: every allocation above 64 KiB is a fresh
mapping whose pages fault in on first touch, as with allocators that return memory eagerly). ``thp``
runs quietly with ``THP_MEM_ALLOC_ENABLE=1`` in the case's environment: PyTorch's CPU allocator then asks
for transparent huge pages on every allocation of 2 MiB or more, which spares every implementation most of
the page faults of its fresh buffers (our op already asks for them on its gradient, ``ops/pages.py``); the
condition shows what the baselines gain from a setting a user can make.
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Peak HBM / DRAM bandwidth in GB/s by a substring of torch.cuda.get_device_name(), most specific first.
# Vendor datasheet figures; "% of peak" in the tables divides by these.
PEAK_BANDWIDTH_GBS: tuple[tuple[str, float], ...] = (
    ("H200", 4800.0),
    ("H100 SXM", 3350.0),
    ("H100 80GB HBM3", 3350.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),
    ("GH200", 4000.0),
    ("B200", 8000.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100-PCIE-40GB", 1555.0),
    ("A100-SXM4-40GB", 1555.0),
    ("A100", 1555.0),
    ("A10G", 600.0),
    ("A10", 600.0),
    ("L40S", 864.0),
    ("L40", 864.0),
    ("L4", 300.0),
    ("RTX 4090", 1008.0),
    ("RTX 3090", 936.0),
    ("V100", 900.0),
    ("T4", 320.0),
)

RESULT_MARKER = "@@BENCH_RESULT@@"

CONDITIONS = ("quiet", "thread", "thread+mmap", "thp")
MMAP_THRESHOLD_ENV = ("MALLOC_MMAP_THRESHOLD_", "65536")
THP_ENV = ("THP_MEM_ALLOC_ENABLE", "1")
SAMPLER_PERIOD_S = 0.0005


def check_condition(condition: str) -> str:
    if condition not in CONDITIONS:
        raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")
    return condition


class StatmSampler:
    """A Python thread that reads /proc/self/statm every ``period_s`` until stopped (the busy-process
    condition); ``samples`` counts its reads, so a run can show that it really ran beside the case."""

    def __init__(self, period_s: float = SAMPLER_PERIOD_S):
        self.period_s = period_s
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="statm-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with open("/proc/self/statm") as f:
                    f.read()
            except OSError:
                pass
            self.samples += 1
            time.sleep(self.period_s)

    def __enter__(self) -> StatmSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def log(msg: str) -> None:
    """Progress lines go to stderr, unbuffered, so that stdout carries only the report."""
    print(msg, file=sys.stderr, flush=True)


def peak_bandwidth_gbs(device_name: str) -> float | None:
    """Datasheet peak memory bandwidth of a GPU by name, or None when we do not know the device."""
    for key, gbs in PEAK_BANDWIDTH_GBS:
        if key.lower() in device_name.lower():
            return gbs
    return None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name(device: str, threads: int | None = None) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({threads or torch.get_num_threads()} threads)"


def environment_header(device: str, threads: int | None = None) -> dict[str, str]:
    """Facts printed at the top of every result: what ran, where, when."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {
        "device": device_name(device, threads),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": str(torch.version.cuda) if device.startswith("cuda") else "-",
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


# ----------------------------------------------------------------------------------------------------
# Timing


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int
    cpu_median_ms: float | None = None  # process CPU time (all threads); CPU runs only
    samples_ms: list[float] = field(default_factory=list)


def summarize(samples_ms: list[float]) -> Timing:
    if not samples_ms:
        raise ValueError("summarize: expected at least one timing sample, got none")
    if len(samples_ms) == 1:
        t = samples_ms[0]
        return Timing(t, t, t, 1)
    # method="inclusive" keeps the percentiles inside the observed range for small sample counts.
    q = statistics.quantiles(samples_ms, n=10, method="inclusive")
    return Timing(statistics.median(samples_ms), q[1], q[7], len(samples_ms))


def time_case(
    fn: Callable[[Any], Any],
    setup: Callable[[], Any] | None,
    device: str,
    warmup: int,
    repeats: int,
) -> Timing:
    """Time ``fn(setup())`` ``repeats`` times after ``warmup`` runs; only ``fn`` is inside the clock."""
    cuda = device.startswith("cuda")
    for _ in range(warmup):
        fn(setup() if setup else None)
    if cuda:
        torch.cuda.synchronize()
    samples, cpu_samples = [], []
    for _ in range(repeats):
        state = setup() if setup else None
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(state)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            c0, t0 = time.process_time(), time.perf_counter()
            fn(state)
            samples.append((time.perf_counter() - t0) * 1e3)
            cpu_samples.append((time.process_time() - c0) * 1e3)
        del state
    timing = summarize(samples)
    timing.samples_ms = samples
    if cpu_samples:
        # On a machine shared with other work, CPU time is steadier than wall time (time spent
        # descheduled is not counted); it sums over threads, so it can exceed the wall time.
        timing.cpu_median_ms = statistics.median(cpu_samples)
    return timing


# ----------------------------------------------------------------------------------------------------
# Memory


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_freed_memory() -> None:
    gc.collect()
    try:
        # glibc keeps freed chunks below the mmap threshold in its heap; give them back so that the
        # measured run has to fault its temporaries in again (and they count in the high-water mark).
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MemoryProbe:
    """Peak memory of a code region above the memory in use when ``start`` was called."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.base = 0
        self.supported = True

    def start(self) -> None:
        _release_freed_memory()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current VmRSS (Linux >= 4.0)
        except OSError:
            self.supported = False
            return
        self.base = (_proc_status_kb("VmRSS") or 0) * 1024

    def extra_peak_bytes(self) -> int | None:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        hwm = _proc_status_kb("VmHWM")
        if not self.supported or hwm is None:
            return None
        return max(0, hwm * 1024 - self.base)


def measure_memory(
    fn: Callable[[Any], Any],
    setup: Callable[[], Any] | None,
    device: str,
    reset: Callable[[], None] | None = None,
) -> int | None:
    """Extra peak bytes of one ``fn(setup())`` above the memory held before it (inputs only).

    ``reset`` drops what earlier runs left behind (e.g. the last gradient) so the baseline holds only
    the inputs; otherwise the new run would reuse that memory and look smaller than it is.
    """
    if reset is not None:
        reset()
    probe = MemoryProbe(device)
    probe.start()
    out = fn(setup() if setup else None)
    peak = probe.extra_peak_bytes()
    del out
    return peak


# ----------------------------------------------------------------------------------------------------
# Cases


@dataclass
class Case:
    """What a subject hands the worker: the timed call, its untimed setup, and what it moves."""

    fn: Callable[[Any], Any]
    setup: Callable[[], Any] | None = None
    reset: Callable[[], None] | None = None  # frees state a previous run left (gradients) before memory
    bytes_moved: float | None = None  # model bytes of one timed call (byte formula of the subject)
    tokens: int | None = None  # tokens processed by one timed call (for tokens/s)
    input_bytes: int | None = None  # the size memory is reported relative to (the logits)
    notes: str = ""
    flops: float | None = None  # model FLOPs of one timed call (FLOP formula of a matmul-bound subject)
    output_bytes: int = 0  # outputs every implementation returns (parameter grads): not in the extra peak


@dataclass
class Result:
    spec: dict[str, Any]
    status: str = "ok"  # ok | not installed | unsupported | error
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    samples: int = 0
    extra_peak_bytes: int | None = None
    input_bytes: int | None = None
    bytes_moved: float | None = None
    tokens: int | None = None
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    flops: float | None = None

    @property
    def gbs(self) -> float | None:
        if self.status != "ok" or not self.bytes_moved or not self.median_ms:
            return None
        return self.bytes_moved / (self.median_ms * 1e-3) / 1e9

    @property
    def tflops(self) -> float | None:
        if self.status != "ok" or not self.flops or not self.median_ms:
            return None
        return self.flops / (self.median_ms * 1e-3) / 1e12

    @property
    def tokens_per_s(self) -> float | None:
        if self.status != "ok" or not self.tokens or not self.median_ms:
            return None
        return self.tokens / (self.median_ms * 1e-3)


def run_in_process(case: Case, spec: dict[str, Any]) -> Result:
    device = spec["device"]
    condition = check_condition(spec.get("condition", "quiet"))
    extra: dict[str, Any] = {}
    if "thread" in condition:
        # The warm-up runs without the sampler (compilation is not what the condition is about).
        for _ in range(spec["warmup"]):
            case.fn(case.setup() if case.setup else None)
        with StatmSampler() as sampler:
            timing = time_case(case.fn, case.setup, device, 0, spec["repeats"])
        extra["sampler_reads"] = sampler.samples
    else:
        timing = time_case(case.fn, case.setup, device, spec["warmup"], spec["repeats"])
    peak = measure_memory(case.fn, case.setup, device, case.reset) if spec.get("memory", True) else None
    if peak is not None:
        peak = max(0, peak - case.output_bytes)
    extra.update(cpu_median_ms=timing.cpu_median_ms, samples_ms=timing.samples_ms)
    if "mmap" in condition:
        extra["malloc_env"] = os.environ.get(MMAP_THRESHOLD_ENV[0])
    return Result(spec, "ok", timing.median_ms, timing.p20_ms, timing.p80_ms, timing.samples, peak,
                  case.input_bytes, case.bytes_moved, case.tokens, case.notes, extra=extra, flops=case.flops)


def merge_results(results: list[Result]) -> Result:
    """One result from repeated runs of the same case (interleaved rounds): timings pooled over every
    round's samples, the smallest extra peak (the others include the noise of a shared machine)."""
    if not results:
        raise ValueError("merge_results: expected at least one result, got none")
    ok = [r for r in results if r.status == "ok"]
    if len(ok) < len(results):
        return next(r for r in results if r.status != "ok")
    pooled = [t for r in ok for t in r.extra.get("samples_ms") or [r.median_ms]]
    timing = summarize(pooled)
    cpu = [r.extra["cpu_median_ms"] for r in ok if r.extra.get("cpu_median_ms") is not None]
    peaks = [r.extra_peak_bytes for r in ok if r.extra_peak_bytes is not None]
    first = ok[0]
    extra = dict(first.extra, samples_ms=pooled, rounds=len(ok),
                 cpu_median_ms=statistics.median(cpu) if cpu else None)
    return Result(first.spec, "ok", timing.median_ms, timing.p20_ms, timing.p80_ms, timing.samples,
                  min(peaks) if peaks else None, first.input_bytes, first.bytes_moved, first.tokens,
                  first.notes, extra=extra, flops=first.flops)


def _child_env(spec: dict[str, Any]) -> dict[str, str]:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    # A case measures the real kernels (or the torch path); the Triton interpreter is for tests only.
    if spec["device"].startswith("cuda"):
        env.pop("TRITON_INTERPRET", None)
    condition = check_condition(spec.get("condition", "quiet"))
    if "mmap" in condition:
        env[MMAP_THRESHOLD_ENV[0]] = MMAP_THRESHOLD_ENV[1]
    if condition == "thp":
        env[THP_ENV[0]] = THP_ENV[1]
    # A case's own settings (e.g. the torch backend's route, the Triton interpreter): a value sets, None unsets.
    for name, value in (spec.get("env") or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = str(value)
    return env


def run_isolated(spec: dict[str, Any], timeout_s: float = 1800.0, command: list[str] | None = None) -> Result:
    """Run one case in a fresh interpreter; a failure gives status "error" with the reason.

    ``command`` (default ``python -m benchmarks.worker '<spec json>'``) must print ``RESULT_MARKER`` + the
    result as JSON, as ``benchmarks.worker`` does."""
    cmd = command or [sys.executable, "-m", "benchmarks.worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(spec), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return Result(spec, "error", notes=f"timed out after {timeout_s:.0f} s")
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            data = json.loads(line[len(RESULT_MARKER):])
            data["spec"] = spec
            return Result(**data)
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return Result(spec, "error", notes=f"exit {proc.returncode}: " + " | ".join(tail)[-300:])


def measure_floor_isolated(device: str, threads: int | None = None, size_mib: int = 512, timeout_s: float = 600.0):
    """The CPU floor (``benchmarks.floor``) measured in its own process with the threads of the cases;
    None on other devices or when the measurement fails (the tables then have no "× floor")."""
    if device.startswith("cuda"):
        return None
    from .floor import Floor

    cmd = [sys.executable, "-m", "benchmarks.floor", "--json", "--size-mib", str(size_mib)]
    cmd += ["--threads", str(threads)] if threads else []
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env({"device": device}),
                              timeout=timeout_s)
        return Floor(**json.loads(proc.stdout.strip().splitlines()[-1]))
    except (subprocess.TimeoutExpired, ValueError, IndexError, TypeError) as e:
        log(f"  floor: not measured ({type(e).__name__}: {e})")
        return None


def run_case(spec: dict[str, Any], missing: tuple[str, str] | None, label: str, log=log) -> Result:
    """One case of a sweep: run it in its own process, or record why it cannot run here (``missing``:
    status and note from the provider's availability check); log one line either way."""
    r = Result(spec, missing[0], notes=missing[1]) if missing else run_isolated(spec)
    log(f"  {label} {r.status:13s} " + (f"{r.median_ms:10.2f} ms" if r.median_ms is not None else r.notes))
    return r
