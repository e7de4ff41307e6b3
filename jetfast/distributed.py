"""Running under torchrun: process-group set-up, rank helpers and the collectives jetfast uses.

A plain ``python`` start (``WORLD_SIZE`` unset or 1) is one process and every helper
here is then a no-op; under torchrun the backend is NCCL on GPUs and gloo on CPUs.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup_distributed() -> tuple[int, int, int, torch.device]:
    """Return ``(rank, world_size, local_rank, device)``; initialise torch.distributed under torchrun.

    The device is CUDA (this process's local rank) when available, else the CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    if world_size > 1:
        if not dist.is_initialized():
            # With GPUs, NCCL for CUDA tensors (DDP) and gloo for the CPU scalars the trainers sum and
            # share (losses, item counts, scores): NCCL alone refuses CPU tensors.
            dist.init_process_group(backend="cpu:gloo,cuda:nccl" if use_cuda else "gloo")
        rank, world_size = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return rank, world_size, local_rank, device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main() -> bool:
    """True on rank 0 (or when not distributed): the process that writes files and prints."""
    return dist.get_rank() == 0 if is_distributed() else True


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (a copy; identity when not distributed)."""
    if is_distributed():
        values = values.clone()
        dist.all_reduce(values)
    return values


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks (identity when not distributed)."""
    if is_distributed():
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def broadcast_from_main(value: float) -> float:
    """Rank 0's ``value`` on every rank (``value`` itself when not distributed): for a number that
    every rank would compute alike, computed once."""
    if not is_distributed():
        return value
    shared = torch.tensor([value], dtype=torch.float64)
    dist.broadcast(shared, src=0)
    return float(shared.item())


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts buffers at the start of each forward, so after the last training step
    each rank still holds statistics updated by its own last batch.
    """
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def cleanup() -> None:
    """Tear down the process group, if one was set up."""
    if is_distributed():
        dist.destroy_process_group()
