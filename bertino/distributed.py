"""torchrun / DDP plumbing: environment detection, process-group set-up, collectives that can be interrupted, and
a gather that carries gradients.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE. Without them we run as one process and nothing here is used.
Backend: nccl when CUDA is available, gloo on CPU.

A rank that stops, crashes or is lost leaves the others waiting in a collective. So the collectives bertino issues
itself (barrier, agreement, logging means, gathering objects) are started asynchronously and polled: a wait longer
than `train.ddp_timeout` seconds ends the process with one error line (exit code 2), and a SIGTERM received while
waiting (noted by `signal_received`) ends it `STOP_GRACE` seconds later (exit code 128 + the signal) even if the
other ranks never arrive; torchrun then ends the rest of the job. DDP's own all-reduce
inside a backward cannot be polled; the process group's timeout bounds it: `train.ddp_timeout` plus a margin
(`PG_TIMEOUT_MARGIN`), so that in a polled wait bertino's own message comes first, not the backend's exception.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


STOP_GRACE = 10.0  # seconds a SIGTERM-ed rank still waits for the others in a collective
PG_TIMEOUT_MARGIN = 30.0  # the process group's own timeout exceeds train.ddp_timeout by this much (seconds)
_timeout = 1800.0
_signal: tuple[int, float] | None = None  # (signum, when) of a stop signal received during the run


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


def setup(timeout: float = 1800.0) -> tuple[DistInfo, torch.device]:
    """Join the process group if launched by torchrun; pick this process's device. `timeout`: seconds any wait
    for the other ranks may last (`train.ddp_timeout`)."""
    global _timeout
    _timeout = float(timeout)
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return DistInfo(), device
    info = DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), int(os.environ["WORLD_SIZE"]))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
        device = torch.device("cuda", info.local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=_timeout + PG_TIMEOUT_MARGIN))
    return info, device


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) when no process group is running."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _running() -> bool:
    return dist.is_available() and dist.is_initialized()


def signal_received(signum: int) -> None:
    """A stop signal came (plumbing/stop_signal.py): a wait for the other ranks gives up STOP_GRACE s later."""
    global _signal
    _signal = (signum, time.monotonic())


def _wait(work, what: str) -> None:
    """Poll an asynchronous collective until it completes: bounded by the timeout, and by a stop signal.

    Giving up leaves a collective in flight that will never complete, and tearing the process group down would
    wait for it: so this process says why and ends at once (`os._exit`), and torchrun ends the others."""
    start = time.monotonic()
    while not work.is_completed():
        now = time.monotonic()
        if now - start > _timeout:
            # the bound, not the measured wait: a loaded machine oversleeps the poll (5.6 s would print "6 s")
            _give_up(f"error: rank {dist.get_rank()} waited {_timeout:g} s for the other ranks ({what}, "
                     f"train.ddp_timeout={_timeout:g}): a rank stopped, crashed or is lost", 2)
        if _signal is not None and now - max(_signal[1], start) > STOP_GRACE:
            _give_up(f"bertino: rank {dist.get_rank()} got signal {_signal[0]} while waiting for the other ranks "
                     f"({what}) and they did not come within {STOP_GRACE:g} s: stopping without a checkpoint",
                     128 + _signal[0])
        time.sleep(0.002)
    work.wait()


def _give_up(message: str, code: int) -> None:
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def barrier(what: str = "a barrier") -> None:
    if _running():
        _wait(dist.barrier(async_op=True), what)


def all_ranks_agree(flags: list[bool], device: torch.device) -> list[bool]:
    """Element-wise AND of every rank's flags, so all ranks take the same decision (identity in one process).

    note: a collective, so every rank must call it at the same point of every step."""
    if not _running():
        return flags
    t = torch.tensor(flags, dtype=torch.int32, device=device)
    _wait(dist.all_reduce(t, op=dist.ReduceOp.MIN, async_op=True), "deciding a step together")
    return [bool(v) for v in t.tolist()]


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks (for logging); identity in one process."""
    if _running():
        t = t.clone()
        _wait(dist.all_reduce(t, async_op=True), "averaging the logged losses")
        t /= dist.get_world_size()
    return t


def gather_objects(obj, device: torch.device | str = "cpu") -> list:
    """Every rank's `obj` (JSON data), in rank order; [obj] in one process."""
    if not _running():
        return [obj]
    data = torch.frombuffer(bytearray(json.dumps(obj).encode("utf-8")), dtype=torch.uint8).to(device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    _wait(dist.all_gather(sizes, torch.tensor([data.numel()], device=device), async_op=True), "exchanging data")
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    parts = [torch.zeros(longest, dtype=torch.uint8, device=device) for _ in sizes]
    _wait(dist.all_gather(parts, padded, async_op=True), "exchanging data")
    return [json.loads(p[: int(s.item())].cpu().numpy().tobytes()) for p, s in zip(parts, sizes)]


def gather_with_grad(t: torch.Tensor) -> list[torch.Tensor]:
    """All-gather t (N, ...) from every rank → W tensors (N, ...); gradients flow back to each rank's own t.

    Backward sums over ranks the gradients every rank's loss sends to this rank's slice.
    """
    from torch.distributed.nn.functional import all_gather

    return list(all_gather(t.contiguous()))
