"""torchrun support: environment detection, process group, DDP wrapping, rank-0-only output.

Launched by ``torchrun --nproc_per_node N -m saq train ...`` the environment holds RANK,
LOCAL_RANK and WORLD_SIZE. With WORLD_SIZE > 1 ``setup`` initializes the default process group
(nccl on CUDA, gloo on CPU), binds each rank to cuda:LOCAL_RANK, and the loop wraps the model in
DistributedDataParallel. Only rank 0 prints, draws progress bars, writes metrics, plots and
checkpoints.

SAQ under DDP: pass 1 (the ascent) runs its forward and backward inside ``model.no_sync()`` (DDP
arms the all-reduce at forward time), so no gradient
all-reduce happens there and every replica perturbs with its own local gradient, as the
reference code does. Pass 2 all-reduces as usual; the perturbed small
parameters are restored from copies that are identical on every rank, so replicas stay in sync.
"""
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .config import ConfigError

__all__ = ["DistEnv", "detect", "setup", "cleanup", "wrap_ddp", "unwrap", "all_reduce_sum",
           "broadcast_buffers", "barrier", "print0", "resolve_device"]


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank among world_size processes, local_rank on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect() -> DistEnv:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (torchrun's variables); defaults for a plain run."""
    def env(name: str, default: int) -> int:
        v = os.environ.get(name)
        return int(v) if v not in (None, "") else default

    return DistEnv(rank=env("RANK", 0), world_size=env("WORLD_SIZE", 1),
                   local_rank=env("LOCAL_RANK", 0))


def resolve_device(choice: str, env: DistEnv) -> torch.device:
    """"auto" -> cuda if available else cpu; "cuda" under torchrun -> cuda:LOCAL_RANK.

    Raises ConfigError (a ValueError) for cuda on a machine without a CUDA device.
    """
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: this torch build or machine has no CUDA device; "
                               "use --device cpu (or auto)")
        if choice == "cuda":
            choice = f"cuda:{env.local_rank if env.distributed else torch.cuda.current_device()}"
    return torch.device(choice)


def setup(device: torch.device, env: Optional[DistEnv] = None) -> DistEnv:
    """Initialize the default process group when WORLD_SIZE > 1 (nccl for CUDA, gloo for CPU);
    a no-op for a single process or when a group already exists. Sets the current CUDA device."""
    env = env or detect()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if env.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kw = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size, **kw)
    return env


def cleanup() -> None:
    """Destroy the process group if this module's setup created one (or any is active)."""
    if dist.is_available() and dist.is_initialized():
        # Wait for every rank first: a rank that tears down gloo while a peer still talks to it
        # aborts the peer ("terminate called without an active exception", seen in CI).
        dist.barrier()
        dist.destroy_process_group()


def wrap_ddp(model: torch.nn.Module, device: torch.device, env: DistEnv) -> torch.nn.Module:
    """DistributedDataParallel(model) when distributed, else model unchanged."""
    if not env.distributed:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place when a process group is active; returns t."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank, in place. DDP does
    this at the start of each training forward; calling it before evaluation makes every rank
    evaluate the very model rank 0 checkpoints."""
    if dist.is_available() and dist.is_initialized():
        for b in model.buffers():
            dist.broadcast(b, src=0)


def barrier() -> None:
    """dist.barrier() when a process group is active."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def print0(*args, env: Optional[DistEnv] = None, **kw) -> None:
    """print on rank 0 only (flushes)."""
    if (env or detect()).is_main:
        print(*args, **kw, flush=True)
