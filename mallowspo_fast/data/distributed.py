"""Rank-0-first preprocessing under torch.distributed (a no-op in a single process)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

_state = threading.local()


def _dist_world() -> tuple[int, int]:
    try:
        import torch.distributed as dist
    except ImportError:  # torch built without distributed support
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Whether this process is the main one.

    Returns:
        True on global rank 0, or when torch.distributed is not initialised.
    """
    return _dist_world()[0] == 0


@contextlib.contextmanager
def main_process_first(desc: str = "preprocessing") -> Iterator[None]:
    """Run the body on rank 0 first, then on the other ranks.

    Rank 0 fills the `datasets` cache; the other ranks wait at a barrier and then read the cache
    instead of recomputing it. Nested uses are no-ops, so library functions can use it internally while
    a caller also wraps a larger block. ``desc`` only names the block for readers of stack traces.

    Args:
        desc: a name for the block.

    Returns:
        A context manager (a no-op in a single process).

    Examples:
        >>> with main_process_first("my preprocessing"):
        ...     ds = ds.map(my_function)         # rank 0 fills the cache, the others read it
    """
    depth = getattr(_state, "depth", 0)
    rank, world = _dist_world()
    if depth > 0 or world == 1:
        _state.depth = depth + 1
        try:
            yield
        finally:
            _state.depth = depth
        return
    import torch.distributed as dist

    _state.depth = 1
    try:
        if rank != 0:
            dist.barrier()
        yield
    finally:
        _state.depth = 0
        if rank == 0:
            # Reached on error too: the other ranks must not wait forever for rank 0.
            dist.barrier()
