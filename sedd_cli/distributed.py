"""`sedd train` under torchrun: torchrun's environment read once, and the process group started from it.

torchrun (`torchrun --nproc_per_node N --no-python sedd train ...`) starts one process per rank and tells
each, in environment variables, its RANK, LOCAL_RANK, WORLD_SIZE and where rank 0 listens (MASTER_ADDR,
MASTER_PORT). `TorchrunSettings` is the one reader of those variables (the library reads none);
`start_ranks` starts the process group (NCCL on CUDA, one GPU per rank at cuda:LOCAL_RANK; gloo on a CPU)
and returns the `Ranks` the trainer takes. A plain `sedd train` has no WORLD_SIZE and runs on one device.
"""
from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import UsageError


class TorchrunSettings(BaseSettings):
    """What torchrun (torch.distributed.run) tells each process it starts."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=True, env_ignore_empty=True)

    RANK: int = 0
    LOCAL_RANK: int = 0
    WORLD_SIZE: int = 1
    MASTER_ADDR: str | None = None
    MASTER_PORT: int | None = None
    TORCHELASTIC_RESTART_COUNT: int = 0
    TORCHELASTIC_USE_AGENT_STORE: bool = False

    @property
    def launched(self) -> bool:
        """Started by torchrun (or another launcher that sets the same variables) with more than one rank."""
        return self.WORLD_SIZE > 1


def device_for_rank(device: str, launch: TorchrunSettings) -> str:
    """The device of this rank: cuda:LOCAL_RANK for cuda (or auto on a CUDA host), else cpu."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if device != "cuda":
            raise UsageError(f"under torchrun every rank takes the GPU of its LOCAL_RANK; pass --device cuda, "
                             f"not {device}")
        return f"cuda:{launch.LOCAL_RANK}"
    return device


def attempt_store(launch: TorchrunSettings):
    """The rendezvous store at MASTER_ADDR:MASTER_PORT (torchrun's agent hosts it, else rank 0), its keys under a
    prefix of this restart attempt: a group torchrun restarts never reads the addresses its previous attempt
    left in the store (with them, restarted ranks hung or failed to connect in our tests)."""
    from datetime import timedelta

    import torch.distributed as dist

    store = dist.TCPStore(launch.MASTER_ADDR, launch.MASTER_PORT, launch.WORLD_SIZE,
                          is_master=not launch.TORCHELASTIC_USE_AGENT_STORE and launch.RANK == 0,
                          timeout=timedelta(minutes=30))
    return dist.PrefixStore(f"sedd-train/attempt-{launch.TORCHELASTIC_RESTART_COUNT}", store)


def start_ranks(launch: TorchrunSettings, device: str):
    """Start the process group of this rank and return (its Ranks, its device)."""
    import torch
    import torch.distributed as dist

    from sedd_core.training.distributed import Ranks

    if launch.MASTER_ADDR is None or launch.MASTER_PORT is None:
        raise UsageError(f"WORLD_SIZE is {launch.WORLD_SIZE} but MASTER_ADDR or MASTER_PORT is not set: start "
                         "data-parallel runs with torchrun (docs/training.md), or unset WORLD_SIZE for one device")
    device = device_for_rank(device, launch)
    cuda = device.startswith("cuda")
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend=backend, store=attempt_store(launch), rank=launch.RANK,
                            world_size=launch.WORLD_SIZE)
    # the per-step stop flag and small objects travel on the CPU, never through the GPU's stream
    control = dist.new_group(backend="gloo") if cuda else None
    ranks = Ranks(rank=launch.RANK, world_size=launch.WORLD_SIZE, local_rank=launch.LOCAL_RANK, backend=backend,
                  group=None, control_group=control)
    return ranks, device


def stop_ranks(ranks) -> None:
    import torch.distributed as dist

    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()
