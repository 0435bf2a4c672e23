"""Process-group setup for one process without a launcher, the ``deepspeed`` launcher and torchrun.

On machines without CUDA, DeepSpeed runs on its CPU accelerator with the gloo backend. A control group
(always gloo) carries small host-side agreements between ranks, such as "a rank received SIGTERM",
without synchronising the accelerator stream.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any

_DEFAULTS = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_environment() -> None:
    """Environment that must be in place before DeepSpeed is imported.

    - ``DS_ACCELERATOR=cpu`` when CUDA is absent (DeepSpeed would otherwise probe and warn).
    - Rendezvous defaults for a single process started without a launcher (a free port).
    """
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        for key, value in _DEFAULTS.items():
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", os.environ.get("RANK", "0"))
    # Tokenizers' thread pool and forked DataLoader / datasets workers do not mix.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass
class DistState:
    rank: int
    local_rank: int
    world_size: int
    device: Any  # torch.device
    control_group: Any  # gloo process group for host-side flags

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_STATE: DistState | None = None


def init_distributed(timeout_s: float | None = None) -> DistState:
    """Initialise torch.distributed through DeepSpeed once (nccl on CUDA, gloo on CPU).

    ``timeout_s`` bounds how long a collective waits for the other ranks (torch's default when None): a
    rank that died or hangs then fails the others instead of blocking them forever."""
    global _STATE
    if _STATE is not None:
        return _STATE
    prepare_environment()
    import deepspeed
    import torch
    import torch.distributed as dist

    on_cuda = torch.cuda.is_available()
    if not on_cuda:
        # DeepSpeed's CPU backend compiles a shared-memory all-reduce extension at start-up (minutes on a
        # small machine). It only speeds up inference all-reduce; gloo carries everything the trainer uses.
        compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
        if isinstance(compatible, dict) and os.environ.get("MALLOWSPO_FAST_DS_SHM") != "1":
            compatible["deepspeed_shm_comm"] = False
    kwargs = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if on_cuda else "gloo", **kwargs)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if on_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    control = dist.new_group(backend="gloo", **kwargs) if on_cuda else dist.group.WORLD
    _STATE = DistState(rank, local_rank, world, device, control)
    return _STATE


def any_rank(flag: bool, state: DistState) -> bool:
    """True when ``flag`` is set on at least one rank (host-side all-reduce on the control group)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if state.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=state.control_group)
    return bool(t.item())


def max_over_ranks(value: float, state: DistState) -> float:
    """The largest ``value`` over ranks (host-side, on the control group)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    if state.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=state.control_group)
    return float(t.item())


def barrier(state: DistState) -> None:
    import torch.distributed as dist

    if state.world_size > 1:
        dist.barrier(group=state.control_group)


def broadcast_object(obj: Any, state: DistState) -> Any:
    """Rank 0's ``obj`` on every rank."""
    import torch.distributed as dist

    if state.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=state.control_group)
    return box[0]
