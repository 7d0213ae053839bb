"""The parts of a training run that `train.py` leans on, one job each; the recipe itself stays in `train.py`.

* `Run`: everything `train.setup` builds and checks before the run folder is touched (model, data, optimizer, state).
* `seed_everything`, `build_batches`: the seeds, and one batch sampler per task mixed into one schedule.
* `StopSignal`: SIGTERM/SIGINT finish the current step, then a checkpoint is written.
* `agree`: every rank takes the same decision (step, skip, stop) from its own flags.
* `save_checkpoint`: `checkpoint-STEP/`, written atomically by all ranks together (bertino/trainer_state.py).
* `run_evaluation`, `best_metric_value`, `save_model`: evaluation, and the `best/` and `final/` model folders.
* `MetricsLog`, `LogWindow`, `log_progress`: `metrics.jsonl` (strict JSON, resume-aware), its step lines.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import distributed
from . import trainer_state as ts
from .config import Config, config_to_dict
from .data import TaskData
from .distributed import DistInfo
from .encoder import SentenceEncoder
from .errors import BertinoError, DataError
from .evaluation import IRSet, STSSet, evaluate_sets
from .objectives import Objective
from .sampler import MultiTaskBatchSampler, NoDuplicatesBatchSampler, PlainBatchSampler


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_batches(cfg: Config, tasks: dict[str, TaskData], world_size: int = 1, rank: int = 0
                  ) -> MultiTaskBatchSampler:
    """One batch sampler per task, mixed into one schedule. A task that cannot fill ONE batch is a DataError."""
    tc, size = cfg.train, cfg.train.per_device_train_batch_size
    samplers = {}
    for name, data in tasks.items():
        def make(batch_size=size, drop_last=tc.dataloader_drop_last, num_replicas=world_size, rank=rank):
            common = dict(seed=tc.seed, drop_last=drop_last, num_replicas=num_replicas, rank=rank)
            if tc.batch_sampler == "no_duplicates":
                return NoDuplicatesBatchSampler(data.texts, batch_size, **common)
            return PlainBatchSampler(len(data), batch_size, **common)

        samplers[name] = make()
        if len(next(iter(samplers[name]), [])) < size:  # the pool could not fill even the first batch
            need = (f"a step needs {size * world_size} rows (train.per_device_train_batch_size {size} × "
                    f"{world_size} process(es))")
            fit = len(next(iter(make(size * world_size, False, 1, 0))))  # the largest step batch the rows make
            if fit < len(data) and tc.batch_sampler == "no_duplicates":
                why = (f"but its {len(data)} rows fill at most {fit} without repeating a text (rows that share a "
                       f"query, positive or negative cannot share a batch)")
            else:
                why = f"but it has only {len(data)} rows"
            raise DataError(f"task {name!r} ({data.source}): {need}, {why}; lower "
                            f"train.per_device_train_batch_size")
    return MultiTaskBatchSampler(samplers, mode=tc.multi_dataset_batch_sampler, seed=tc.seed)


@dataclass
class Run:
    """One training run: built and checked by `train.setup`, then read and advanced by the training loop."""

    cfg: Config
    out: Path                     # train.output_dir
    resume_from: Path | None      # the checkpoint this run continues, if any
    dist_info: DistInfo
    device: torch.device
    amp_dtype: torch.dtype | None  # None: fp32, no autocast
    scaler: torch.amp.GradScaler
    encoder: SentenceEncoder
    model: torch.nn.Module        # the encoder, or DDP around it: what the forward passes call
    tasks: dict[str, TaskData]
    batches: MultiTaskBatchSampler
    objectives: dict[str, Objective]
    steps_per_epoch: int
    total_steps: int
    eval_ir: list[IRSet]
    eval_sts: list[STSSet]
    eval_dims: list[int]
    run_config: dict              # the resolved config, saved with every checkpoint
    state: ts.TrainerState
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    log: MetricsLog

    @property
    def tc(self):
        return self.cfg.train

    @property
    def is_main(self) -> bool:
        return self.dist_info.is_main

    @property
    def pad_id(self) -> int:
        return self.encoder.tokenizer.pad_token_id

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)


class StopSignal:
    """SIGTERM/SIGINT set a flag that the loop reads after each step; a second signal acts as usual."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        if os.environ.get("RANK", "0") == "0":
            print(f"\nbertino: {signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                  f"(send it again to stop at once)", file=sys.stderr)
        for sig, handler in self._previous.items():  # the next one interrupts at once
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def agree(flags: list[bool], dist_info: DistInfo, device: torch.device) -> list[bool]:
    """Element-wise AND over ranks, so every rank steps, skips or stops together (identity in one process)."""
    if not dist_info.enabled:
        return flags
    t = torch.tensor(flags, dtype=torch.int32, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return [bool(v) for v in t.tolist()]


def save_checkpoint(run: Run) -> Path:
    """`checkpoint-STEP/`: rank 0 writes the weights and training state, every rank its RNG state; atomic."""
    state, out = run.state, run.out
    final = out / f"checkpoint-{state.step}"
    tmp = ts.tmp_dir_for(final)
    try:
        if run.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            run.encoder.save_pretrained(tmp, matryoshka_dims=run.eval_dims)
        distributed.barrier()
        ts.save_rank_rng(tmp, run.dist_info.rank)
        distributed.barrier()
        if run.is_main:
            ts.save_training_state(tmp, state, run.optimizer, run.scheduler, run.scaler, run.run_config)
            ts.commit_dir(tmp, final)
            ts.rotate_checkpoints(out, run.tc.save_total_limit, state.best_step)
    except OSError as e:  # disk full, quota: the earlier checkpoints are untouched
        shutil.rmtree(tmp, ignore_errors=True)
        raise BertinoError(f"cannot write {final}: {e.strerror or e}; the earlier checkpoints are intact "
                           f"(resume with train.resume_from_checkpoint=true once there is room)") from None
    distributed.barrier()
    return final


def run_evaluation(run: Run) -> dict | None:
    """Rank 0 evaluates (the others wait at the barrier); returns {dim: {set: {metric: value}}}.

    A new best score (`train.metric_for_best_model` at the first eval dim) is saved to `best/`."""
    state, results = run.state, None
    if run.is_main and (run.eval_ir or run.eval_sts):
        results = evaluate_sets(run.encoder, run.eval_ir, run.eval_sts, run.eval_dims,
                                batch_size=run.cfg.eval.batch_size, show_progress_bar=False)
        run.encoder.train()
        run.log.write({"step": state.step, "eval": {str(d): r for d, r in results.items()}})
        score = best_metric_value(results, run.tc.metric_for_best_model, run.eval_dims[0])
        if score is not None and (state.best_metric is None or score > state.best_metric):
            state.best_metric, state.best_step = score, state.step
            save_model(run.encoder, run.out / "best", run.cfg, results, run.eval_dims)
    distributed.barrier()
    return results


def best_metric_value(results: dict, metric: str, dim: int) -> float | None:
    """`metric` at `dim`, averaged over the eval sets that report it."""
    values = [m[metric] for m in results.get(dim, {}).values() if metric in m]
    return float(np.mean(values)) if values else None


def save_model(encoder: SentenceEncoder, folder: Path, cfg: Config, results: dict | None, dims) -> None:
    """A sentence-transformers folder with a generated model card, written atomically."""
    from .model_card import render_model_card

    card = render_model_card(
        base_model=cfg.model.name_or_path, dim=encoder.dim, max_seq_length=encoder.max_seq_length,
        matryoshka_dims=list(cfg.matryoshka.dims) if cfg.matryoshka else None,
        matryoshka_weights=list(cfg.matryoshka.weights) if cfg.matryoshka else None,
        losses={name: t.loss for name, t in cfg.tasks.items()},
        hyperparameters={k: v for k, v in config_to_dict(cfg.train).items()
                         if k not in ("output_dir", "resume_from_checkpoint")},
        results=results)
    tmp = ts.tmp_dir_for(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    encoder.save_pretrained(tmp, model_card=card, matryoshka_dims=list(dims))
    if results:
        (tmp / "eval_results.json").write_text(json.dumps({str(d): r for d, r in results.items()}, indent=2) + "\n")
    ts.commit_dir(tmp, folder)


@dataclass
class LogWindow:
    """What happened since the last metrics line: the losses of the steps taken (per task), examples, and the
    training time (evaluations and checkpoints inside the window are `pause`d out of examples_per_sec)."""

    losses: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # task → [() per step]
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


def log_progress(run: Run, window: LogWindow, grad_norm: torch.Tensor, bar) -> None:
    """One metrics.jsonl line for the steps since the last: loss per task (mean over steps and ranks), LR, speed."""
    state, scaler = run.state, run.scaler
    elapsed = time.perf_counter() - window.t0 - window.paused
    record = {"step": state.step,
              "epoch": round(state.epoch + state.batch_in_epoch / run.steps_per_epoch, 4),
              "lr": run.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
              "loss_scale": scaler.get_scale() if scaler.is_enabled() else 1.0,
              "examples_per_sec": round(window.examples / max(elapsed, 1e-9), 2),
              "skipped_steps": state.skipped_steps}
    for name, losses in window.losses.items():
        record[f"loss/{name}"] = distributed.all_reduce_mean(torch.stack(losses).float().mean()).item()
    run.log.write(record)
    shown = [v for k, v in record.items() if k.startswith("loss/")]
    bar.set_postfix(loss=f"{np.mean(shown):.4f}" if shown else "-", lr=f"{record['lr']:.2e}",
                    ex_s=record["examples_per_sec"])


class MetricsLog:
    """Append-only JSON lines; rank 0 only. Each line is flushed, so a killed run keeps what it logged.

    Non-finite numbers are written as null (strict JSON: jq and pandas read every line)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

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
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, self.path)
        if resumed_step is not None:
            self.write({"step": resumed_step, "event": "resumed", "checkpoint": str(checkpoint)})

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(_finite_or_null(record)) + "\n")


def _finite_or_null(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    return value
