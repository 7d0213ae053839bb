"""The run folder (`train.output_dir`): what may be written into it, its checkpoints, best/ and final/.

    config.json            the resolved config              metrics.jsonl    one JSON object per logged step
    checkpoint-STEP/       a complete checkpoint (run_checkpoints.py)
    best/, final/          sentence-transformers model folders with a model card, eval_results.json and
                           eval_results_by_precision.json (the card's storage-vs-quality table)
    runs/                  TensorBoard event files (train.report_to: ["tensorboard"]; train.logging_dir moves them)
    .tmp-*, .old-*         what an interrupted write leaves; cleaned up by the next run (files.restore_half_replaced)

A fresh run never writes into a folder that holds an earlier run's checkpoints or models. Every folder is written
into `.tmp-NAME/` and published with one rename (files.publish_dir), so a folder that exists is complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from ..errors import ConfigError
from .config import Config, config_to_dict
from .files import publish_dir
from .model_card import render_model_card
from .run_checkpoints import damage, missing_files

RUN_FILES = ("checkpoint-", "final", "best")  # what a run leaves that a fresh run must not overwrite
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def check_output_dir(out: Path, resume_from: Path | None, model_folder: Path | None = None) -> None:
    """Before anything is loaded: `out` must be creatable, and no run may overwrite what is not its own.

    - a fresh run must not write into a folder that holds an earlier run's checkpoints or models;
    - a resume writes only into an empty folder, the folder of the run it resumes, or a folder an earlier resume
      of the same run started (its config.json is the checkpoint's config);
    - no run writes into (or inside) the folder of the model it starts from.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.output_dir: {out} exists and is not a folder")
    parent = next(p for p in [out, *out.absolute().parents] if p.exists())
    if not parent.is_dir():
        raise ConfigError(f"train.output_dir: cannot create {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"train.output_dir: cannot create {out}: {parent} is not writable")
    if model_folder is not None and model_folder.is_dir():
        model, target = model_folder.resolve(), out.absolute().resolve()
        if target == model or model in target.parents:
            raise ConfigError(f"train.output_dir: {out} is {'inside ' if target != model else ''}the folder of the "
                              f"model the run starts from ({model_folder}); writing there would replace its files: "
                              f"choose another output_dir")
    if not out.is_dir():
        return
    earlier = sorted(p.name for p in out.iterdir() if p.name.startswith(RUN_FILES))
    if resume_from is None:
        if earlier:
            raise ConfigError(
                f"train.output_dir: {out} already holds an earlier run ({', '.join(earlier[:4])}"
                f"{' ...' if len(earlier) > 4 else ''}); continue it with train.resume_from_checkpoint=true, "
                f"or choose another output_dir (or delete that one)")
        return
    if resume_from.parent.resolve() == out.resolve() or not any(out.iterdir()) or _same_run(out, resume_from):
        return
    found = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    raise ConfigError(f"train.output_dir: {out} holds another run ({', '.join(found[:5])}"
                      f"{' ...' if len(found) > 5 else ''}), not the one of {resume_from}: a resume writes only into "
                      f"an empty folder or the folder of the run it continues; choose another output_dir")


def _same_run(out: Path, resume_from: Path) -> bool:
    """Did an earlier resume of this checkpoint's run start `out`? (its config.json is the checkpoint's run
    config, up to the keys a resume may change)."""
    from .files import read_json
    from .run_checkpoints import config_changes

    if not (out / "config.json").is_file() or not (resume_from / "run_config.json").is_file():
        return False
    hard, _, _, _ = config_changes(read_json(resume_from / "run_config.json", ConfigError),
                                   read_json(out / "config.json", ConfigError))
    return not hard


def tmp_dir_for(final: Path) -> Path:
    return final.parent / f".tmp-{final.name}"


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


def resolve_resume(resume: str | bool | None, output_dir: Path) -> tuple[Path | None, list[str]]:
    """`train.resume_from_checkpoint`: a folder, or true for the latest sound one in output_dir →
    (the checkpoint, notices). Every file is checked against the checksums written with it: with true, a damaged
    latest checkpoint is passed over for the previous one, with a notice; a damaged folder named explicitly is an
    error that names the newest sound one."""
    if resume in (None, False, ""):
        return None, []
    if resume is True or (isinstance(resume, str) and resume.lower() == "true"):
        found = list_checkpoints(output_dir)
        if not found:
            raise ConfigError(f"train.resume_from_checkpoint: true, but {output_dir} holds no complete "
                              f"checkpoint-*/ folder")
        notices = []
        for _, ckpt in reversed(found):
            problems = damage(ckpt)
            if not problems:
                return ckpt, notices
            notices.append(f"{ckpt} is damaged ({'; '.join(problems)}): resuming from an earlier checkpoint")
        raise ConfigError(f"train.resume_from_checkpoint: every checkpoint in {output_dir} is damaged: "
                          + "; ".join(notices))
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(f"train.resume_from_checkpoint: no such folder {path}")
    missing = missing_files(path)
    if missing:
        raise ConfigError(f"train.resume_from_checkpoint: {path} is not a complete checkpoint (missing "
                          f"{', '.join(missing)})")
    problems = damage(path)
    if problems:
        sound = [c for _, c in reversed(list_checkpoints(path.parent)) if c != path and not damage(c)]
        raise ConfigError(f"train.resume_from_checkpoint: {path} is damaged ({'; '.join(problems)}); "
                          + (f"resume from {sound[0]} instead (train.resume_from_checkpoint={sound[0]})" if sound
                             else "no other sound checkpoint is next to it"))
    return path, []


def rotate_checkpoints(output_dir: Path, keep: int | None, protect_step: int | None) -> None:
    """Keep the newest `keep` complete checkpoints, plus the one of `protect_step` (the best) if it is older."""
    if keep is None:
        return
    steps = [step for step, _ in list_checkpoints(output_dir)]  # ascending
    for s in steps[:-keep]:
        if s != protect_step:
            shutil.rmtree(output_dir / f"checkpoint-{s}", ignore_errors=True)


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
    publish_dir(tmp, dst)
    return None


PRECISION_RESULTS = "eval_results_by_precision.json"  # {precision: {dim: {set: {metric: value}}}}


def save_model_folder(encoder, folder: Path, cfg: Config, results: dict | None, dims,
                      precision_results: dict | None = None, base_results: dict | None = None) -> None:
    """`best/` or `final/`: a sentence-transformers folder with its model card, eval_results.json and
    eval_results_by_precision.json, atomically."""
    card = render_model_card(
        base_model=cfg.model.name_or_path, dim=encoder.dim, max_seq_length=encoder.max_seq_length,
        matryoshka_dims=list(cfg.matryoshka.dims) if cfg.matryoshka else None,
        matryoshka_weights=list(cfg.matryoshka.weights) if cfg.matryoshka else None,
        losses={name: t.loss for name, t in cfg.tasks.items()},
        hyperparameters={k: v for k, v in config_to_dict(cfg.train).items()
                         if k not in ("output_dir", "resume_from_checkpoint")},
        results=results, precision_results=precision_results, rescore=cfg.eval.rescore, base_results=base_results,
        int8_quantile=cfg.eval.int8_quantile)
    tmp = tmp_dir_for(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    encoder.save_pretrained(tmp, model_card=card, matryoshka_dims=list(dims))
    if results:
        (tmp / "eval_results.json").write_text(json.dumps({str(d): r for d, r in results.items()}, indent=2) + "\n")
    if precision_results:
        plain = {level: {str(d): r for d, r in by_dim.items()} for level, by_dim in precision_results.items()}
        (tmp / PRECISION_RESULTS).write_text(json.dumps(plain, indent=2) + "\n")
    publish_dir(tmp, folder)
