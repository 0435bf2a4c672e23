"""What a GPU check runs: the cases of a real run (README GPU shapes) and of a dry run (tiny CPU shapes).

Both plans have the same structure, built by one function from a :class:`Settings`: the correctness
groups first (every dtype and V in one child process, then the large-offset check in its own), then
the op and memory-mode sweep cases of the benchmark suite ordered by estimated cost, heaviest last.

Real run (CUDA):

* correctness: fp32 / bf16 / fp16 / fp64, V in {1000, 32000, 128256, 151936}, [3, 8] tokens per check
  (one sequence all masked), with and without the soft cap and the statistics, memory mode with H = 64
  in chunks of 8 rows; the per-sequence reduction at T = 16 ... 3000 (every BLOCK_T, fp32 and fp64
  values); a bf16 [16384, 151936] batch (2.5e9 elements, beyond 2³¹);
* op sweep: the target shapes of docs/kernels.md §Targets, the README's projection (N, V) = (8192, 128256),
  (16384, 151936), (16384, 256000), bf16: our kernel's forward and backward at each (the % of HBM peak
  against the 80 % / 75 % targets), and forward + backward of every provider (ours, the eager
  reference, torch.compile of it, TRL, Liger) at the first shape;
* memory-mode sweep: the README's GPU sweep, N = 8192, H = 4096, V in {32000, 128256, 151936}, bf16:
  forward + backward of the memory mode and of the logits path at each V, of the peers at V = 128256.

``--full`` makes the comparison at every shape (every provider in forward + backward everywhere) and
adds the memory mode's forward and backward alone at each V.

Estimates are rough models (process start, compilation, input creation, the timed calls at a
conservative bandwidth or FLOP rate); they order the cases and let the budget skip those that cannot
finish. The run refines them as cases complete (:class:`benchmarks.gpu_check.budget.Budget`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import linear as linear_subject
from .. import op as op_subject
from ..providers import LINEAR_PROVIDERS, PROVIDERS, availability, linear_availability
from .budget import PlanCase

ELEMENT_SIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
COMPARE_PASS = "fwdbwd"


@dataclass
class Settings:
    device: str
    dry_run: bool
    correctness: dict = field(default_factory=dict)  # the main group (see correctness.group_checks)
    large: tuple | None = None  # (dtype, rows, V) of the large-offset check
    op_shapes: tuple = ()  # (N, V)
    op_dtypes: tuple = ("bf16",)
    op_passes: tuple = op_subject.PASSES
    op_providers: tuple = PROVIDERS
    # Where the comparison (forward + backward, every provider) runs; None: at every shape. Elsewhere only
    # our kernel's forward and backward (op) or the memory mode's passes (linear) run.
    op_compare_shapes: tuple | None = None
    op_warmup: int = 10
    op_repeats: int = 50
    linear_n: int = 8192
    linear_hidden: int = 4096
    linear_vocabs: tuple = ()
    linear_dtype: str = "bf16"
    linear_passes: tuple = linear_subject.PASSES
    linear_providers: tuple = LINEAR_PROVIDERS
    linear_compare_vocabs: tuple | None = None
    linear_chunked_passes: tuple = (COMPARE_PASS,)  # the memory mode's own passes at every V
    linear_warmup: int = 5
    linear_repeats: int = 20
    # Cost model of the estimates (seconds; bytes/s; FLOP/s).
    # The correctness group compiles every variant on first use (about 180 JIT compilations on a machine
    # with a cold Triton cache: 20 variants x 4 dtypes x 2 block sizes, and the reductions) before its
    # ~690 checks.
    correctness_s: float = 300.0
    large_s: float = 25.0
    startup_s: float = 6.0
    setup_s: dict = field(default_factory=lambda: {"compiled": 30.0, "trl": 4.0, "liger": 4.0, "reference": 0.0})
    # benchmarks.op draws the [N, V] logits with a host generator (one thread: ~1e8 normal samples/s)
    # before moving them to the device: the largest share of an op case at the README shapes.
    input_elements_per_s: float = 1e8
    bandwidth: float = 2e12
    flop_rate: float = 3e14


def real_settings(device: str = "cuda", full: bool = False) -> Settings:
    """The README's GPU shapes; the comparison with the peers at the first shape unless ``full``."""
    return Settings(
        device=device, dry_run=False,
        op_compare_shapes=None if full else ((8192, 128256),),
        linear_compare_vocabs=None if full else (128256,),
        linear_chunked_passes=linear_subject.PASSES if full else (COMPARE_PASS,),
        correctness={"dtypes": ["fp32", "bf16", "fp16", "fp64"], "vocabs": [1000, 32000, 128256, 151936],
                     "shape": [3, 8],
                     "hidden": 64, "chunk_size": 8, "reduce_seqs": [16, 17, 40, 100, 200, 300, 600, 3000],
                     "reduce_vocab": 1000, "reduce_batch": 2},
        large=("bf16", 16384, 151936),
        op_shapes=((8192, 128256), (16384, 151936), (16384, 256000)),
        linear_vocabs=(32000, 128256, 151936),
    )


def dry_settings() -> Settings:
    """The same plan on CPU: tiny shapes, one pass, few repeats; the Triton checks run under the
    interpreter. The reduction covers every BLOCK_T with T <= 513 (the loop beyond 1024 is left to
    the real run: thousands of interpreted programs)."""
    return Settings(
        device="cpu", dry_run=True,
        correctness={"dtypes": ["fp32", "bf16", "fp16", "fp64"], "vocabs": [300], "shape": [3, 3], "hidden": 8,
                     "chunk_size": 2, "reduce_seqs": [16, 17, 33, 65, 129, 257, 513], "reduce_vocab": 300,
                     "reduce_batch": 1, "reduce_mask_frac": 0.95},
        large=("bf16", 8, 300),
        op_shapes=((64, 256), (64, 512)), op_dtypes=("fp32",), op_warmup=1, op_repeats=2,
        op_compare_shapes=((64, 256),),
        linear_n=64, linear_hidden=16, linear_vocabs=(256, 512), linear_dtype="fp32",
        linear_compare_vocabs=(256,), linear_warmup=1, linear_repeats=2,
        correctness_s=90.0, large_s=10.0, startup_s=4.0,
        setup_s={"compiled": 8.0, "trl": 4.0, "liger": 0.0, "reference": 0.0},
        input_elements_per_s=2e7, bandwidth=2e9, flop_rate=2e10,
    )


# ---------------------------------------------------------------------------------------- estimates


def op_estimate(s: Settings, provider: str, pass_: str, n: int, vocab: int, dtype: str) -> float:
    if availability(provider, s.device):
        return 0.0  # recorded as not installed / unsupported without starting a process
    # Bytes moved relative to ours; a provider without an entry is costed like the eager reference.
    traffic = {"ours": 1.0, "liger": 5 / 3, "compiled": 2.0, "compiled-loss": 2.0, "trl": 4.0,
               "reference": 6.0}.get(provider, 6.0)
    call = op_subject.BYTES_FACTOR[pass_] * n * vocab * ELEMENT_SIZE[dtype] * traffic / s.bandwidth
    calls = s.op_warmup + s.op_repeats + 2  # + the memory run and its setup
    return (s.startup_s + s.setup_s.get(provider, 2.0) + n * vocab / s.input_elements_per_s + calls * call)


def linear_estimate(s: Settings, provider: str, pass_: str, vocab: int) -> float:
    if linear_availability(provider, s.device):
        return 0.0
    # TRL's head recomputes its tiles in the backward as ours does: four products instead of three.
    work = {"ours-chunked": 4 / 3, "ours-logits": 1.0, "reference": 1.5, "compiled": 1.2,
            "liger": 1.0, "trl": 4 / 3}.get(provider, 1.5)
    call = linear_subject.FLOPS_FACTOR[pass_] * s.linear_n * s.linear_hidden * vocab * work / s.flop_rate
    calls = s.linear_warmup + s.linear_repeats + 2
    return s.startup_s + s.setup_s.get(provider, 2.0) + 1.0 + calls * call


# --------------------------------------------------------------------------------------------- plan


def op_spec(s: Settings, provider: str, pass_: str, n: int, vocab: int, dtype: str) -> dict:
    """The spec ``benchmarks.op.sweep`` hands its worker for this case."""
    return {"subject": "op", "device": s.device, "provider": provider, "pass": pass_, "n": n, "vocab": vocab,
            "dtype": dtype, "warmup": s.op_warmup, "repeats": s.op_repeats, "memory": True, "threads": None}


def linear_spec(s: Settings, provider: str, pass_: str, vocab: int) -> dict:
    """The spec ``benchmarks.linear.sweep`` hands its worker for this case."""
    return {"subject": "linear", "device": s.device, "provider": provider, "pass": pass_, "n": s.linear_n,
            "hidden": s.linear_hidden, "vocab": vocab, "dtype": s.linear_dtype, "mask_frac": 0.0,
            "chunk_size": None, "warmup": s.linear_warmup, "repeats": s.linear_repeats, "memory": True,
            "threads": None}


def build_plan(s: Settings, parts: tuple[str, ...] = ("correctness", "op", "linear"),
               inject: str | None = None) -> list[PlanCase]:
    """Correctness groups first, then the sweep cases by estimated cost (heaviest last)."""
    plan: list[PlanCase] = []
    if "correctness" in parts:
        main = {**s.correctness, "device": s.device, "inject": inject, "coverage": True}
        plan.append(PlanCase("correctness", "every dtype and V", s.correctness_s, {"group": main},
                             kind="correctness main"))
        if s.large:
            group = {"device": s.device, "inject": inject, "large": list(s.large), "shape": [1, s.large[1]]}
            dtype, rows, vocab = s.large
            plan.append(PlanCase("correctness", f"offsets > 2^31: {dtype} [{rows}, {vocab}]", s.large_s,
                                 {"group": group}, kind="correctness large"))
    sweeps: list[PlanCase] = []

    def wanted(provider: str, where, compare_at, pass_: str, everywhere: dict[str, tuple]) -> bool:
        """Our paths run their own passes at every shape; the comparison pass runs for everyone where
        the comparison is made (every shape with ``--full``)."""
        if pass_ in everywhere.get(provider, ()):
            return True
        return pass_ == COMPARE_PASS and (compare_at is None or where in compare_at)

    if "op" in parts:
        for pass_ in s.op_passes:
            for dtype in s.op_dtypes:
                for n, vocab in s.op_shapes:
                    for provider in s.op_providers:
                        if not wanted(provider, (n, vocab), s.op_compare_shapes, pass_, {"ours": ("fwd", "bwd")}):
                            continue
                        name = f"op {pass_} N={n} V={vocab} {dtype} {provider}"
                        sweeps.append(PlanCase("op", name, op_estimate(s, provider, pass_, n, vocab, dtype),
                                               {"spec": op_spec(s, provider, pass_, n, vocab, dtype)},
                                               kind=f"op {provider}"))
    if "linear" in parts:
        for pass_ in s.linear_passes:
            for vocab in s.linear_vocabs:
                for provider in s.linear_providers:
                    mode = {"ours-chunked": s.linear_chunked_passes, "ours-logits": (COMPARE_PASS,)}
                    if not wanted(provider, vocab, s.linear_compare_vocabs, pass_, mode):
                        continue
                    name = f"linear {pass_} N={s.linear_n} H={s.linear_hidden} V={vocab} {s.linear_dtype} {provider}"
                    sweeps.append(PlanCase("linear", name, linear_estimate(s, provider, pass_, vocab),
                                           {"spec": linear_spec(s, provider, pass_, vocab)},
                                           kind=f"linear {provider}"))
    return plan + sorted(sweeps, key=lambda c: c.estimate_s)
