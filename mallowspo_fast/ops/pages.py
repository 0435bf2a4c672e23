"""Transparent huge pages for the large CPU buffers the op writes once (the gradient of the logits).

A fresh [N, V] gradient on CPU is a new memory mapping: the kernel faults it in page by page while the
backward writes it, and with 4 KiB pages that costs more than the backward's arithmetic (N = 2048,
V = 32000, fp32: 64,000 faults; a fresh 250 MiB buffer took 60-80 ms to fill against 18-19 ms warm, and
24-27 ms with 2 MiB pages, on the 2-core machine of docs/cpu-performance.md). Linux maps a region with
2 MiB pages when asked with ``madvise(MADV_HUGEPAGE)`` before it is touched, if transparent huge pages
are enabled (``/sys/kernel/mm/transparent_hugepage/enabled`` is ``always`` or ``madvise``, the common
defaults). Nothing else changes: same bytes, same values, the pages are returned when the tensor is freed.

:func:`empty_like_huge` is ``torch.empty_like`` plus that advice for CPU tensors of at least
``MIN_BYTES``; everywhere else (other devices or systems, small tensors, THP ``never``,
``MALLOWSPO_FAST_HUGE_PAGES=0``) it is ``torch.empty_like``. PyTorch's own allocator does the same for
every allocation of a process started with ``THP_MEM_ALLOC_ENABLE=1``; the benchmarks' ``thp`` condition
gives the baselines that.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

import torch

HUGE_PAGES_ENV = "MALLOWSPO_FAST_HUGE_PAGES"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
THP_PAGE_SIZE = "/sys/kernel/mm/transparent_hugepage/hpage_pmd_size"
MADV_HUGEPAGE = 14  # linux/mman.h
# Below this a buffer holds too few whole huge pages to matter (and may sit in a shared heap arena).
MIN_BYTES = 8 * 2**20


@functools.lru_cache(maxsize=1)
def thp_mode() -> str | None:
    """The system's transparent-huge-page mode (``always``, ``madvise`` or ``never``), None where unknown;
    read once per process."""
    try:
        with open(THP_ENABLED) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


@functools.lru_cache(maxsize=1)
def _huge_page_size() -> int:
    try:
        with open(THP_PAGE_SIZE) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 2 * 2**20


@functools.lru_cache(maxsize=1)
def _madvise():
    """libc's madvise, or None (not Linux, no libc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def enabled() -> bool:
    """Whether huge pages are asked for: Linux with THP ``always``/``madvise`` and the switch not ``0``."""
    return (os.environ.get(HUGE_PAGES_ENV, "1").strip() != "0" and thp_mode() in ("always", "madvise")
            and _madvise() is not None)


def advise_huge(t: torch.Tensor) -> int:
    """Ask for huge pages on the whole huge pages inside ``t``'s storage; the bytes advised (0: not asked).
    Call it before anything is written into ``t``: pages already faulted in stay small."""
    if t.device.type != "cpu" or not enabled():
        return 0
    storage = t.untyped_storage()
    size = storage.nbytes()
    if size < MIN_BYTES:
        return 0
    page = _huge_page_size()
    start = (storage.data_ptr() + page - 1) // page * page
    end = (storage.data_ptr() + size) // page * page
    if end <= start or _madvise()(start, end - start, MADV_HUGEPAGE) != 0:
        return 0
    return end - start


def empty_like_huge(t: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like(t)``, asking for huge pages when :func:`advise_huge` applies."""
    out = torch.empty_like(t)
    advise_huge(out)
    return out
