"""The run folder: checkpoints that resume exactly, written atomically, read back safely.

`checkpoint-STEP/` holds everything a run needs to continue as if it had never stopped:

    model.safetensors + config/tokenizer/ST files   the weights (also a loadable sentence-transformers folder)
    optimizer.pt, scheduler.pt, scaler.pt           AdamW moments, the LR schedule's step, the GradScaler's scale
    rng_state_RANK.pt                               Python, numpy, torch CPU and CUDA generators, one file per rank
    run_config.json                                 the resolved config of the run
    trainer_state.json                              step, epoch, batches done in the epoch, best metric, world
                                                    size, a fingerprint of every task's rows

The data order needs no saved state: the samplers are a pure function of (seed, epoch) and the rows, so
(epoch, batches done) is the sampler's position, and the fingerprint proves the rows are the same ones.

Atomicity: everything is written into `.tmp-checkpoint-STEP/`, fsync'ed, and renamed at the end; a folder without
every file of `REQUIRED`, or a temp folder, is never taken as a checkpoint. A run that starts cleans up the temp
folders an earlier, killed run left behind.

Safety: weights come only from safetensors; the other files are read with `torch.load(weights_only=True)`
(tensors and plain containers, no pickled code). Every failure to read is a `CheckpointError` naming the file.

Resume policy: a resume continues the SAME run. Any change to a key that alters the training math or the data
order (`RESUME_MUST_MATCH`), to the world size or to the rows of a task is refused with the list of differences;
to train on with new settings, start a new run from the checkpoint's weights (`model.name_or_path=CHECKPOINT`).
Memory/precision knobs (`RESUME_NOT_BITWISE`) may change (a smaller GPU after a pre-emption) with a warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError, ConfigError

STATE_FILE = "trainer_state.json"
RUN_FILES = ("checkpoint-", "final", "best")  # what a run leaves that a fresh run must not overwrite
REQUIRED = ("config.json", "model.safetensors", "optimizer.pt", "scheduler.pt", "scaler.pt", "run_config.json",
            STATE_FILE)
_CKPT = re.compile(r"^checkpoint-(\d+)$")

# Keys a resume may change freely: bookkeeping, and where the data lives (the fingerprint checks the rows).
RESUME_FREE = {"model.name_or_path", "train.output_dir", "train.resume_from_checkpoint", "train.logging_steps",
               "train.eval_steps", "train.save_steps", "train.save_total_limit", "train.load_best_model_at_end",
               "train.metric_for_best_model", "train.max_consecutive_nonfinite"}
RESUME_FREE_TASK_KEYS = ("dataset", "config", "split")
# Keys a resume may change with a warning: the math is the same, the dropout masks / rounding are not.
RESUME_NOT_BITWISE = {"train.mini_batch_size", "train.grad_cache_memory_budget", "train.grad_cache_linear_tape",
                      "train.fp16", "train.bf16"}


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done (skipped non-finite steps count: the LR schedule advanced)
    epoch: int = 0  # the epoch the next batch comes from
    batch_in_epoch: int = 0  # batches of `epoch` already trained on
    best_metric: float | None = None
    best_step: int | None = None
    nonfinite_in_a_row: int = 0
    skipped_steps: int = 0
    world_size: int = 1
    data_fingerprint: dict[str, dict] | None = None  # {task: {"rows": N, "blake2b": hex}}


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
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------ run folder
def check_output_dir(out: Path, resuming: bool) -> None:
    """Before anything is loaded: `out` must be creatable, and a fresh run must not overwrite an earlier one."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.output_dir: {out} exists and is not a folder")
    parent = next(p for p in [out, *out.absolute().parents] if p.exists())
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"train.output_dir: cannot create {out}: {parent} is not writable")
    if not resuming and out.is_dir():
        earlier = sorted(p.name for p in out.iterdir() if p.name.startswith(RUN_FILES))
        if earlier:
            raise ConfigError(
                f"train.output_dir: {out} already holds an earlier run ({', '.join(earlier[:4])}"
                f"{' ...' if len(earlier) > 4 else ''}); continue it with train.resume_from_checkpoint=true, "
                f"or choose another output_dir (or delete that one)")


def clean_stale(out: Path) -> None:
    """Remove temp folders a killed run left (`.tmp-*`); put back a folder killed between the two renames of
    `commit_dir` (`.old-X` without `X`)."""
    for p in out.iterdir():
        if p.name.startswith(".tmp-"):
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(".old-"):
            final = out / p.name[len(".old-"):]
            if final.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.replace(p, final)


def data_fingerprint(tasks: dict) -> dict[str, dict]:
    """{task: {"rows", "blake2b"}} of the rows the sampler sees (after balance_to), texts and scores."""
    out = {}
    for name, data in tasks.items():
        h = hashlib.blake2b(digest_size=16)
        for start in range(0, len(data.texts), 65536):  # chunks: one join of 1M rows would double the memory
            chunk = data.texts[start:start + 65536]
            h.update("\x1e".join("\x1f".join(row) for row in chunk).encode("utf-8", "surrogatepass") + b"\x1e")
        if data.scores is not None:
            h.update(np.ascontiguousarray(data.scores, dtype=np.float32).tobytes())
        out[name] = {"rows": len(data), "blake2b": h.hexdigest()}
    return out


# ------------------------------------------------------------------------------------------------ saving
def tmp_dir_for(final: Path) -> Path:
    return final.parent / f".tmp-{final.name}"


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder` to disk, so a rename can never publish half-written files
    (a killed process keeps its page cache; a pre-empted machine may not)."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_dir(tmp: Path, final: Path) -> None:
    """Publish `tmp` as `final` with a rename; an existing `final` (best/, final/) is replaced."""
    _fsync_tree(tmp)
    if final.exists():
        old = final.parent / f".old-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)  # killed between these two renames: `clean_stale` puts `.old-X` back
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


def carry_best_model(ckpt: Path, out: Path, best_step: int | None) -> str | None:
    """Resuming from another run's checkpoint into `out`: copy that run's `best/` along (atomically).

    The checkpoint brings back `best_metric`/`best_step`, so only a better score replaces the best model from
    here on, but the model itself is in the earlier run's `best/`. Without it, `load_best_model_at_end` would
    finish with the last weights. That `best/` is the checkpoint's best, or a better one from a later step,
    which the resumed run reproduces bitwise and saves again. Returns a warning when there is none to copy.
    """
    src, dst = ckpt.parent / "best", out / "best"
    if best_step is None or ckpt.parent.resolve() == out.resolve() or dst.exists():
        return None
    if not (src / "model.safetensors").is_file():
        return (f"{ckpt} says the best model so far is step {best_step}'s, but {src} is missing: best/ will "
                f"hold only models that beat its score from here on")
    tmp = tmp_dir_for(dst)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    commit_dir(tmp, dst)
    return None


def save_rank_rng(tmp: Path, rank: int) -> None:
    torch.save(rng_state(), tmp / f"rng_state_{rank}.pt")


def save_training_state(tmp: Path, state: TrainerState, optimizer, scheduler, scaler, run_config: dict) -> None:
    """Rank 0's part of a checkpoint (the model files are written by `SentenceEncoder.save_pretrained`)."""
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(scaler.state_dict(), tmp / "scaler.pt")
    (tmp / "run_config.json").write_text(json.dumps(run_config, indent=2) + "\n")
    (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2) + "\n")


def rotate_checkpoints(output_dir: Path, keep: int | None, protect_step: int | None) -> None:
    """Keep the newest `keep` complete checkpoints, plus the one of `protect_step` (the best) if it is older."""
    if keep is None:
        return
    steps = [step for step, _ in list_checkpoints(output_dir)]  # ascending
    for s in steps[:-keep]:
        if s != protect_step:
            shutil.rmtree(output_dir / f"checkpoint-{s}", ignore_errors=True)


# ------------------------------------------------------------------------------------------------ loading
def missing_files(ckpt: Path, world_size: int | None = None) -> list[str]:
    """The files of `REQUIRED` (and, given the world size, every rank's RNG file) that `ckpt` lacks."""
    names = list(REQUIRED) + [f"rng_state_{r}.pt" for r in range(world_size or 1)]
    return [n for n in names if not (ckpt / n).is_file()]


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (every required file present), sorted by step."""
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = _CKPT.match(p.name)
        if m and p.is_dir() and not missing_files(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_resume(resume: str | bool | None, output_dir: Path) -> Path | None:
    """`train.resume_from_checkpoint`: a folder, or true for the latest complete one in output_dir."""
    if resume in (None, False, ""):
        return None
    if resume is True or (isinstance(resume, str) and resume.lower() == "true"):
        found = list_checkpoints(output_dir)
        if not found:
            raise ConfigError(f"train.resume_from_checkpoint: true, but {output_dir} holds no complete "
                              f"checkpoint-*/ folder")
        return found[-1][1]
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(f"train.resume_from_checkpoint: no such folder {path}")
    missing = missing_files(path)
    if missing:
        raise ConfigError(f"train.resume_from_checkpoint: {path} is not a complete checkpoint (missing "
                          f"{', '.join(missing)})")
    return path


def read_checkpoint(ckpt: Path) -> tuple[TrainerState, dict]:
    """(trainer state, run config) of a checkpoint, checked for well-formedness."""
    state_data, run_config = _read_json(ckpt / STATE_FILE), _read_json(ckpt / "run_config.json")
    known = {f.name for f in dataclasses.fields(TrainerState)}
    unknown = sorted(set(state_data) - known) if isinstance(state_data, dict) else None
    if unknown is None or unknown:
        raise CheckpointError(f"{ckpt / STATE_FILE}: expected an object with keys {', '.join(sorted(known))}, "
                              f"found {'unknown keys ' + ', '.join(unknown) if unknown else type(state_data).__name__}")
    return TrainerState(**state_data), run_config


def check_resume(ckpt: Path, saved: TrainerState, saved_config: dict, run_config: dict, world_size: int,
                 fingerprint: dict) -> list[str]:
    """Refuse a resume that could not continue the same run; return warnings for RESUME_NOT_BITWISE changes."""
    old, new = _flatten(saved_config), _flatten(run_config)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k, "(absent)") != new.get(k, "(absent)"))
    free = [k for k in changed if k in RESUME_FREE or k.startswith("eval.")
            or (k.startswith("tasks.") and k.rsplit(".", 1)[-1] in RESUME_FREE_TASK_KEYS)]
    soft = [k for k in changed if k in RESUME_NOT_BITWISE]
    hard = [k for k in changed if k not in free and k not in soft]
    problems = [f"{k}: {json.dumps(old.get(k, '(absent)'))} → {json.dumps(new.get(k, '(absent)'))}" for k in hard]
    if saved.world_size != world_size:
        problems.append(f"world size: {saved.world_size} → {world_size} process(es)")
    for name in sorted((saved.data_fingerprint or {}).keys() & fingerprint.keys()):
        a, b = saved.data_fingerprint[name], fingerprint[name]
        if a != b:
            what = f"{a['rows']} → {b['rows']} rows" if a["rows"] != b["rows"] else "same row count, other content"
            problems.append(f"the rows of task {name!r} changed ({what})")
    if problems:
        raise ConfigError(
            f"train.resume_from_checkpoint: {ckpt} belongs to a run with other settings: {'; '.join(problems)}. "
            f"A resume continues that run exactly: restore those settings, or start a new run from its weights "
            f"with model.name_or_path={ckpt} and no resume_from_checkpoint")
    return [f"resuming with {k} {json.dumps(old.get(k))} → {json.dumps(new.get(k))}: training continues correctly "
            f"but not bitwise as the uninterrupted run would have" for k in soft]


def restore_training_state(ckpt: Path, rank: int, optimizer, scheduler, scaler) -> None:
    """Load optimizer, scheduler, scaler and this rank's RNG states (the RNG last: nothing may draw after it)."""
    for name, obj in (("optimizer.pt", optimizer), ("scheduler.pt", scheduler), ("scaler.pt", scaler)):
        state = _torch_load(ckpt / name)
        if name == "scaler.pt" and not state:  # written by a disabled scaler (fp32/bf16 run): start a fresh one
            continue
        try:
            obj.load_state_dict(state)
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{ckpt / name}: does not fit this run's {type(obj).__name__}: "
                                  f"{str(e).splitlines()[0]}") from None
    rng_file = ckpt / f"rng_state_{rank}.pt"
    if not rng_file.exists():
        raise CheckpointError(f"{ckpt}: no {rng_file.name}; was this checkpoint written with fewer processes?")
    set_rng_state(_torch_load(rng_file))


def _torch_load(path: Path) -> Any:
    try:
        # weights_only=True: tensors, numbers, strings and containers only; a pickled object is refused.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError (refused or corrupt), EOFError (truncated), RuntimeError (zip)...
        raise CheckpointError(f"{path}: cannot read with torch.load(weights_only=True): {type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no message'}") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON: {e}") from None


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{"train": {"seed": 1}} → {"train.seed": 1}; lists and null stay leaves."""
    if not isinstance(d, dict) or (not d and prefix):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out
