"""Distributed helpers (torchrun sets WORLD_SIZE, RANK, LOCAL_RANK) and each process's share of an epoch."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world <= 1:
        return Dist(device=torch.device("cuda" if cuda else "cpu"))
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if not cuda:  # share the CPU between the processes
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    return Dist(rank, world, local, torch.device(f"cuda:{local}" if cuda else "cpu"))


def _barrier(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


def _all_mean(d: Dist, values: list[float]) -> list[float]:
    if d.world <= 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=d.device)  # nccl reduces GPU tensors only
    dist.all_reduce(t)
    return (t / d.world).tolist()


def _every_rank_has(d: Dist, n: int) -> bool:
    """Whether every process's batch holds an image. A batch can be empty (all its images
    undecodable); DDP's gradient all-reduce would then wait forever for that process, so under DDP
    the processes agree first and skip the step together."""
    if d.world <= 1:
        return n > 0
    import torch.distributed as dist

    t = torch.tensor([1 if n > 0 else 0], dtype=torch.int32, device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def epoch_indices(n: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[int]:
    """This process's share of epoch `epoch`'s order: a permutation fixed by (seed, epoch), padded by
    wrapping so every process gets the same number of images."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    per = math.ceil(n / world)
    order = (order * math.ceil(per * world / n))[: per * world]
    return order[rank::world]
