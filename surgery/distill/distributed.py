"""torch.distributed helpers: torchrun launches N processes; data is sharded; rank 0 writes.

Gradients are averaged with one all-reduce per parameter after backward (what DDP does, without
wrapping the model: block-wise mode calls the mixers directly, not the model's forward).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    size: int = 1
    started_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_from_env(device: torch.device | None = None) -> World:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, MASTER_ADDR/PORT), if any.

    gloo on CPU, nccl on CUDA. A single process (no WORLD_SIZE, or 1) returns ``World()``.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or not dist.is_available():
        return World()
    if dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    backend = "nccl" if device is not None and torch.device(device).type == "cuda" else "gloo"
    dist.init_process_group(backend)
    return World(dist.get_rank(), dist.get_world_size(), started_here=True)


def shutdown(world: World) -> None:
    if world.started_here and dist.is_initialized():
        dist.destroy_process_group()


def all_mean(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """Mean of ``tensor`` over all processes (returns it unchanged in a single process)."""
    if not world.distributed:
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor / world.size


def average_gradients(parameters, world: World) -> None:
    """Average every parameter's gradient over all processes, in one flat all-reduce."""
    if not world.distributed:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world.size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()
