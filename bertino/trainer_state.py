"""Checkpoints that resume exactly, written atomically.

`checkpoint-STEP/` holds everything a run needs to continue as if it had never stopped:

    model.safetensors + config/tokenizer/ST files   the weights (also a loadable sentence-transformers folder)
    optimizer.pt, scheduler.pt, scaler.pt           AdamW moments, the LR schedule's step, the GradScaler's scale
    rng_state_RANK.pt                               Python, numpy, torch CPU and CUDA generators, one file per rank
    run_config.json                                 the resolved config of the run
    trainer_state.json                              step, epoch, batches done in the epoch, best metric...

The data order needs no saved state: the samplers are a pure function of (seed, epoch), so (epoch, batches done)
is the sampler's position. Atomicity: everything is written into `.tmp-checkpoint-STEP/` and renamed at the end,
`trainer_state.json` last; a folder without it, or a temp folder, is never taken as a checkpoint.
Everything is read back with `torch.load(weights_only=True)`: tensors and plain containers, no pickled code.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError

STATE_FILE = "trainer_state.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch the next batch comes from
    batch_in_epoch: int = 0  # batches of `epoch` already trained on
    best_metric: float | None = None
    best_step: int | None = None
    nonfinite_in_a_row: int = 0
    skipped_steps: int = 0


# ------------------------------------------------------------------------------------------------ RNG
def rng_state() -> dict:
    """Every generator the training loop draws from, as tensors / ints (loadable with weights_only=True)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {
        "python": [version, list(py_state), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, g = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, g))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------ saving
def tmp_dir_for(final: Path) -> Path:
    return final.parent / f".tmp-{final.name}"


def commit_dir(tmp: Path, final: Path) -> None:
    """Rename tmp → final atomically; an existing `final` (best/, final/) is replaced."""
    if final.exists():
        old = final.parent / f".old-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def save_rank_rng(tmp: Path, rank: int) -> None:
    torch.save(rng_state(), tmp / f"rng_state_{rank}.pt")


def save_training_state(tmp: Path, state: TrainerState, optimizer, scheduler, scaler, run_config: dict) -> None:
    """Rank 0's part of a checkpoint (the model files are written by `SentenceEncoder.save_pretrained`)."""
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(scaler.state_dict(), tmp / "scaler.pt")
    (tmp / "run_config.json").write_text(json.dumps(run_config, indent=2) + "\n")
    # written last: its presence marks the folder complete (and the rename makes that visible at once)
    (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2) + "\n")


def rotate_checkpoints(output_dir: Path, keep: int | None, protect_step: int | None) -> None:
    """Delete the oldest complete checkpoints beyond `keep`, never the one of `protect_step` (the best)."""
    if keep is None:
        return
    steps = sorted(step for step, _ in list_checkpoints(output_dir))
    removable = [s for s in steps if s != protect_step]
    excess = len(steps) - keep
    for s in removable[: max(0, excess)]:
        shutil.rmtree(output_dir / f"checkpoint-{s}", ignore_errors=True)


# ------------------------------------------------------------------------------------------------ loading
def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (with trainer_state.json), sorted by step."""
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = _CKPT.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).exists():
            found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_resume(resume: str | bool | None, output_dir: Path) -> Path | None:
    """`train.resume_from_checkpoint`: a folder, or true for the latest complete one in output_dir."""
    if resume in (None, False, ""):
        return None
    if resume is True or (isinstance(resume, str) and resume.lower() == "true"):
        found = list_checkpoints(output_dir)
        if not found:
            raise ConfigError(f"train.resume_from_checkpoint: true, but {output_dir} holds no complete checkpoint-*/")
        return found[-1][1]
    path = Path(resume)
    if not (path / STATE_FILE).exists():
        raise ConfigError(f"train.resume_from_checkpoint: {path} is not a complete checkpoint (no {STATE_FILE})")
    return path


def load_training_state(ckpt: Path, rank: int, optimizer, scheduler, scaler) -> TrainerState:
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    scaler.load_state_dict(torch.load(ckpt / "scaler.pt", weights_only=True))
    rng_file = ckpt / f"rng_state_{rank}.pt"
    if not rng_file.exists():
        raise ConfigError(f"{ckpt}: no {rng_file.name}: was this checkpoint written with a different world size?")
    set_rng_state(torch.load(rng_file, weights_only=True))
    return TrainerState(**json.loads((ckpt / STATE_FILE).read_text()))
