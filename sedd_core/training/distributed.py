"""Data parallelism for the trainer: which rank this process is, its share of the global batch, and the few
collectives a step needs beyond DistributedDataParallel's own.

The command line starts the process group (it reads torchrun's environment; the library reads none) and
hands a `Ranks` down. A plain run is `Ranks()`: one rank, no process group, no collective. Every rank draws
the whole global batch from the same seeded generators and keeps its own rows (`Ranks.rows`), so the batch
of a step is the same whatever the number of ranks.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .errors import TrainingError


@dataclass(frozen=True)
class Ranks:
    """This process among the ranks of a data-parallel run. `group` carries DistributedDataParallel and the
    loss averages (NCCL on CUDA, gloo on a CPU; None: the default group); `control_group` the per-step stop
    flag and small Python objects, always on the CPU (gloo; None: `group`)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    group: Any = None
    control_group: Any = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes checkpoints, metrics, samples and pushes."""
        return self.rank == 0

    def describe(self) -> str:
        if not self.distributed:
            return "world_size=1 (one process)"
        return f"world_size={self.world_size} (rank {self.rank}, {self.backend})"

    def rows(self, batch: int) -> slice:
        """This rank's rows of a global batch of `batch` rows (a multiple of world_size)."""
        share = batch // self.world_size
        return slice(self.rank * share, (self.rank + 1) * share)

    # ---- collectives (each a no-op on one rank; every rank must call them in the same order) ------------

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of `tensor` over the ranks (a new tensor)."""
        if not self.distributed:
            return tensor
        import torch.distributed as dist

        out = tensor.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out / self.world_size

    def max_int(self, value: int) -> int:
        """The largest of the ranks' `value`s (the stop flag: any rank's signal stops them all)."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        flag = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control_group or self.group)
        return int(flag.item())

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable), in rank order."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.control_group or self.group)
        return out

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier(group=self.control_group or self.group)


def micro_batch(batch_size: int, world_size: int, accum: int) -> int:
    """Rows per rank per micro-batch of a global batch of `batch_size` rows; refuses a batch that does not
    divide into `world_size` ranks x `accum` micro-batches."""
    parts = world_size * accum
    if batch_size % parts:
        lower, upper = batch_size // parts * parts, (batch_size // parts + 1) * parts
        options = f"{lower} or {upper}" if lower else f"{upper}"
        raise TrainingError(
            f"training.batch_size={batch_size} is the global batch of one optimiser step and must divide into "
            f"{world_size} rank(s) x training.accum={accum} micro-batch(es) = {parts} equal parts; set "
            f"training.batch_size to a multiple of {parts} (e.g. {options}), or change training.accum or the "
            "number of ranks")
    return batch_size // parts


def replica_digest(tensors: Iterable[torch.Tensor]) -> str:
    """sha256 of the bytes of `tensors` in order: equal on two ranks exactly when their tensors are."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
