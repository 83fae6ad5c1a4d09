"""One process per device under ``torchrun`` (NCCL on GPUs, gloo on CPUs), or a single process:
sums, broadcasts, shards and the DDP wrapper, all no-ops without a process group."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .cli import resolve_device

__all__ = ["Distributed", "init_distributed"]


@dataclass
class Distributed:
    """Where this process runs and who its peers are (world_size 1: no process group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0 alone prints and writes files."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def _comm(self, t: torch.Tensor) -> torch.Tensor:
        # NCCL moves CUDA tensors only; gloo CPU tensors only
        return t.to(self.device) if self.device.type == "cuda" else t.cpu()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over all ranks (a new tensor on t's device; t itself without a group)."""
        if not self.active:
            return t
        c = self._comm(t.clone())
        torch.distributed.all_reduce(c)
        return c.to(t.device)

    def broadcast(self, value: float) -> float:
        """Rank 0's ``value`` on every rank (for clock-based decisions: all ranks agree)."""
        if not self.active:
            return value
        t = self._comm(torch.tensor([value], dtype=torch.float64))
        torch.distributed.broadcast(t, src=0)
        return float(t)

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def shard(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of ``t`` (sizes differ by at most one between ranks)."""
        return t.tensor_split(self.world_size)[self.rank] if self.active else t

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` itself alone; under a process group DistributedDataParallel over it, with
        batch norms turned into SyncBatchNorm on CUDA (gloo/CPU keeps per-rank statistics:
        SyncBatchNorm runs on GPUs only)."""
        if not self.active:
            return model
        if self.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            return torch.nn.parallel.DistributedDataParallel(model, device_ids=[self.device])
        return torch.nn.parallel.DistributedDataParallel(model)


def init_distributed(device: str = "auto") -> Distributed:
    """Join the process group that ``torchrun`` describes in the environment (RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), or run alone when it describes none.

    ``device``: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N".  Under torchrun each
    rank takes cuda:LOCAL_RANK with NCCL; on the CPU the ranks use gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        if world > 1:
            if local >= torch.cuda.device_count():
                raise SystemExit(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices: "
                                 "start at most one process per GPU (torchrun --nproc-per-node)")
            dev = torch.device("cuda", local)
        elif dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        torch.distributed.init_process_group(backend, rank=rank, world_size=world, **kwargs)
    return Distributed(rank=rank, world_size=world, local_rank=local, device=dev)
