"""The native CPU route of the torch backend: the op's forward and backward as one C loop per row.

``csrc_triton/cpu_rows.c`` (installed as ``mallowspo_fast/_kernels/cpu_rows.c``) is compiled at first use
with the system C compiler into a shared library cached under ``$MALLOWSPO_FAST_CACHE`` (default
``~/.cache/mallowspo_fast``), keyed by the source, the compiler and its flags, and called through ctypes
(which releases the GIL). Each row is read from memory once per pass; the exponentials use AVX-512 when
the compiler targets it (``-march=native``), a portable auto-vectorised loop otherwise.

It serves the torch backend's CPU calls for fp32 and bf16 logits without a soft cap and without the extra
statistics (the compiled Inductor loops serve those), when the compiled route would (same switches:
``MALLOWSPO_FAST_TORCH_COMPILE``, ``COMPILE_MIN_VOCAB``). ``MALLOWSPO_FAST_NATIVE=0`` turns it off; a build
that fails warns once and the compiled route serves from then on. The choice depends on the device, dtype,
vocabulary size and flags only, never on the rows (batch invariance).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

NATIVE_ENV = "MALLOWSPO_FAST_NATIVE"
CACHE_ENV = "MALLOWSPO_FAST_CACHE"
SOURCE = "cpu_rows.c"
NATIVE_DTYPES = (torch.float32, torch.bfloat16)
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
# Tried in order: the first that compiles is kept (-march=native fails on some compilers and CPUs).
FLAG_SETS = (("-O3", "-march=native", "-fopenmp"), ("-O3", "-fopenmp"))

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_FWD_ARGS = [_P, _I, _I, _I, _P, _P, _F, _P, _P, _P, _P, ctypes.c_int]
_BWD_ARGS = [_P, _P, _I, _I, _I, _I, _P, _P, _P, _P, _P, _P, _P, _P, _F, ctypes.c_int]


class _State:
    lib: ctypes.CDLL | None = None
    failed: str | None = None
    lock = threading.Lock()


def source_path() -> Path:
    """The C source beside the Triton kernels (found without importing them: they need triton)."""
    spec = importlib.util.find_spec("mallowspo_fast._kernels")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("mallowspo_fast._kernels is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / SOURCE


def _compiler() -> str | None:
    names = [os.environ["CC"]] if os.environ.get("CC") else []
    for name in names + ["cc", "gcc", "clang"]:
        path = shutil.which(name)
        if path:
            return path
    return None


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "mallowspo_fast")
    return Path(root) / "native"


def _writable(directory: Path) -> Path:
    """``directory`` (created), or a per-user folder under the system's temporary directory when it cannot be
    written (a read-only home)."""
    for d in (directory, Path(tempfile.gettempdir()) / f"mallowspo_fast-{os.getuid() if hasattr(os, 'getuid') else 0}"):
        try:
            d.mkdir(parents=True, exist_ok=True)
            if os.access(d, os.W_OK):
                return d
        except OSError:
            continue
    raise RuntimeError(f"no writable folder for the native CPU kernels ({directory} and the temporary directory)")


def build(extra_flags: tuple[str, ...] = (), directory: Path | None = None) -> Path:
    """Compile the C source (cached) and return the library's path; raises RuntimeError with the
    compiler's output when no flag set compiles. ``extra_flags`` (e.g. ``-DMALLOWSPO_PORTABLE``) give
    another library, for tests."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found ($CC, cc, gcc, clang)")
    src = source_path().read_bytes()
    directory = directory or _writable(cache_dir())
    errors = []
    for flags in FLAG_SETS:
        flags = (*flags, *extra_flags)
        key = hashlib.sha256(src + cc.encode() + " ".join(flags).encode()
                             + _cpu_signature().encode()).hexdigest()[:20]
        lib = directory / f"cpu_rows-{key}.so"
        if lib.exists():
            return lib
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            c_file, out = Path(tmp) / SOURCE, Path(tmp) / lib.name
            c_file.write_bytes(src)
            proc = subprocess.run([cc, *flags, "-fPIC", "-shared", "-o", str(out), str(c_file), "-lm"],
                                  capture_output=True, text=True)
            if proc.returncode == 0:
                os.replace(out, lib)  # atomic: concurrent builders (ranks, test workers) never see half a file
                return lib
            errors.append(f"{' '.join(flags)}: {proc.stderr.strip()[-400:]}")
    raise RuntimeError("compiling the native CPU kernels failed: " + " | ".join(errors))


def _cpu_signature() -> str:
    """-march=native builds for this CPU: the key includes its model and flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f.read().splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        import platform

        return platform.processor() + platform.machine()


def load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name in ("f32", "bf16"):
        getattr(lib, f"cpu_rows_forward_{name}").argtypes = _FWD_ARGS
        getattr(lib, f"cpu_rows_backward_{name}").argtypes = _BWD_ARGS
    lib.cpu_rows_simd_width.restype = ctypes.c_int
    lib.cpu_rows_exp_sum.argtypes = [_P, _I, _I, ctypes.c_int]
    lib.cpu_rows_exp_sum.restype = ctypes.c_double
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded library, built on first use; None (with one warning) when it cannot be built."""
    if _State.lib is not None or _State.failed is not None:
        return _State.lib
    with _State.lock:
        if _State.lib is None and _State.failed is None:
            try:
                _State.lib = load(build())
            except (RuntimeError, OSError, AttributeError) as e:  # AttributeError: a symbol missing
                _State.failed = str(e)[:500]
                warnings.warn(f"mallowspo_fast: the native CPU kernels are unavailable ({_State.failed}); "
                              "the compiled route serves the torch backend's CPU calls", RuntimeWarning,
                              stacklevel=3)
    return _State.lib


def enabled() -> bool:
    return os.environ.get(NATIVE_ENV, "1").strip() != "0"


def serves(logits: torch.Tensor, softcap: bool, stats: bool) -> bool:
    """Whether the native route takes these logits (the caller has checked the compiled route would):
    decided by dtype, flags and the switch only."""
    return (logits.dtype in NATIVE_DTYPES and not softcap and not stats and enabled()
            and logits.stride(-1) == 1 and library() is not None)


def _vec(t: torch.Tensor | None, dtype=torch.float32) -> torch.Tensor | None:
    return None if t is None else t.reshape(-1).to(dtype).contiguous()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def forward_rows(z: torch.Tensor, labels: torch.Tensor | None, mask: torch.Tensor | None, post: float,
                 lib: ctypes.CDLL | None = None) -> tuple[torch.Tensor | None, ...]:
    """Rows ``z`` [R, V] (unit stride along V, any row stride) -> (logp or None, entropy, lse, lse_lo),
    fp32 [R]; masked rows 0."""
    lib = lib or library()
    rows, vocab = z.shape
    outs = [torch.empty(rows, dtype=torch.float32) for _ in range(4)]
    lab = None if labels is None else _vec(labels, torch.int64)  # read for unmasked rows only
    msk = None if mask is None else _vec(mask, torch.bool)
    getattr(lib, f"cpu_rows_forward_{_SUFFIX[z.dtype]}")(
        z.data_ptr(), rows, vocab, z.stride(0) * z.element_size(), _ptr(lab), _ptr(msk), post,
        None if labels is None else outs[0].data_ptr(), *[o.data_ptr() for o in outs[1:]],
        torch.get_num_threads())
    return (None if labels is None else outs[0]), outs[1], outs[2], outs[3]


def backward_rows(z: torch.Tensor, out: torch.Tensor, labels, mask, lse, entropy, g, h, g_lse, lse_lo,
                  post: float, lib: ctypes.CDLL | None = None) -> None:
    """Write dL/dz of rows ``z`` [R, V] into ``out`` [R, V] (same dtype, unit stride along V; may be ``z``
    itself); the per-row vectors [R] as in ``torch_rows.rows_backward``."""
    lib = lib or library()
    rows, vocab = z.shape
    lab = None if labels is None else _vec(labels, torch.int64)  # read for unmasked rows only
    msk = None if mask is None else _vec(mask, torch.bool)
    vecs = [_vec(t) for t in (lse, lse_lo, entropy, g, h, g_lse)]
    getattr(lib, f"cpu_rows_backward_{_SUFFIX[z.dtype]}")(
        z.data_ptr(), out.data_ptr(), rows, vocab, z.stride(0) * z.element_size(),
        out.stride(0) * out.element_size(), _ptr(lab), _ptr(msk), *[v.data_ptr() for v in vecs], post,
        torch.get_num_threads())
