"""Train a sentence encoder with the multi-sentence-BERTino V5 recipe (GradCache MNRL + CoSENT, Matryoshka).

    python train.py --config configs/v5.json [key.sub=value ...]
    torchrun --nproc_per_node=N train.py --config configs/v5.json [key.sub=value ...]

This file is the recipe, top to bottom: set-up → the loop → one step → what happens around steps → the end.
Why this file is long (~490 lines): it is the whole recipe, as nanoGPT's train.py and a torchtune recipe hold
theirs — reading it is reading a run; the pieces it calls are the small modules of bertino/.
One training step, in the order things happen:
    batch of ONE task (rows) → all its texts tokenized once
    cached loss:  GradCache pass 1 (no grad, autocast) → pass 2 (loss, scaled cache) → pass 3 (recompute, backward)
    plain loss:   one forward of the batch (autocast) → scaled loss → backward
    (bertino/step.py; the speed-ups of the config's `speedups` section switch parts of the passes: `null` runs the
    textbook, bertino/grad_cache.py)
    unscale_ → clip → optimizer step (skipped on a non-finite loss or gradient) → scaler update → scheduler step

Reliability, in the order it happens:
* Everything is checked before the run folder is touched: config, model, every row of every task, that each task
  fills a batch, eval files, the checkpoint to resume. A mistake is one line `error: ...` and exit code 2.
* `checkpoint-STEP/` is written atomically (bertino/plumbing/run_checkpoints.py); `train.resume_from_checkpoint`
  (a folder, or true for the latest) continues bitwise as the uninterrupted run would have (same hardware).
* SIGTERM / SIGINT (a pre-emption notice, Ctrl-C): the current step finishes, a checkpoint is written, and the
  process exits with 128 + the signal number. A second signal interrupts at once.
* A step whose loss or gradient is not finite is skipped (weights and optimizer moments unchanged; the step counter
  and LR schedule advance) and logged. Under fp16 a gradient overflow is the GradScaler's business (it lowers the
  scale); `train.max_consecutive_nonfinite` non-finite losses in a row stop the run with exit code 2.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from bertino import SentenceEncoder, distributed
from bertino.build import build_step, start_process
from bertino.errors import BertinoError, DataError
from bertino.evaluation import IRSet, STSSet, embed_sets, format_table, score_sets, storage_vs_quality
from bertino.optim import make_optimizer, make_scheduler
from bertino.plumbing import run_checkpoints, run_folder
from bertino.plumbing.cli import ArgumentParser, run_cli
from bertino.plumbing.config import Config, check_against_model, config_to_dict, load_config, save_config
from bertino.plumbing.data import TaskData, batch_schedule, load_run_data
from bertino.plumbing.eval_data import load_eval_sets
from bertino.plumbing.files import read_json, restore_half_replaced, write_failure
from bertino.plumbing.metrics_log import LogWindow, MetricsLog
from bertino.plumbing.stop_signal import StopSignal
from bertino.plumbing.tensorboard_log import TensorBoardLog, require_tensorboard
from bertino.plumbing.weights import load_into, read_weights
from bertino.sampler import MultiTaskBatchSampler
from bertino.step import Step
from bertino.vector_indexes import require_faiss


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a JSON config, e.g. configs/v5.json")
    p.add_argument("overrides", nargs="*", help="dotted overrides with JSON values: train.max_steps=10")
    return p.parse_args(argv)


def warn(message: str, is_main: bool = True) -> None:
    if is_main:
        print(f"warning: {message}", file=sys.stderr)


# ──────────────────────────────────────────────────────────────────────────────────────────────── set-up
@dataclass
class Run:
    """Everything `setup` builds and checks before the run folder is touched; the loop reads and advances it."""

    cfg: Config
    out: Path  # train.output_dir
    resume_from: Path | None  # the checkpoint this run continues
    dist_info: distributed.DistInfo
    device: torch.device
    amp_dtype: torch.dtype | None  # None: fp32, no autocast
    encoder: SentenceEncoder
    step: Step  # a batch → its loss and gradient (bertino/step.py: GradCache, the masks, the speed-ups, the scaler)
    tasks: dict[str, TaskData]
    holdouts: dict[str, TaskData]  # each task's held-out rows (tasks.NAME.holdout), evaluated, never trained on
    batches: MultiTaskBatchSampler
    steps_per_epoch: int
    total_steps: int
    eval_sets: tuple[list[IRSet], list[STSSet]]
    eval_dims: list[int]
    run_config: dict  # the resolved config, saved with every checkpoint
    state: run_checkpoints.TrainerState
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    log: MetricsLog  # metrics.jsonl (and its TensorBoard mirror)
    precision_results: dict | None = None  # {precision: {dim: {set: metrics}}} for the card being written
    base_results: dict | None = None  # eval.compare_base: the base model on the same sets, once per run

    @property
    def is_main(self) -> bool:
        return self.dist_info.is_main

    @property
    def scaler(self) -> torch.amp.GradScaler:
        return self.step.scaler  # fp16's loss scaling (the identity otherwise): the cache carries its scale


def setup(cfg: Config) -> Run:
    """Check everything and build the run (model, data, optimizer, state) without touching the run folder."""
    train = cfg.train
    out = Path(train.output_dir)
    resume_from, notices = run_folder.resolve_resume(train.resume_from_checkpoint, out)
    local_model = Path(cfg.model.name_or_path).expanduser()
    run_folder.check_output_dir(out, resume_from, local_model if local_model.is_dir() else None)
    if resume_from is not None:
        saved_state, saved_config = run_checkpoints.read_checkpoint(resume_from)
    if "tensorboard" in train.report_to:
        require_tensorboard()  # on every rank: a missing extra stops them all here, before anything is written
    if cfg.eval.index:
        require_faiss()  # the same for the FAISS indexes of the cards' storage-vs-quality table
    process = start_process(cfg)  # torchrun (train.ddp_timeout), every generator seeded, the autocast dtype
    dist_info, device = process.dist_info, process.device
    for notice in notices:
        warn(notice, dist_info.is_main)

    # ---- model: a resume loads the checkpoint's own folder (its weights, config and tokenizer belong together)
    encoder = SentenceEncoder.from_pretrained(resume_from or cfg.model.name_or_path,
                                              max_seq_length=cfg.model.max_seq_length)
    check_against_model(cfg, encoder.dim, encoder.model.config.max_position_embeddings)
    # the step: dropout masks, the speed-ups of cfg.speedups, DDP, autocast, GradScaler (bertino/build.py)
    step = build_step(cfg, encoder, process)

    # ---- data
    data = load_run_data(cfg)
    tasks = data.tasks
    batches = batch_schedule(cfg, tasks, dist_info.world_size, dist_info.rank)
    steps_per_epoch = len(batches)
    fingerprint = run_checkpoints.data_fingerprint(  # saved with every checkpoint: a resume must see the rows
        tasks, like=saved_state.data_fingerprint if resume_from is not None else None)
    if dist_info.enabled:  # before the first collective of training: ranks that read other rows would hang it
        check_same_data(distributed.gather_objects({"rows": fingerprint, "steps": steps_per_epoch}, device))
    total_steps = train.max_steps if train.max_steps > 0 else train.num_train_epochs * steps_per_epoch
    eval_sets = load_eval_sets(cfg.eval.ir, cfg.eval.sts, data.holdouts)
    eval_dims = list(cfg.eval.dims or (cfg.matryoshka.dims if cfg.matryoshka else [encoder.dim]))
    run_config = config_to_dict(cfg)
    state = run_checkpoints.TrainerState(world_size=dist_info.world_size, data_fingerprint=fingerprint)
    if resume_from is not None:
        for message in run_checkpoints.check_resume(resume_from, saved_state, saved_config, run_config,
                                                    dist_info.world_size, fingerprint):
            warn(message, dist_info.is_main)
        state = saved_state
        state.data_fingerprint = fingerprint

    # ---- optimizer
    optimizer = make_optimizer(encoder, train.learning_rate, train.weight_decay,
                               fused=cfg.speedups is not None and cfg.speedups.adamw_fused)
    scheduler = make_scheduler(optimizer, total_steps, train.warmup_ratio, train.lr_scheduler_type)
    if resume_from is not None:  # last: restoring the RNG must be the final thing before the first step
        run_checkpoints.restore_training_state(resume_from, dist_info.rank, optimizer, scheduler, step.scaler)
    return Run(cfg=cfg, out=out, resume_from=resume_from, dist_info=dist_info, device=device,
               amp_dtype=process.amp_dtype, encoder=encoder, step=step, tasks=tasks, holdouts=data.holdouts,
               batches=batches, steps_per_epoch=steps_per_epoch, total_steps=total_steps, eval_sets=eval_sets,
               eval_dims=eval_dims, run_config=run_config, state=state, optimizer=optimizer, scheduler=scheduler,
               log=MetricsLog(out / "metrics.jsonl", enabled=dist_info.is_main, mirror=tensorboard_log(cfg, out,
                                                                                                      dist_info)))


def tensorboard_log(cfg: Config, out: Path, dist_info: distributed.DistInfo) -> TensorBoardLog | None:
    """`train.report_to: ["tensorboard"]`: rank 0 mirrors metrics.jsonl into train.logging_dir (default out/runs)."""
    if "tensorboard" not in cfg.train.report_to or not dist_info.is_main:
        return None
    return TensorBoardLog(Path(cfg.train.logging_dir) if cfg.train.logging_dir else out / "runs", run_dir=out)


def check_same_data(per_rank: list[dict]) -> None:
    """Every rank must train on the same rows (each takes its own slice of every global batch)."""
    if all(r == per_rank[0] for r in per_rank):
        return
    problems = []
    for rank, r in enumerate(per_rank[1:], start=1):
        for task, fp in sorted(r["rows"].items()):
            ref = per_rank[0]["rows"].get(task)
            if ref is None or ref != fp:
                what = (f"{ref['rows']} rows on rank 0, {fp['rows']} on rank {rank}" if ref and ref["rows"] !=
                        fp["rows"] else f"the same {fp['rows']} rows count, other content")
                problems.append(f"task {task!r}: {what}")
        if r["steps"] != per_rank[0]["steps"] and not problems:
            problems.append(f"{per_rank[0]['steps']} steps per epoch on rank 0, {r['steps']} on rank {rank}")
    raise DataError("the ranks read different training data (" + "; ".join(problems) + "): every process must "
                    "see the same files (on every node); nothing was written")


def open_run_folder(run: Run) -> None:
    """Rank 0 creates the run folder, writes config.json and starts metrics.jsonl, once every rank is ready."""
    distributed.barrier()  # every rank has checked everything: only now does rank 0 write
    if run.is_main:
        try:
            run.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BertinoError(f"train.output_dir: cannot create {run.out}: {e.strerror or e}") from None
        restore_half_replaced(run.out)
        save_config(run.cfg, run.out / "config.json")
        if run.resume_from is not None:  # from another run's folder: its best/ comes along
            message = run_folder.carry_best_model(run.resume_from, run.out, run.state.best_step)
            if message:
                warn(message)
        print(summary_line(run), file=sys.stderr)
    run.log.start(resumed_step=run.state.step if run.resume_from is not None else None, checkpoint=run.resume_from)


def summary_line(run: Run) -> str:
    """What the run will do, in one line: rows per task (held out, dropped), steps per epoch and in all."""
    per_task = []
    for name, data in run.tasks.items():
        extra = [f"{len(run.holdouts[name])} held out"] if name in run.holdouts else []
        extra += [f"{data.dropped_rows} dropped: short negatives lists"] if data.dropped_rows else []
        extra += [f"{sum(data.bad_rows.values())} dropped: bad rows"] if data.bad_rows else []
        per_task.append(f"{name} {len(data)}" + (f" ({', '.join(extra)})" if extra else ""))
    return (f"bertino: {sum(len(t) for t in run.tasks.values())} rows in {len(run.tasks)} task(s) "
            f"[{'; '.join(per_task)}], {run.steps_per_epoch} steps/epoch, {run.total_steps} steps, "
            f"{run.dist_info.world_size} process(es) on {run.device}, autocast {run.amp_dtype or torch.float32}"
            + (f", resuming from {run.resume_from}" if run.resume_from else ""))


# ──────────────────────────────────────────────────────────────────────────────────────────────── the loop
def train_loop(run: Run) -> None:
    """Steps until `total_steps`, from the state's position in the data; logs, evaluates and saves on schedule."""
    from tqdm.auto import tqdm

    state, train = run.state, run.cfg.train
    batches = run.batches.stream(state.epoch, state.batch_in_epoch)  # resumes mid-epoch where the state says
    window = LogWindow.restore(state.log_window)  # a resumed run's next line averages the same steps
    with StopSignal() as stop, tqdm(total=run.total_steps, initial=state.step, disable=not run.is_main,
                                    desc="train", unit="step", dynamic_ncols=True) as bar:  # closed even on an error
        while state.step < run.total_steps:
            epoch, index, task_name, rows = next(batches)
            parts = {}  # the unweighted loss at each Matryoshka dim
            loss = run.step.loss_and_gradient(task_name, run.tasks[task_name], rows, state.step, parts)
            result = optimizer_step(run, loss)
            state.step, state.epoch, state.batch_in_epoch = state.step + 1, epoch, index + 1
            if result.taken:
                state.nonfinite_in_a_row = 0
                window.add(task_name, loss, parts)
            else:
                record_skipped_step(run, task_name, result)

            # ---- logging, evaluation, stopping, checkpoints
            window.examples += len(rows) * run.dist_info.world_size
            bar.update(1)
            last = state.step == run.total_steps
            if state.step % train.logging_steps == 0 or last:
                log_progress(run, window, result.grad_norm, bar)
                window = LogWindow()
            if train.eval_steps > 0 and state.step % train.eval_steps == 0 and not last:
                with window.pause():
                    evaluate(run)
            stop_everywhere = not distributed.all_ranks_agree([stop.signum is None], run.device)[0]
            if stop_everywhere and not last:
                stop_after_signal(run, stop.signum, bar, window)
            if train.save_steps > 0 and state.step % train.save_steps == 0 and not last:
                with window.pause():
                    save_checkpoint(run, window)


# ──────────────────────────────────────────────────────────────────────────────────────────────── one step
class StepResult(NamedTuple):
    grad_norm: torch.Tensor  # () before clipping
    loss_finite: bool  # on every rank
    grad_finite: bool

    @property
    def taken(self) -> bool:
        return self.loss_finite and self.grad_finite


def optimizer_step(run: Run, loss: torch.Tensor) -> StepResult:
    """unscale → clip → step (unless the loss or gradient is not finite) → update → schedule → zero the grads."""
    scaler, optimizer, max_norm = run.scaler, run.optimizer, run.cfg.train.max_grad_norm
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.encoder.parameters(), max_norm if max_norm > 0 else float("inf"))
    # note: a host sync per step (and a tiny all-reduce under DDP, so that all ranks decide alike)
    loss_finite, grad_finite = distributed.all_ranks_agree(
        [bool(torch.isfinite(loss)), bool(torch.isfinite(grad_norm))], run.device)
    if loss_finite and grad_finite:
        scaler.step(optimizer)  # = optimizer.step() (the gradients are known to be finite)
    scaler.update()  # fp16: halves the scale after an overflow; a no-op when disabled
    run.scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(grad_norm, loss_finite, grad_finite)


def record_skipped_step(run: Run, task_name: str, result: StepResult) -> None:
    """Log a skipped step; too many non-finite losses or gradients in a row stop the run (fp16 overflows don't)."""
    state, scaler = run.state, run.scaler
    state.skipped_steps += 1
    overflow = scaler.is_enabled() and result.loss_finite  # an fp16 gradient overflow: the scaler's job
    cause = "loss" if not result.loss_finite else "gradient"
    state.nonfinite_in_a_row += 0 if overflow else 1
    run.log.write({"step": state.step, "task": task_name,
                   "skipped": "fp16 gradient overflow" if overflow else f"non-finite {cause}",
                   "nonfinite_in_a_row": state.nonfinite_in_a_row,
                   "loss_scale": scaler.get_scale() if scaler.is_enabled() else None})
    if state.nonfinite_in_a_row >= run.cfg.train.max_consecutive_nonfinite:
        found = run_folder.list_checkpoints(run.out)
        raise BertinoError(
            f"{state.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient (the last: step "
            f"{state.step}, task {task_name!r}, its {cause}); stopping (train.max_consecutive_nonfinite). Lower "
            f"train.learning_rate or check the data" + (f"; the last checkpoint is {found[-1][1]}" if found else ""))


# ──────────────────────────────────────────────────────────────────────────────────────────────── around the steps
def log_progress(run: Run, window: LogWindow, grad_norm: torch.Tensor, bar) -> None:
    """One metrics.jsonl line for the steps since the last: loss per task (mean over steps and ranks), LR, speed."""
    state, scaler = run.state, run.scaler
    record = {"step": state.step, "epoch": round(state.epoch + state.batch_in_epoch / run.steps_per_epoch, 4),
              "lr": run.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
              "loss_scale": scaler.get_scale() if scaler.is_enabled() else 1.0,
              "examples_per_sec": window.examples_per_sec(), "skipped_steps": state.skipped_steps}
    for key, losses in window.losses.items():  # "loss/TASK" (weighted total), "loss/TASK/DIMd" (unweighted)
        record[f"loss/{key}"] = distributed.all_reduce_mean(torch.stack(losses).float().mean()).item()
    run.log.write(record)
    totals = [v for k, v in record.items() if k.startswith("loss/") and k.count("/") == 1]
    smallest = min(run.cfg.matryoshka.dims) if run.cfg.matryoshka else None
    at_smallest = [v for k, v in record.items() if smallest and k.endswith(f"/{smallest}d")]
    bar.set_postfix(loss=f"{np.mean(totals):.4f}" if totals else "-",
                    **({f"loss_{smallest}d": f"{np.mean(at_smallest):.4f}"} if at_smallest else {}),
                    lr=f"{record['lr']:.2e}", ex_s=record["examples_per_sec"])


def evaluate(run: Run, final: bool = False) -> dict | None:
    """Rank 0 evaluates (the others wait at the barrier) → {dim: {set: {metric: value}}}. A new best score of
    `train.metric_for_best_model` (its mean over the eval sets, at the largest eval dim) is saved to best/. For the
    cards' storage-vs-quality table the retrieval sets are also scored at `eval.precision` and through the FAISS
    indexes of `eval.index` — only when a card will be written (a new best, or `final`), since no log holds those
    numbers."""
    state, results = run.state, None
    if run.is_main and any(run.eval_sets):
        ir_sets, sts_sets = run.eval_sets
        embedded = embed_sets(run.encoder, ir_sets, sts_sets, batch_size=run.cfg.eval.batch_size,
                              show_progress_bar=False)  # every text once; each dim, each precision from these
        results = score_sets(embedded, ir_sets, sts_sets, run.eval_dims)
        run.encoder.train()
        run.log.write({"step": state.step, "eval": {str(d): r for d, r in results.items()}})
        score = best_metric_value(results, run.cfg.train.metric_for_best_model, max(run.eval_dims))
        new_best = score is not None and (state.best_metric is None or score > state.best_metric)
        e = run.cfg.eval
        run.precision_results = (storage_vs_quality(embedded, ir_sets, run.eval_dims, e.precision, rescore=e.rescore,
                                                    int8_quantile=e.int8_quantile, indexes=e.index,
                                                    float_results=results)
                                 if new_best or final else None)
        if new_best:
            state.best_metric, state.best_step = score, state.step
            save_model(run, run.out / "best", results)
    distributed.barrier()
    return results


def best_metric_value(results: dict, metric: str, dim: int) -> float | None:
    """`metric` at `dim`, averaged over the eval sets that report it."""
    values = [m[metric] for m in results.get(dim, {}).values() if metric in m]
    return float(np.mean(values)) if values else None


def base_model_results(run: Run) -> dict | None:
    """`eval.compare_base`: the base model (`model.name_or_path`, as downloaded) on the run's eval sets, evaluated
    the first time a card needs it (also after a resume, which loads the checkpoint, not the base)."""
    if not run.cfg.eval.compare_base or not any(run.eval_sets):
        return None
    if run.base_results is None:
        base = SentenceEncoder.from_pretrained(run.cfg.model.name_or_path,
                                               max_seq_length=run.cfg.model.max_seq_length)
        base.to(run.device)
        ir_sets, sts_sets = run.eval_sets
        embedded = embed_sets(base, ir_sets, sts_sets, batch_size=run.cfg.eval.batch_size, show_progress_bar=False)
        run.base_results = score_sets(embedded, ir_sets, sts_sets, run.eval_dims)
    return run.base_results


def save_model(run: Run, folder: Path, results: dict | None) -> None:
    """best/ or final/: a sentence-transformers folder with a generated model card, written atomically."""
    try:
        run_folder.save_model_folder(run.encoder, folder, run.cfg, results, run.eval_dims,
                                     run.precision_results if results else None,
                                     base_results=base_model_results(run) if results else None)
    except Exception as e:
        reason = write_failure(e)
        if reason is None:
            raise
        shutil.rmtree(run_folder.tmp_dir_for(folder), ignore_errors=True)
        raise BertinoError(f"cannot write {folder}: {reason}: the disk is full or a file size limit was hit; the "
                           f"checkpoints are intact") from None


def save_checkpoint(run: Run, window: LogWindow) -> Path:
    """`checkpoint-STEP/`: rank 0 writes the weights and training state (with the losses logged since the last
    metrics line), every rank its RNG state; atomic."""
    final = run.out / f"checkpoint-{run.state.step}"
    run.state.log_window = window.snapshot()
    tmp = run_folder.tmp_dir_for(final)

    def write_model(folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)
        run.encoder.save_pretrained(folder, matryoshka_dims=run.eval_dims)

    try:
        run_checkpoints.save_checkpoint(tmp, final, rank=run.dist_info.rank, write_model=write_model,
                                        state=run.state, optimizer=run.optimizer, scheduler=run.scheduler,
                                        scaler=run.scaler, run_config=run.run_config, barrier=distributed.barrier)
        if run.is_main:
            run_folder.rotate_checkpoints(run.out, run.cfg.train.save_total_limit, run.state.best_step)
    except Exception as e:  # disk full, quota, file size limit: the earlier checkpoints are untouched
        reason = write_failure(e)
        if reason is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise BertinoError(f"cannot write {final}: {reason}: the disk is full or a file size limit was hit; the "
                           f"earlier checkpoints are intact (resume with train.resume_from_checkpoint=true once "
                           f"there is room)") from None
    distributed.barrier()
    return final


def stop_after_signal(run: Run, signum: int | None, bar, window: LogWindow) -> None:
    """Save a checkpoint, then exit with 128 + the signal number, as the signal itself would have."""
    saved = save_checkpoint(run, window)
    bar.close()
    name = signal.Signals(signum).name if signum else "a signal on another rank"
    if run.is_main:
        print(f"bertino: stopped by {name} after step {run.state.step}; saved {saved}. Continue with "
              f"train.resume_from_checkpoint=true", file=sys.stderr)
    distributed.cleanup()
    raise SystemExit(128 + (signum or signal.SIGTERM))


# ──────────────────────────────────────────────────────────────────────────────────────────────── the end
def finish(run: Run) -> None:
    """A last evaluation, then `final/`: the best model's weights under load_best_model_at_end, else the last.

    The run's steps are done: a SIGTERM now lets `final/` be written and the run end normally (a second one
    interrupts)."""
    with StopSignal() as stop:
        results = evaluate(run, final=True)
        if run.is_main:
            best = run.out / "best"
            if run.cfg.train.load_best_model_at_end and best.exists():
                load_into(run.encoder.model, read_weights(best), source=str(best))
                results = {int(d): r for d, r in read_json(best / "eval_results.json").items()}
                by_precision = best / run_folder.PRECISION_RESULTS  # absent in a best/ of an older bertino
                run.precision_results = read_json(by_precision) if by_precision.is_file() else None
            save_model(run, run.out / "final", results)
            if results:
                print(format_table(results))
            print(f"bertino: final model in {run.out / 'final'}", file=sys.stderr)
        distributed.barrier()
        distributed.cleanup()
    if stop.signum is not None and run.is_main:
        print(f"bertino: {signal.Signals(stop.signum).name} came after the last step; the run is complete",
              file=sys.stderr)


def main(argv=None) -> None:
    args = parse_args(argv)
    with warnings.catch_warnings():  # scoped: in-process callers (tests, notebooks) keep their own filters
        # A skipped step still advances the schedule (the LR is a function of the step counter), so torch's warning
        # about scheduler.step() before the first optimizer.step() (fp16's first steps often overflow) is expected.
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        run = setup(load_config(args.config, args.overrides))  # a mistake stops the run here, before any write
        try:
            open_run_folder(run)
            train_loop(run)
            finish(run)
        finally:
            run.log.close()


def cli(argv=None) -> None:
    """Entry point: a user's mistake (BertinoError) is one line on stderr and exit code 2, no traceback."""
    sys.exit(run_cli(main, argv, cleanup=distributed.cleanup))


if __name__ == "__main__":
    cli()
