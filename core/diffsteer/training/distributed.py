"""Data parallelism through torch.distributed: process info, gradient averaging, broadcasts.

Launch with ``torchrun --nproc-per-node N script.py``. The trainer joins the process group that
torchrun's environment describes (gloo on CPU, nccl on CUDA) unless the script already did.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist

# Gradients are averaged in flat buckets of at most this many elements: one collective per bucket
# instead of one per parameter, without doubling the memory of a large model at once.
_BUCKET_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class ProcessInfo:
    """Where this process stands in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only the main process writes checkpoints, exports and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_with_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: Optional[torch.device] = None, timeout_s: float = 600.0) -> ProcessInfo:
    """Join the process group torchrun describes, if any and not joined yet; return this process's place.

    The backend is nccl for a CUDA ``device`` (pin each process to ``cuda:LOCAL_RANK`` first), gloo
    otherwise. Without torchrun (no ``WORLD_SIZE`` > 1) this is a single process and nothing is joined.
    """
    if dist.is_available() and dist.is_initialized():
        return process_info()
    if not launched_with_torchrun():
        return ProcessInfo()
    backend = "nccl" if device is not None and torch.device(device).type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return process_info()


def process_info() -> ProcessInfo:
    if not (dist.is_available() and dist.is_initialized()):
        return ProcessInfo()
    return ProcessInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def average_gradients(params: Sequence[torch.nn.Parameter], world_size: int) -> None:
    """Replace each gradient by its mean over all processes (every ``param.grad`` must be set)."""
    if world_size == 1:
        return
    bucket: list[torch.nn.Parameter] = []
    size = 0
    for p in params:
        bucket.append(p)
        size += p.numel()
        if size >= _BUCKET_ELEMENTS:
            _reduce_bucket(bucket, world_size)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(bucket, world_size)


def _reduce_bucket(params: list[torch.nn.Parameter], world_size: int) -> None:
    grads = [p.grad for p in params]
    assert all(g is not None for g in grads)
    # Buckets must be one dtype/device for the flat view; mixed ones go one by one.
    if len({(g.dtype, g.device) for g in grads}) > 1:  # type: ignore[union-attr]
        for g in grads:
            dist.all_reduce(g)  # type: ignore[arg-type]
            g.div_(world_size)  # type: ignore[union-attr]
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # type: ignore[union-attr]
    dist.all_reduce(flat)
    flat.div_(world_size)
    offset = 0
    for g in grads:
        n = g.numel()  # type: ignore[union-attr]
        g.copy_(flat[offset : offset + n].view_as(g))  # type: ignore[union-attr]
        offset += n


def average_scalar(value: float, world_size: int, device: torch.device) -> float:
    """The mean of a float over all processes."""
    if world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / world_size


def broadcast_parameters(params: Iterable[torch.nn.Parameter], world_size: int) -> None:
    """Copy the main process's values into every process (same start even if inits differed)."""
    if world_size == 1:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def check_divisible(batch_size: int, world_size: int) -> None:
    if batch_size % world_size:
        raise ValueError(
            f"batch_size={batch_size} (global rows per micro-step) must divide evenly over "
            f"{world_size} processes"
        )
