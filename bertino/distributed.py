"""torchrun / DDP plumbing: environment detection, process-group set-up, and a gather that carries gradients.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE. Without them we run as one process and nothing here is used.
Backend: nccl when CUDA is available, gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup() -> tuple[DistInfo, torch.device]:
    """Join the process group if launched by torchrun; pick this process's device."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return DistInfo(), device
    info = DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), int(os.environ["WORLD_SIZE"]))
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
        device = torch.device("cuda", info.local_rank)
        dist.init_process_group("nccl", timeout=datetime.timedelta(minutes=30))
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=30))
    return info, device


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) when no process group is running."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def gather_with_grad(t: torch.Tensor) -> list[torch.Tensor]:
    """All-gather t (N, ...) from every rank → W tensors (N, ...); gradients flow back to each rank's own t.

    Backward sums over ranks the gradients every rank's loss sends to this rank's slice.
    """
    from torch.distributed.nn.functional import all_gather

    return list(all_gather(t.contiguous()))


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks (for logging); identity in one process."""
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def all_ranks_agree(flags: list[bool], device: torch.device) -> list[bool]:
    """Element-wise AND of every rank's flags, so all ranks take the same decision (identity in one process).

    note: a collective, so every rank must call it at the same point of every step."""
    if not (dist.is_available() and dist.is_initialized()):
        return flags
    t = torch.tensor(flags, dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return [bool(v) for v in t.tolist()]


def gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order; [obj] in one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
