"""Several processes on one edit, through torch.distributed (launched by torchrun or accelerate).

Each rank owns a contiguous block of frame chunks. Per step all ranks draw the same keyframes
(same seed), exchange the keyframes' current latents (an all-reduce over a tensor in which each
rank filled only the keyframes it owns, so the sum is exact), run the same keyframe pass, and
propagate and write only their own chunks. The propagation batches are planned over the whole video,
so a batch that straddles two ranks' chunks runs on both: every rank's batches are those of one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vfx.stage import Shard


def local_device(device: torch.device) -> torch.device:
    """Under a launcher, each process of a node takes the GPU of its LOCAL_RANK."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls, device: torch.device) -> "Group":
        """The launcher's process group (WORLD_SIZE > 1), or a group of one."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(local_device(device))
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def chunks(self, total: int) -> range:
        return Shard(self.rank, self.world).units(total)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def combine(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum of every rank's `partial` (rows a rank does not own are zeros there)."""
        if self.world > 1:
            dist.all_reduce(partial, op=dist.ReduceOp.SUM)
        return partial
