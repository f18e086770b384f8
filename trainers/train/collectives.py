"""Every collective the training loop and evaluation run, each with the device it runs on.

Under NCCL (Ray Train with GPUs) a tensor collective accepts only tensors on the rank's CUDA
device, and the object collectives stage their pickled bytes on the current CUDA device. Each
helper takes the engine's device explicitly, so a CPU tensor never reaches NCCL and the mixed
CPU/GPU code is here alone. Without a process group (one process) they return their input.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist


def all_reduce(tensor: torch.Tensor, device: torch.device, op: str = "sum") -> torch.Tensor:
    """`tensor` reduced over all ranks (op: sum, min or max), on `device`. Every rank calls."""
    tensor = tensor.to(device)
    if _distributed():
        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        dist.all_reduce(tensor, op=ops[op])
    return tensor


def all_gather_objects(value: Any, device: torch.device) -> list[Any]:
    """Every rank's `value`, in rank order (picklable objects). Every rank calls."""
    if not _distributed():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    with _current(device):
        dist.all_gather_object(out, value)
    return out


def from_rank0(value: Any, device: torch.device) -> Any:
    """Rank 0's `value` on every rank (a picklable object). Every rank calls."""
    if not _distributed():
        return value
    box = [value]
    with _current(device):
        dist.broadcast_object_list(box, src=0, device=device)
    return box[0]


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _current(device: torch.device):
    """`device` as the current CUDA device for an object collective (NCCL stages the pickled
    bytes there); nothing to set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
