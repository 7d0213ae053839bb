"""Train a sentence encoder with the multi-sentence-BERTino V5 recipe (GradCache MNRL + CoSENT, Matryoshka).

    python train.py --config configs/v5.json [key.sub=value ...]
    torchrun --nproc_per_node=N train.py --config configs/v5.json [key.sub=value ...]

One training step, in the order things happen:
    batch of ONE task (rows) → all its texts tokenized once
    cached loss:  GradCache pass 1 (no grad, autocast) → pass 2 (loss, scaled cache) → pass 3 (recompute, backward)
    plain loss:   one forward of the batch (autocast) → scaled loss → backward
    unscale_ → clip → optimizer step (skipped on a non-finite loss or gradient) → scaler update → scheduler step

Reliability, in the order it happens:
* Everything is checked before the run folder is touched: config, model, every row of every task, that each task
  fills a batch, eval files, the checkpoint to resume. A mistake is one line `error: ...` and exit code 2.
* `checkpoint-STEP/` is written atomically (see bertino/trainer_state.py); `train.resume_from_checkpoint`
  (a folder, or true for the latest) continues bitwise as the uninterrupted run would have (same hardware).
  On resume, metrics.jsonl drops the lines of steps after the checkpoint (they are trained again) and gets a
  `{"step": N, "event": "resumed"}` line, so it reads as one run.
* SIGTERM / SIGINT (a pre-emption notice, Ctrl-C): the current step finishes, a checkpoint is written, and the
  process exits with 128 + the signal number. A second signal interrupts at once.
* A step whose loss or gradient is not finite is skipped (weights and optimizer moments unchanged; the step counter
  and LR schedule advance) and logged. Under fp16 a gradient overflow is the GradScaler's business (it lowers the
  scale); `train.max_consecutive_nonfinite` non-finite losses in a row stop the run with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import warnings
from pathlib import Path
from typing import NoReturn

import torch

from bertino import SentenceEncoder, distributed
from bertino.checkpoint import load_into, read_weights
from bertino.cli import ArgumentParser, run_cli
from bertino.config import Config, check_against_model, config_to_dict, effective_scale, load_config, save_config
from bertino.data import load_tasks
from bertino.errors import BertinoError
from bertino.evaluation import format_table, load_eval_sets
from bertino.grad_cache import grad_cache_step, make_mini_batches, pad_batch
from bertino.linear_tape import DEFAULT_TAPED
from bertino.objectives import PAIR_LOSSES, Objective
from bertino.optim import make_optimizer, make_scheduler
from bertino import trainer_state as ts
from bertino.training import (LogWindow, MetricsLog, Run, StopSignal, agree, build_batches, log_progress,
                              run_evaluation, save_checkpoint, save_model, seed_everything)


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a JSON config, e.g. configs/v5.json")
    p.add_argument("overrides", nargs="*", help="dotted overrides with JSON values: train.max_steps=10")
    return p.parse_args(argv)


def warn(message: str, is_main: bool = True) -> None:
    if is_main:
        print(f"warning: {message}", file=sys.stderr)


def native_bf16(device: torch.device) -> bool:
    """Does this device run bf16 matmuls natively? (Without AVX512-BF16/AMX a CPU emulates them, ~100× slower.)"""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def precision(cfg: Config, device: torch.device, is_main: bool) -> torch.dtype | None:
    """The autocast dtype: fp16 on CUDA; bf16 where asked (or where fp16 was asked on a machine without CUDA)."""
    tc = cfg.train
    if tc.fp16 and device.type == "cuda":
        return torch.float16
    native = native_bf16(device)
    if tc.fp16:
        warn("train.fp16 needs CUDA and this machine has none: training with "
             + ("bfloat16 autocast instead (no GradScaler needed)." if native
                else "fp32 instead (this CPU has no native bfloat16)."), is_main)
        return torch.bfloat16 if native else None
    if tc.bf16 == "auto":
        return torch.bfloat16 if native else None
    if tc.bf16 and not native:
        warn(f"train.bf16: {device.type} has no native bfloat16 matmuls, so bf16 is emulated and much slower "
             "than fp32 here; bf16=\"auto\" picks it only where it is fast.", is_main)
    return torch.bfloat16 if tc.bf16 else None


# ──────────────────────────────────────────────────────────────────────────────────────────────── set-up
def setup(cfg: Config) -> Run:
    """Check everything and build the run (model, data, optimizer, state) without touching the run folder."""
    tc = cfg.train
    out = Path(tc.output_dir)
    resume_from = ts.resolve_resume(tc.resume_from_checkpoint, out)
    ts.check_output_dir(out, resuming=resume_from is not None)
    if resume_from is not None:
        saved_state, saved_config = ts.read_checkpoint(resume_from)
    dist_info, device = distributed.setup()
    is_main = dist_info.is_main
    seed_everything(tc.seed)
    amp_dtype = precision(cfg, device, is_main)
    # nanoGPT's trick: one code path, the scaler is a no-op unless fp16.
    scaler = torch.amp.GradScaler(device.type, enabled=(amp_dtype == torch.float16))

    # ---- model
    # A resume loads the checkpoint's own folder: its weights, config and tokenizer belong together.
    encoder = SentenceEncoder.from_pretrained(resume_from or cfg.model.name_or_path,
                                              max_seq_length=cfg.model.max_seq_length)
    check_against_model(cfg, encoder.dim, encoder.model.config.max_position_embeddings)
    encoder.to(device).train()

    # ---- data
    tasks = load_tasks(cfg)
    batches = build_batches(cfg, tasks, dist_info.world_size, dist_info.rank)
    steps_per_epoch = len(batches)
    total_steps = tc.max_steps if tc.max_steps > 0 else tc.num_train_epochs * steps_per_epoch
    objectives = {
        name: Objective(t.loss, effective_scale(t), cfg.matryoshka.dims if cfg.matryoshka else None,
                        cfg.matryoshka.weights if cfg.matryoshka else None, gather=tc.gather_across_devices)
        for name, t in cfg.tasks.items()
    }
    eval_ir, eval_sts = load_eval_sets(cfg.eval.ir, cfg.eval.sts)
    eval_dims = list(cfg.eval.dims or (cfg.matryoshka.dims if cfg.matryoshka else [encoder.dim]))
    run_config = config_to_dict(cfg)
    fingerprint = ts.data_fingerprint(tasks)  # saved with every checkpoint: a resume must see the same rows
    state = ts.TrainerState(world_size=dist_info.world_size, data_fingerprint=fingerprint)
    if resume_from is not None:
        for message in ts.check_resume(resume_from, saved_state, saved_config, run_config, dist_info.world_size,
                                       fingerprint):
            warn(message, is_main)
        state = saved_state
        state.data_fingerprint = fingerprint

    # ---- optimizer, DDP
    optimizer = make_optimizer(encoder, tc.learning_rate, tc.weight_decay)
    scheduler = make_scheduler(optimizer, total_steps, tc.warmup_ratio, tc.lr_scheduler_type)
    model = encoder
    if dist_info.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            encoder, device_ids=[device.index] if device.type == "cuda" else None)
    if resume_from is not None:  # last: restoring the RNG must be the final thing before the first step
        ts.restore_training_state(resume_from, dist_info.rank, optimizer, scheduler, scaler)
    return Run(cfg=cfg, out=out, resume_from=resume_from, dist_info=dist_info, device=device, amp_dtype=amp_dtype,
               scaler=scaler, encoder=encoder, model=model, tasks=tasks, batches=batches, objectives=objectives,
               steps_per_epoch=steps_per_epoch, total_steps=total_steps, eval_ir=eval_ir, eval_sts=eval_sts,
               eval_dims=eval_dims, run_config=run_config, state=state, optimizer=optimizer, scheduler=scheduler,
               log=MetricsLog(out / "metrics.jsonl", enabled=is_main))


def open_run_folder(run: Run) -> None:
    """Rank 0 creates the run folder, writes config.json and starts metrics.jsonl, once every rank is ready."""
    out, tasks = run.out, run.tasks
    distributed.barrier()  # every rank has checked everything: only now does rank 0 write
    if run.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BertinoError(f"train.output_dir: cannot create {out}: {e.strerror or e}") from None
        ts.clean_stale(out)
        save_config(run.cfg, out / "config.json")
        if run.resume_from is not None:  # from another run's folder: its best/ comes along
            message = ts.carry_best_model(run.resume_from, out, run.state.best_step)
            if message:
                warn(message)
        print(f"bertino: {sum(len(t) for t in tasks.values())} rows in {len(tasks)} task(s), {run.steps_per_epoch} "
              f"steps/epoch, {run.total_steps} steps, {run.dist_info.world_size} process(es) on {run.device}, "
              f"precision {run.amp_dtype or torch.float32}"
              + (f", resuming from {run.resume_from}" if run.resume_from else ""), file=sys.stderr)
    run.log.start(resumed_step=run.state.step if run.resume_from is not None else None, checkpoint=run.resume_from)


# ──────────────────────────────────────────────────────────────────────────────────────────────── one step
def forward_backward(run: Run, task_name: str, rows: list[int]) -> torch.Tensor:
    """Encode a batch of one task, compute its loss, backpropagate the scaled loss → the loss () (detached)."""
    data, task, tc = run.tasks[task_name], run.cfg.tasks[task_name], run.tc
    n_cols = len(data.columns)
    # column after column: texts[c·B + i] is column c of row i (what Objective expects)
    texts = [data.texts[r][c] for c in range(n_cols) for r in rows]
    scores = (torch.as_tensor(data.scores[rows], device=run.device)
              if task.loss in PAIR_LOSSES else None)  # (B,)

    def loss_fn(reps: torch.Tensor) -> torch.Tensor:  # reps (n_cols·B, D) → ()
        return run.objectives[task_name](reps, n_cols, scores)

    token_ids = run.encoder.token_ids(texts)
    if task.loss == "cached_mnrl":
        mini = make_mini_batches(token_ids, tc.mini_batch_size, run.pad_id, run.device)
        return grad_cache_step(run.encoder, run.model, mini, loss_fn, run.scaler.scale,
                               keep_graphs=tc.grad_cache_memory_budget, autocast=run.autocast,
                               tape_linears=DEFAULT_TAPED if tc.grad_cache_linear_tape else ())
    features = {k: v.to(run.device) for k, v in pad_batch(token_ids, range(len(texts)), run.pad_id).items()}
    with run.autocast():
        reps = run.model(features)  # (n_cols·B, D)
    loss = loss_fn(reps)
    run.scaler.scale(loss).backward()
    return loss.detach()


def optimizer_step(run: Run, loss: torch.Tensor, stop: StopSignal) -> tuple[bool, bool, bool, torch.Tensor]:
    """unscale → clip → step → update → schedule; the step counter advances even when the step is skipped.

    Returns (loss finite, gradient finite, go on: no stop signal on any rank, gradient norm ())."""
    tc, scaler, optimizer, state = run.tc, run.scaler, run.optimizer, run.state
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(
        run.encoder.parameters(), tc.max_grad_norm if tc.max_grad_norm > 0 else float("inf"))
    # note: one host sync per step (and one tiny all-reduce under DDP, so all ranks decide alike)
    loss_ok, grads_ok, go_on = agree([bool(torch.isfinite(loss)), bool(torch.isfinite(grad_norm)),
                                      stop.signum is None], run.dist_info, run.device)
    if loss_ok and grads_ok:
        scaler.step(optimizer)  # = optimizer.step() (the gradients are known to be finite)
    scaler.update()  # fp16: halves the scale after an overflow; a no-op when disabled
    run.scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.batch_in_epoch += 1
    return loss_ok, grads_ok, go_on, grad_norm


def count_step(run: Run, window: LogWindow, task_name: str, loss: torch.Tensor, loss_ok: bool,
               grads_ok: bool) -> None:
    """Keep the loss of a step taken; log a skipped one, and stop after too many non-finite losses in a row."""
    state, scaler = run.state, run.scaler
    if loss_ok and grads_ok:
        state.nonfinite_in_a_row = 0
        window.losses.setdefault(task_name, []).append(loss)
        return
    state.skipped_steps += 1
    overflow = scaler.is_enabled() and loss_ok  # fp16 gradient overflow: the scaler's job
    state.nonfinite_in_a_row += 0 if overflow else 1
    run.log.write({"step": state.step, "task": task_name, "skipped": (
        "fp16 gradient overflow" if overflow else f"non-finite {'loss' if not loss_ok else 'gradient'}"),
        "nonfinite_in_a_row": state.nonfinite_in_a_row,
        "loss_scale": scaler.get_scale() if scaler.is_enabled() else None})
    if state.nonfinite_in_a_row >= run.tc.max_consecutive_nonfinite:
        found = ts.list_checkpoints(run.out)
        raise BertinoError(
            f"{state.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient (the last: step "
            f"{state.step}, task {task_name!r}, its {'loss' if not loss_ok else 'gradient'}); stopping "
            f"(train.max_consecutive_nonfinite). Lower "
            f"train.learning_rate or check the data"
            + (f"; the last checkpoint is {found[-1][1]}" if found else ""))


# ──────────────────────────────────────────────────────────────────────────────────────────────── stopping, finishing
def stop_after_signal(run: Run, stop: StopSignal, bar) -> NoReturn:
    """Save a checkpoint, then exit with 128 + the signal number, as the signal itself would have."""
    saved = save_checkpoint(run)
    bar.close()
    name = signal.Signals(stop.signum).name if stop.signum else "a signal on another rank"
    if run.is_main:
        print(f"bertino: stopped by {name} after step {run.state.step}; saved {saved}. Continue with "
              f"train.resume_from_checkpoint=true", file=sys.stderr)
    distributed.cleanup()
    raise SystemExit(128 + (stop.signum or signal.SIGTERM))


def finish(run: Run) -> None:
    """A last evaluation, then `final/`: the best model's weights under load_best_model_at_end, else the last."""
    out = run.out
    results = run_evaluation(run)
    if run.is_main:
        if run.tc.load_best_model_at_end and (out / "best").exists():
            load_into(run.encoder.model, read_weights(out / "best"), source=str(out / "best"))
            results = json.loads((out / "best" / "eval_results.json").read_text())
            results = {int(d): r for d, r in results.items()}
        save_model(run.encoder, out / "final", run.cfg, results, run.eval_dims)
        if results:
            print(format_table(results))
        print(f"bertino: final model in {out / 'final'}", file=sys.stderr)
    distributed.barrier()
    distributed.cleanup()


# ──────────────────────────────────────────────────────────────────────────────────────────────── the run
def main(argv=None) -> None:
    args = parse_args(argv)
    with warnings.catch_warnings():  # scoped: in-process callers (tests, notebooks) keep their own filters
        # A skipped step still advances the schedule (the LR is a function of the step counter), so torch's warning
        # about scheduler.step() before the first optimizer.step() (fp16's first steps often overflow) is expected.
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        run = setup(load_config(args.config, args.overrides))  # a mistake stops the run here, before any write
        open_run_folder(run)
        train_loop(run)
        finish(run)


def train_loop(run: Run) -> None:
    """Steps until `total_steps`, resuming mid-epoch where the state says; logs, evaluates and saves on schedule."""
    state, tc, total_steps = run.state, run.tc, run.total_steps

    from tqdm.auto import tqdm

    window = LogWindow()
    with StopSignal() as stop, tqdm(total=total_steps, initial=state.step, disable=not run.is_main, desc="train",
                                    unit="step", dynamic_ncols=True) as bar:  # closed (newline) even on an error
        while state.step < total_steps:
            run.batches.set_epoch(state.epoch)
            for task_name, rows in run.batches.iter_from(state.batch_in_epoch):
                loss = forward_backward(run, task_name, rows)
                loss_ok, grads_ok, go_on, grad_norm = optimizer_step(run, loss, stop)
                count_step(run, window, task_name, loss, loss_ok, grads_ok)

                # ---- logging, evaluation, checkpoints
                window.examples += len(rows) * run.dist_info.world_size
                bar.update(1)
                if state.step % tc.logging_steps == 0 or state.step == total_steps:
                    log_progress(run, window, grad_norm, bar)
                    window = LogWindow()
                if tc.eval_steps > 0 and state.step % tc.eval_steps == 0 and state.step < total_steps:
                    with window.pause():
                        run_evaluation(run)
                if not go_on and state.step < total_steps:
                    stop_after_signal(run, stop, bar)
                if tc.save_steps > 0 and state.step % tc.save_steps == 0 and state.step < total_steps:
                    with window.pause():
                        save_checkpoint(run)
                if state.step >= total_steps:
                    break
            else:  # the epoch ran out
                state.epoch += 1
                state.batch_in_epoch = 0
                continue
            break


def cli(argv=None) -> None:
    """Entry point: a user's mistake (BertinoError) is one line on stderr and exit code 2, no traceback."""
    sys.exit(run_cli(main, argv, cleanup=distributed.cleanup))


if __name__ == "__main__":
    cli()
