"""`metrics.jsonl`: one strict-JSON object per logged step or evaluation, written by rank 0, resume-aware.

    {"step": 10, "epoch": 0.14, "lr": ..., "grad_norm": ..., "loss_scale": ..., "examples_per_sec": ...,
     "skipped_steps": 0, "loss/retrieval": ...}            a logging line (train.logging_steps)
    {"step": 250, "eval": {"768": {"dev": {"ndcg@10": ...}}}}      an evaluation
    {"step": 3, "task": "sts", "skipped": "non-finite loss", ...}  a skipped step
    {"step": 250, "event": "resumed", "checkpoint": "..."}          a resume

Each line is flushed as it is written, so a killed run keeps what it logged. Non-finite numbers are written as
null (jq and pandas read every line). A resumed run keeps the lines up to its checkpoint's step and drops the
later ones (they are trained and logged again), so the file reads as one run. A `mirror`
(plumbing/tensorboard_log.py's `TensorBoardLog`, for `train.report_to: ["tensorboard"]`) gets every record too.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .files import atomic_write


class MetricsLog:
    """Append-only JSON lines; a no-op on ranks other than 0 (`enabled=False`)."""

    def __init__(self, path: Path, enabled: bool, mirror=None):
        self.path, self.enabled, self.mirror = path, enabled, mirror if enabled else None

    def start(self, resumed_step: int | None, checkpoint: Path | None) -> None:
        """A fresh run starts an empty log; a resumed one keeps the lines up to its step (a killed run may have
        logged later steps, and a half-written last line) and marks the resume."""
        if not self.enabled:
            return
        kept = []
        if resumed_step is not None and self.path.exists():
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the line a kill cut short
                if isinstance(record, dict) and record.get("step", 0) <= resumed_step:
                    kept.append(line + "\n")
        atomic_write(self.path, "".join(kept))
        if self.mirror is not None:
            self.mirror.start(resumed_step)
        if resumed_step is not None:
            self.write({"step": resumed_step, "event": "resumed", "checkpoint": str(checkpoint)})

    def write(self, record: dict) -> None:
        if self.enabled:
            record = _finite_or_null(record)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if self.mirror is not None:
                self.mirror.write(record)

    def close(self) -> None:
        if self.mirror is not None:
            self.mirror.close()


def _finite_or_null(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    return value


@dataclass
class LogWindow:
    """What happened since the last logging line: the losses of the steps taken (per task), the examples, and
    the training time (evaluations and checkpoints inside the window are `pause`d out of examples_per_sec)."""

    losses: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # "TASK", "TASK/DIMd" → [() per step]
    examples: int = 0
    t0: float = field(default_factory=time.perf_counter)
    paused: float = 0.0  # seconds spent outside training steps

    @contextlib.contextmanager
    def pause(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - start

    def add(self, task: str, loss: torch.Tensor, parts: dict[int, torch.Tensor]) -> None:
        """A step taken: its loss, and its unweighted loss at each Matryoshka dim."""
        self.losses.setdefault(task, []).append(loss)
        for dim, value in parts.items():
            self.losses.setdefault(f"{task}/{dim}d", []).append(value)

    def snapshot(self) -> dict:
        """The window's losses and examples as JSON data (saved with a checkpoint)."""
        return {"losses": {k: [float(v) for v in vs] for k, vs in self.losses.items()}, "examples": self.examples}

    @classmethod
    def restore(cls, saved: dict | None) -> "LogWindow":
        """A window holding a checkpoint's snapshot (an empty one for None): after a resume, the next metrics
        line averages the same steps as the uninterrupted run's."""
        if not saved:
            return cls()
        losses = {k: [torch.tensor(v, dtype=torch.float32) for v in vs] for k, vs in saved["losses"].items()}
        return cls(losses=losses, examples=int(saved["examples"]))

    def examples_per_sec(self) -> float:
        return round(self.examples / max(time.perf_counter() - self.t0 - self.paused, 1e-9), 2)
