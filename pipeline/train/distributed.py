"""Process groups, devices, seeds and the small collectives of the trainer. One process is world size 1."""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run. ``launched``: started by ``torchrun`` and in a process group, so the
    student is wrapped for data parallelism (DDP, or FSDP2 with ``fsdp: true``) even on one rank: a one-GPU
    ``torchrun --nproc-per-node 1`` runs the code path of an 8-GPU node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(timeout_minutes: float = 30.0) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (one rank included); a plain
    process is world size 1 with no group. ``timeout_minutes`` bounds every collective (raise it when a
    checkpoint save or the first step is slow). On CUDA it sets TF32 for the fp32 matmuls that remain and, unless
    the user set ``PYTORCH_CUDA_ALLOC_CONF``, expandable segments (less fragmentation with varying lengths)."""
    if torch.cuda.is_available():
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before the first allocation
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if "LOCAL_RANK" not in os.environ:  # not started by torchrun
        return DistInfo()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)  # before the group: NCCL's communicators then bind to this rank's GPU
    if not dist.is_initialized():
        dist.init_process_group(backend=process_group_backend(torch.cuda.is_available()),
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, launched=True)


def process_group_backend(cuda: bool) -> str:
    """gloo on CPU; with GPUs NCCL for CUDA tensors and gloo for CPU ones. The trainer all-reduces small CPU
    tensors (the step's token counts, method sums, logged losses); a group with NCCL alone refuses them ("no
    backend type associated with device type cpu")."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def leave_distributed() -> None:
    """Destroy the process group ``setup_distributed`` joined, if any, before the process exits (its gloo/NCCL
    threads otherwise meet interpreter shutdown and can abort a finished run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device_for(info: DistInfo) -> torch.device:
    return torch.device(f"cuda:{info.local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def all_reduce_sum(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world_size > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_max(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world_size > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
