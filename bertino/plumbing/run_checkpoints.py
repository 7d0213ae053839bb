"""Run checkpoints: everything a run needs to continue exactly, written atomically, read back safely.

`checkpoint-STEP/` holds everything a run needs to continue as if it had never stopped:

    model.safetensors + config/tokenizer/ST files   the weights (also a loadable sentence-transformers folder)
    optimizer.pt, scheduler.pt, scaler.pt           AdamW moments, the LR schedule's step, the GradScaler's scale
    rng_state_RANK.pt                               Python, numpy, torch CPU and CUDA generators, one file per rank
    run_config.json                                 the resolved config of the run
    trainer_state.json                              step, epoch, batches done in the epoch, best metric, world
                                                    size, a fingerprint of every task's rows

The data order needs no saved state: the samplers are a pure function of (seed, epoch) and the rows, so
(epoch, batches done) is the sampler's position, and the fingerprint proves the rows are the same ones.

Atomicity: everything is written into `.tmp-checkpoint-STEP/`, fsync'ed, and renamed at the end (`save_checkpoint`);
a folder without every file of `REQUIRED`, or a temp folder, is never taken as a checkpoint (run_folder.py). A run
that starts cleans up the temp folders an earlier, killed run left behind.

Safety: weights come only from safetensors; the other files are read with `torch.load(weights_only=True)`
(tensors and plain containers, no pickled code). Every failure to read is a `CheckpointError` naming the file.

Resume policy: a resume continues the SAME run. Any change to a key that alters the training math or the data
order (every key not in `RESUME_FREE` / `RESUME_NOT_BITWISE`), to the world size or to the rows of a task is refused with the list of differences;
to train on with new settings, start a new run from the checkpoint's weights (`model.name_or_path=CHECKPOINT`).
Memory/precision knobs and the speed-ups (`RESUME_NOT_BITWISE`) may change (a smaller GPU after a pre-emption) with
a warning. A checkpoint written before a key moved (`config.MOVED_KEYS`) is read with the key at its new place.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, ConfigError
from .files import publish_dir, read_json, sha256_file

STATE_FILE = "trainer_state.json"
REQUIRED = ("config.json", "model.safetensors", "optimizer.pt", "scheduler.pt", "scaler.pt", "run_config.json",
            STATE_FILE)
# Keys a resume may change freely: bookkeeping, and where the data lives (the fingerprint checks the rows).
RESUME_FREE = {"model.name_or_path", "train.output_dir", "train.resume_from_checkpoint", "train.logging_steps",
               "train.eval_steps", "train.save_steps", "train.save_total_limit", "train.load_best_model_at_end",
               "train.metric_for_best_model", "train.max_consecutive_nonfinite", "train.ddp_timeout",
               "train.report_to", "train.logging_dir"}
RESUME_FREE_TASK_KEYS = ("dataset", "config", "split")
# Keys a resume may change with a warning: the math is the same, the dropout masks / rounding are not. Every key of
# the `speedups` section is one (each changes time or memory, never the gradient: a smaller GPU after a pre-emption).
RESUME_NOT_BITWISE = {"train.mini_batch_size", "train.fp16", "train.bf16", "model.dropout_masks", "speedups"}
# ... except the speed-ups that change no number at all: a resume may change them silently.
RESUME_SAME_BITS = {"speedups.keep_dropout_masks", "speedups.keep_freed_memory"}
# A checkpoint that does not name a key ran with that key's default of its time. Where a default changed (or a key
# came with a default that changes the numbers), this is the value such a checkpoint ran with; every other key's
# default is the old behaviour. So a resume with today's default is named in the not-bitwise warning.
EARLIER_DEFAULTS = {"speedups.adamw_fused": False, "speedups.onednn_linear": False,
                    "speedups.embedding_grad_buffer": False, "speedups.lazy_mask_bits": False}


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
    data_fingerprint: dict[str, dict] | None = None  # {task: {"rows": N, "hashes": hex}} (older: "blake2b")
    checksums: dict[str, str] | None = None  # {file: sha256} of every other file of the checkpoint (written last)
    log_window: dict | None = None  # the losses logged since the last metrics line: the next line averages them too


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


def data_fingerprint(tasks: dict, like: dict | None = None) -> dict[str, dict]:
    """{task: {"rows", "hashes"}} of the rows the sampler sees (after balance_to), texts and scores
    (`TaskData.fingerprint`: from the texts' 64-bit hashes, cheap at any size). `like`: a checkpoint's
    fingerprint; a task it recorded in the older {"rows", "blake2b"} form (of the texts themselves) is
    fingerprinted that way, so run folders of earlier versions still resume."""
    return {name: data.fingerprint(legacy="blake2b" in ((like or {}).get(name) or {}))
            for name, data in tasks.items()}


# ------------------------------------------------------------------------------------------------ saving
def save_checkpoint(tmp: Path, final: Path, *, rank: int, write_model, state: TrainerState,
                    optimizer, scheduler, scaler, run_config: dict, barrier) -> None:
    """Write `final` (checkpoint-STEP/) through `tmp`: rank 0 the model (`write_model(tmp)`) and the training
    state, every rank its RNG state, then rank 0 publishes the folder. `barrier()` separates the phases."""
    if rank == 0:
        write_model(tmp)
    barrier()
    torch.save(rng_state(), tmp / f"rng_state_{rank}.pt")
    barrier()
    if rank == 0:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
        (tmp / "run_config.json").write_text(json.dumps(run_config, indent=2) + "\n")
        # last: the state, with a checksum of every other file, so a resume can tell a damaged checkpoint
        state_data = {**asdict(state), "checksums": checksums(tmp)}
        (tmp / STATE_FILE).write_text(json.dumps(state_data, indent=2) + "\n")
        publish_dir(tmp, final)


def checksums(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder` but the trainer state."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != STATE_FILE):
        out[path.relative_to(folder).as_posix()] = sha256_file(path).hexdigest()
    return out


def damage(ckpt: Path) -> list[str]:
    """What is wrong with a checkpoint's files: missing, changed or truncated since it was written (by their
    checksums in trainer_state.json; a checkpoint written before checksums existed is taken as it is)."""
    try:
        saved = read_json(ckpt / STATE_FILE).get("checksums")
    except CheckpointError as e:
        return [str(e)]
    if not saved:
        return []
    now = checksums(ckpt)
    return [f"{name}: {'missing' if name not in now else 'changed since it was written (checksum mismatch)'}"
            for name, digest in saved.items() if now.get(name) != digest]


# ------------------------------------------------------------------------------------------------ loading
def missing_files(ckpt: Path, world_size: int | None = None) -> list[str]:
    """The files of `REQUIRED` (and, given the world size, every rank's RNG file) that `ckpt` lacks."""
    names = list(REQUIRED) + [f"rng_state_{r}.pt" for r in range(world_size or 1)]
    return [n for n in names if not (ckpt / n).is_file()]


def read_checkpoint(ckpt: Path) -> tuple[TrainerState, dict]:
    """(trainer state, run config) of a checkpoint, checked for well-formedness."""
    state_data, run_config = read_json(ckpt / STATE_FILE), read_json(ckpt / "run_config.json")
    known = {f.name for f in dataclasses.fields(TrainerState)}
    unknown = sorted(set(state_data) - known) if isinstance(state_data, dict) else None
    if unknown is None or unknown:
        raise CheckpointError(f"{ckpt / STATE_FILE}: expected an object with keys {', '.join(sorted(known))}, "
                              f"found {'unknown keys ' + ', '.join(unknown) if unknown else type(state_data).__name__}")
    return TrainerState(**state_data), run_config


def config_changes(saved_config: dict, run_config: dict) -> tuple[list[str], list[str], dict, dict]:
    """How a run's config differs from a checkpoint's: (changes that make it another run, as "key: old → new";
    changes that are the same run but not bitwise; the flat old and new configs)."""
    from .config import move_old_keys

    saved_config, _ = move_old_keys(saved_config)  # a checkpoint written before a key moved: read it at its place
    old, new = _flatten(saved_config), _flatten(run_config)
    earlier = {**key_defaults(new), **{k: v for k, v in EARLIER_DEFAULTS.items() if k in new}}
    old = {**{k: v for k, v in earlier.items() if k not in old}, **old}  # keys added since it was saved
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k, "(absent)") != new.get(k, "(absent)"))
    free = [k for k in changed if k in RESUME_FREE or k in RESUME_SAME_BITS or k.startswith("eval.")
            or (k.startswith("tasks.") and k.rsplit(".", 1)[-1] in RESUME_FREE_TASK_KEYS)]
    soft = [k for k in changed if k not in free
            and (k in RESUME_NOT_BITWISE or k.split(".")[0] in RESUME_NOT_BITWISE)]
    hard = [f"{k}: {json.dumps(old.get(k, '(absent)'))} → {json.dumps(new.get(k, '(absent)'))}"
            for k in changed if k not in free and k not in soft]
    return hard, soft, old, new


def check_resume(ckpt: Path, saved: TrainerState, saved_config: dict, run_config: dict, world_size: int,
                 fingerprint: dict) -> list[str]:
    """Refuse a resume that could not continue the same run; return warnings for RESUME_NOT_BITWISE changes."""
    problems, soft, old, new = config_changes(saved_config, run_config)
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


def key_defaults(flat_config: dict[str, Any]) -> dict[str, Any]:
    """The schema default of every key of a flat config that has one: a checkpoint written before a key existed
    ran with that default, except the keys of `EARLIER_DEFAULTS`."""
    from . import config

    sections = {"model": config.ModelConfig, "train": config.TrainConfig, "eval": config.EvalConfig,
                "matryoshka": config.MatryoshkaConfig, "speedups": config.SpeedupsConfig}
    out = {}
    for key in flat_config:
        parts = key.split(".")
        cls = config.TaskConfig if parts[0] == "tasks" and len(parts) == 3 else sections.get(parts[0])
        field = {f.name: f for f in dataclasses.fields(cls)}.get(parts[-1]) if cls and len(parts) >= 2 else None
        if field is not None and field.default is not dataclasses.MISSING:
            out[key] = config.config_to_dict(field.default)
    return out


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{"train": {"seed": 1}} → {"train.seed": 1}; lists and null stay leaves."""
    if not isinstance(d, dict) or (not d and prefix):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out
