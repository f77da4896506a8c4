"""Processes the plain way: RANK / LOCAL_RANK / WORLD_SIZE from torchrun, one explicit all-reduce (no DDP wrapper)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """RANK / LOCAL_RANK / WORLD_SIZE from torchrun; nccl on GPUs, gloo on CPU; single process otherwise."""
    if "RANK" not in os.environ:
        return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, device)


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def sum_over_ranks(counts: dict[str, float], d: Dist) -> dict[str, float]:
    """Counts summed over ranks; each rank may hold different keys (e.g. critic_failed_timeout on one only)."""
    if d.world == 1:
        return dict(counts)
    every = [None] * d.world
    dist.all_gather_object(every, counts)
    total: dict[str, float] = {}
    for rank_counts in every:
        for k, v in rank_counts.items():
            total[k] = total.get(k, 0.0) + v
    return total
