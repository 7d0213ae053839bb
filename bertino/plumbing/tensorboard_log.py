"""TensorBoard: the scalars of `metrics.jsonl` as event files (`train.report_to: ["tensorboard"]`), resume-aware.

    a logging line {"step": 10, "lr": ..., "loss/retrieval/128d": ...}  →  tag "lr", "loss/retrieval/128d", ...
        (every number of the line but "step", under its metrics.jsonl key)
    an evaluation {"step": 250, "eval": {"768": {"dev": {"ndcg@10": ...}}}}  →  tag "eval/dev/ndcg@10/768d"
    skipped-step and resume lines                                            →  nothing (they are not curves)

The events go to one folder, `train.logging_dir` (default `output_dir/runs/`), in files named
`events.out.tfevents.*.RUN.bertino`, RUN a short hash of the run's output_dir, written by rank 0 and flushed after
every line, as metrics.jsonl is. A resumed run continues the same curves: it keeps the events up to its
checkpoint's step (a killed run may have logged later steps, which are trained and logged again), rewrites them
into one new file (wall times kept, each (tag, step) once) and deletes its old files, so the steps of every tag
stay strictly increasing. A fresh run starts empty.

Only the run's own files are ever read or deleted. In a folder inside the run folder (the default `runs/`) every
bertino event file is the run's (also files written before RUN was part of the name, and after the run folder was
moved); in a folder elsewhere, which several runs may share, only the files carrying this run's RUN are, and the
others are left alone with a notice (TensorBoard draws one folder as one run: give each run its own folder).

tensorboard is an optional extra (`pip install 'bertino[tensorboard]'`), imported only when a run asks for it.
"""

from __future__ import annotations

import hashlib
import math
import sys
from pathlib import Path
from typing import Iterator

from ..errors import ConfigError

SUFFIX = ".bertino"  # bertino's event files: the only ones a run deletes (and only its own)
INSTALL = "pip install 'bertino[tensorboard]' (or pip install tensorboard)"


def require_tensorboard(key: str = 'train.report_to: ["tensorboard"]'):
    """torch's SummaryWriter, or one clear error naming the extra to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(f"{key} needs the tensorboard package, which is not installed: {INSTALL}") from None
    return SummaryWriter


def scalars(record: dict) -> Iterator[tuple[str, float]]:
    """(tag, value) of every scalar a metrics.jsonl record holds (NaN for a non-finite number)."""
    if "lr" in record:  # a logging line
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                yield key, float(value)
            elif key != "step" and value is None:  # non-finite, written as null
                yield key, math.nan
    elif "eval" in record:
        for dim, sets in record["eval"].items():
            for name, metrics in sets.items():
                for metric, value in metrics.items():
                    yield f"eval/{name}/{metric}/{dim}d", math.nan if value is None else float(value)


def run_tag(run_dir: Path) -> str:
    """The part of an event file's name that says which run wrote it: a hash of the resolved output_dir."""
    return hashlib.sha256(str(Path(run_dir).resolve()).encode("utf-8")).hexdigest()[:12]


class TensorBoardLog:
    """The event files of one run (`run_dir`, its output_dir); `MetricsLog` hands it every record it writes
    (rank 0 only)."""

    def __init__(self, folder: Path, run_dir: Path):
        self.folder, self.run_dir, self.writer = Path(folder), Path(run_dir), None
        self.suffix = f".{run_tag(run_dir)}{SUFFIX}"
        self.SummaryWriter = require_tensorboard()

    def own_files(self) -> list[Path]:
        """This run's event files in the folder (module docstring: whose files are whose)."""
        found = sorted(self.folder.glob(f"events.out.tfevents.*{SUFFIX}"))
        if self.folder.resolve().is_relative_to(self.run_dir.resolve()):
            return found  # a folder of the run folder: every bertino event file in it is this run's
        others = [p for p in found if not p.name.endswith(self.suffix)]
        if others:
            print(f"bertino: train.logging_dir {self.folder} also holds {len(others)} event file(s) of other runs "
                  f"(left alone; TensorBoard draws them with this run's curves: give each run its own "
                  f"train.logging_dir)", file=sys.stderr)
        return [p for p in found if p.name.endswith(self.suffix)]

    def start(self, resumed_step: int | None) -> None:
        """Open a new event file; a resume first copies its old files' events up to `resumed_step` into it."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"train.logging_dir: cannot create {self.folder}: {e.strerror or e}") from None
        old = self.own_files()
        kept = read_scalar_events(old, up_to=resumed_step) if resumed_step is not None else []
        self.writer = self.SummaryWriter(str(self.folder), filename_suffix=self.suffix, max_queue=1000,
                                         flush_secs=3600)
        for tag, step, value, wall_time in kept:
            self.writer.add_scalar(tag, value, step, walltime=wall_time)
        self.writer.flush()  # the kept events are on disk before the old files go (a new file: a new name, as
        for path in old:     # its name holds the time, the process id and a per-process counter)
            path.unlink(missing_ok=True)

    def write(self, record: dict) -> None:
        step = record.get("step")
        if self.writer is None or not isinstance(step, int):
            return
        for tag, value in scalars(record):
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def read_scalar_events(paths: list[Path], up_to: int) -> list[tuple[str, int, float, float]]:
    """(tag, step, value, wall time) of the scalar events with step ≤ up_to in these files, in step order, each
    (tag, step) once (the last file's, should an interrupted rewrite have left it twice)."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader  # as written

    found: dict[tuple[str, int], tuple[float, float]] = {}
    for path in paths:
        try:
            for event in LegacyEventFileLoader(str(path)).Load():  # a record cut short by a kill ends it
                if event.step > up_to or not event.HasField("summary"):
                    continue
                for value in event.summary.value:
                    if value.HasField("simple_value"):
                        found[(value.tag, event.step)] = (value.simple_value, event.wall_time)
        except OSError as e:
            raise ConfigError(f"train.logging_dir: cannot read {path}: {e.strerror or e}") from None
    return [(tag, step, v, t) for (tag, step), (v, t) in sorted(found.items(), key=lambda kv: (kv[0][1], kv[1][1]))]
