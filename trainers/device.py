"""Where a process computes, and in which dtype: one decision for every model that runs.

`compute_device` is the entry point, used by prediction, feature extraction, `ferry analyze` and
standalone evaluation (training's device is DeepSpeed's engine's). `bind_device` pins a Ray Train
worker to its GPU before any collective; `on_device` moves a collated batch there.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from trainers.config import RunSpec
from trainers.model import torch_dtype

log = logging.getLogger("ferry.device")


def compute_device(spec: RunSpec) -> tuple[torch.device, torch.dtype]:
    """The device and dtype this process runs the run's model in.

    A run that asks for GPUs (scaling.gpus_per_worker > 0) computes on this process's current
    CUDA device in the training precision's dtype (bf16/fp16; fp32 stays fp32). Without GPUs:
    the CPU in float32. A run that asks for GPUs in a process that sees none (a CPU-only torch
    build, or a driver on a node without GPUs, e.g. `ferry analyze`) falls back to the CPU in
    float32 and logs why: the work still completes, slowly, instead of failing after the data
    was read.
    """
    if spec.scaling.gpus_per_worker <= 0:
        return torch.device("cpu"), torch.float32
    if not torch.cuda.is_available():
        log.warning(
            "scaling.gpus_per_worker=%g but this process sees no CUDA device (torch %s, "
            "CUDA build: %s): computing on the CPU in float32. Install a CUDA build of torch "
            "on the GPU nodes, or set scaling.gpus_per_worker=0.",
            spec.scaling.gpus_per_worker,
            torch.__version__,
            torch.version.cuda or "no",
        )
        return torch.device("cpu"), torch.float32
    return torch.device("cuda", torch.cuda.current_device()), compute_dtype(spec)


def compute_dtype(spec: RunSpec) -> torch.dtype:
    """The dtype models compute in for this run (on the driver too, where no GPU may be):
    the training precision's on GPU runs, float32 on CPU runs."""
    if spec.scaling.gpus_per_worker <= 0:
        return torch.float32
    return torch_dtype(spec.train.precision)


def bind_device() -> torch.device:
    """This Ray Train worker's device, made the current CUDA device. Object collectives
    (all_gather_object, broadcast_object_list) stage their bytes on the *current* CUDA device
    under NCCL, which is cuda:0 unless set: every rank of a node would then use GPU 0. Ray Train
    2.60 already sets it around the worker function (TorchConfigContextManager); setting it here
    again keeps the guarantee where the worker function runs, whatever Ray version runs it."""
    import ray.train.torch

    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def on_device(batch: dict[str, Any], device) -> dict[str, Any]:
    """A collated batch with its tensors on `device` (the collate functions build them on the
    CPU; DeepSpeed's engine does not move its inputs)."""
    return {
        k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
    }
