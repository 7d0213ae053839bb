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
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from bertino import SentenceEncoder, distributed
from bertino.checkpoint import load_into, read_weights
from bertino.cli import ArgumentParser, run_cli
from bertino.config import Config, check_against_model, config_to_dict, effective_scale, load_config, save_config
from bertino.data import TaskData, load_tasks
from bertino.errors import BertinoError, DataError
from bertino.evaluation import evaluate_sets, format_table, load_eval_sets
from bertino.grad_cache import grad_cache_step, make_mini_batches, pad_batch
from bertino.linear_tape import DEFAULT_TAPED
from bertino.objectives import PAIR_LOSSES, Objective
from bertino.optim import make_optimizer, make_scheduler
from bertino.sampler import MultiTaskBatchSampler, NoDuplicatesBatchSampler, PlainBatchSampler
from bertino import trainer_state as ts


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


def main(argv=None) -> None:
    args = parse_args(argv)
    # A skipped step still advances the schedule (the LR is a function of the step counter), so torch's warning
    # about scheduler.step() before the first optimizer.step() (fp16's first steps often overflow) is expected.
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
    # ---------------------------------------------------------------------------------------- config, processes
    cfg = load_config(args.config, args.overrides)
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

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)

    # ---------------------------------------------------------------------------------------- model
    # A resume loads the checkpoint's own folder: its weights, config and tokenizer belong together.
    encoder = SentenceEncoder.from_pretrained(resume_from or cfg.model.name_or_path,
                                              max_seq_length=cfg.model.max_seq_length)
    check_against_model(cfg, encoder.dim, encoder.model.config.max_position_embeddings)
    encoder.to(device).train()
    pad_id = encoder.tokenizer.pad_token_id

    # ---------------------------------------------------------------------------------------- data
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

    # ---------------------------------------------------------------------------------------- optimizer, DDP
    optimizer = make_optimizer(encoder, tc.learning_rate, tc.weight_decay)
    scheduler = make_scheduler(optimizer, total_steps, tc.warmup_ratio, tc.lr_scheduler_type)
    model = encoder
    if dist_info.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            encoder, device_ids=[device.index] if device.type == "cuda" else None)
    if resume_from is not None:  # last: restoring the RNG must be the final thing before the first step
        ts.restore_training_state(resume_from, dist_info.rank, optimizer, scheduler, scaler)

    # ---------------------------------------------------------------------------------------- run folder
    distributed.barrier()  # every rank has checked everything: only now does rank 0 write
    if is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BertinoError(f"train.output_dir: cannot create {out}: {e.strerror or e}") from None
        ts.clean_stale(out)
        save_config(cfg, out / "config.json")
        print(f"bertino: {sum(len(t) for t in tasks.values())} rows in {len(tasks)} task(s), {steps_per_epoch} "
              f"steps/epoch, {total_steps} steps, {dist_info.world_size} process(es) on {device}, "
              f"precision {amp_dtype or torch.float32}" + (f", resuming from {resume_from}" if resume_from else ""),
              file=sys.stderr)
    log = MetricsLog(out / "metrics.jsonl", enabled=is_main)
    log.start(resumed_step=state.step if resume_from is not None else None, checkpoint=resume_from)

    def save_checkpoint() -> Path:
        final = out / f"checkpoint-{state.step}"
        tmp = ts.tmp_dir_for(final)
        try:
            if is_main:
                shutil.rmtree(tmp, ignore_errors=True)
                encoder.save_pretrained(tmp, matryoshka_dims=eval_dims)
            distributed.barrier()
            ts.save_rank_rng(tmp, dist_info.rank)
            distributed.barrier()
            if is_main:
                ts.save_training_state(tmp, state, optimizer, scheduler, scaler, run_config)
                ts.commit_dir(tmp, final)
                ts.rotate_checkpoints(out, tc.save_total_limit, state.best_step)
        except OSError as e:  # disk full, quota: the earlier checkpoints are untouched
            shutil.rmtree(tmp, ignore_errors=True)
            raise BertinoError(f"cannot write {final}: {e.strerror or e}; the earlier checkpoints are intact "
                               f"(resume with train.resume_from_checkpoint=true once there is room)") from None
        distributed.barrier()
        return final

    def run_evaluation() -> dict | None:
        """Rank 0 evaluates (the others wait at the barrier); returns {dim: {set: {metric: value}}}."""
        results = None
        if is_main and (eval_ir or eval_sts):
            results = evaluate_sets(encoder, eval_ir, eval_sts, eval_dims, batch_size=cfg.eval.batch_size,
                                    show_progress_bar=False)
            encoder.train()
            log.write({"step": state.step, "eval": {str(d): r for d, r in results.items()}})
            score = best_metric_value(results, tc.metric_for_best_model, eval_dims[0])
            if score is not None and (state.best_metric is None or score > state.best_metric):
                state.best_metric, state.best_step = score, state.step
                save_model(encoder, out / "best", cfg, results, eval_dims)
        distributed.barrier()
        return results

    def agree(flags: list[bool]) -> list[bool]:
        """Element-wise AND over ranks, so every rank steps, skips or stops together (identity in one process)."""
        if not dist_info.enabled:
            return flags
        t = torch.tensor(flags, dtype=torch.int32, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return [bool(v) for v in t.tolist()]

    # ---------------------------------------------------------------------------------------- training loop
    from tqdm.auto import tqdm

    window = {"loss": {}, "examples": 0, "t0": time.perf_counter()}
    last_results = None
    with StopSignal() as stop, tqdm(total=total_steps, initial=state.step, disable=not is_main, desc="train",
                                    unit="step", dynamic_ncols=True) as bar:  # closed (newline) even on an error
        while state.step < total_steps:
            batches.set_epoch(state.epoch)
            for task_name, rows in batches.iter_from(state.batch_in_epoch):
                data, task = tasks[task_name], cfg.tasks[task_name]
                n_cols = len(data.columns)
                # column after column: texts[c·B + i] is column c of row i (what Objective expects)
                texts = [data.texts[r][c] for c in range(n_cols) for r in rows]
                scores = (torch.as_tensor(data.scores[rows], device=device)
                          if task.loss in PAIR_LOSSES else None)  # (B,)

                def loss_fn(reps: torch.Tensor) -> torch.Tensor:  # reps (n_cols·B, D) → ()
                    return objectives[task_name](reps, n_cols, scores)

                token_ids = encoder.token_ids(texts)
                if task.loss == "cached_mnrl":
                    mini = make_mini_batches(token_ids, tc.mini_batch_size, pad_id, device)
                    loss = grad_cache_step(encoder, model, mini, loss_fn, scaler.scale,
                                           keep_graphs=tc.grad_cache_memory_budget, autocast=autocast,
                                           tape_linears=DEFAULT_TAPED if tc.grad_cache_linear_tape else ())
                else:
                    features = {k: v.to(device) for k, v in pad_batch(token_ids, range(len(texts)), pad_id).items()}
                    with autocast():
                        reps = model(features)  # (n_cols·B, D)
                    loss = loss_fn(reps)
                    scaler.scale(loss).backward()
                    loss = loss.detach()

                # ---- optimizer step: unscale → clip → step → update → schedule
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    encoder.parameters(), tc.max_grad_norm if tc.max_grad_norm > 0 else float("inf"))
                # note: one host sync per step (and one tiny all-reduce under DDP, so all ranks decide alike)
                loss_ok, grads_ok, go_on = agree([bool(torch.isfinite(loss)), bool(torch.isfinite(grad_norm)),
                                                  stop.signum is None])
                if loss_ok and grads_ok:
                    scaler.step(optimizer)  # = optimizer.step() (the gradients are known to be finite)
                scaler.update()  # fp16: halves the scale after an overflow; a no-op when disabled
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.batch_in_epoch += 1
                if loss_ok and grads_ok:
                    state.nonfinite_in_a_row = 0
                    window["loss"].setdefault(task_name, []).append(loss)
                else:
                    state.skipped_steps += 1
                    overflow = scaler.is_enabled() and loss_ok  # fp16 gradient overflow: the scaler's job
                    state.nonfinite_in_a_row += 0 if overflow else 1
                    log.write({"step": state.step, "task": task_name, "skipped": (
                        "fp16 gradient overflow" if overflow else
                        f"non-finite {'loss' if not loss_ok else 'gradient'}"),
                        "nonfinite_in_a_row": state.nonfinite_in_a_row,
                        "loss_scale": scaler.get_scale() if scaler.is_enabled() else None})
                    if state.nonfinite_in_a_row >= tc.max_consecutive_nonfinite:
                        found = ts.list_checkpoints(out)
                        raise BertinoError(
                            f"{state.nonfinite_in_a_row} steps in a row had a non-finite "
                            f"{'loss' if not loss_ok else 'loss or gradient'} (last at step {state.step}, task "
                            f"{task_name!r}); stopping (train.max_consecutive_nonfinite). Lower "
                            f"train.learning_rate or check the data"
                            + (f"; the last checkpoint is {found[-1][1]}" if found else ""))

                # ---- logging, evaluation, checkpoints
                window["examples"] += len(rows) * dist_info.world_size
                bar.update(1)
                if state.step % tc.logging_steps == 0 or state.step == total_steps:
                    elapsed = time.perf_counter() - window["t0"]
                    record = {"step": state.step,
                              "epoch": round(state.epoch + state.batch_in_epoch / steps_per_epoch, 4),
                              "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                              "loss_scale": scaler.get_scale() if scaler.is_enabled() else 1.0,
                              "examples_per_sec": round(window["examples"] / max(elapsed, 1e-9), 2),
                              "skipped_steps": state.skipped_steps}
                    for name, losses in window["loss"].items():
                        record[f"loss/{name}"] = distributed.all_reduce_mean(
                            torch.stack(losses).float().mean()).item()
                    log.write(record)
                    shown = [v for k, v in record.items() if k.startswith("loss/")]
                    bar.set_postfix(loss=f"{np.mean(shown):.4f}" if shown else "-", lr=f"{record['lr']:.2e}",
                                    ex_s=record["examples_per_sec"])
                    window = {"loss": {}, "examples": 0, "t0": time.perf_counter()}
                if tc.eval_steps > 0 and state.step % tc.eval_steps == 0 and state.step < total_steps:
                    last_results = run_evaluation()
                if not go_on and state.step < total_steps:
                    saved = save_checkpoint()
                    bar.close()
                    name = signal.Signals(stop.signum).name if stop.signum else "a signal on another rank"
                    if is_main:
                        print(f"bertino: stopped by {name} after step {state.step}; saved {saved}. Continue with "
                              f"train.resume_from_checkpoint=true", file=sys.stderr)
                    distributed.cleanup()
                    raise SystemExit(128 + (stop.signum or signal.SIGTERM))
                if tc.save_steps > 0 and state.step % tc.save_steps == 0 and state.step < total_steps:
                    save_checkpoint()
                if state.step >= total_steps:
                    break
            else:  # the epoch ran out
                state.epoch += 1
                state.batch_in_epoch = 0
                continue
            break

    # ---------------------------------------------------------------------------------------- final model
    last_results = run_evaluation()
    if is_main:
        if tc.load_best_model_at_end and (out / "best").exists():
            load_into(encoder.model, read_weights(out / "best"), source=str(out / "best"))
            last_results = json.loads((out / "best" / "eval_results.json").read_text())
            last_results = {int(d): r for d, r in last_results.items()}
        save_model(encoder, out / "final", cfg, last_results, eval_dims)
        if last_results:
            print(format_table(last_results))
        print(f"bertino: final model in {out / 'final'}", file=sys.stderr)
    distributed.barrier()
    distributed.cleanup()


def best_metric_value(results: dict, metric: str, dim: int) -> float | None:
    """`metric` at `dim`, averaged over the eval sets that report it."""
    values = [m[metric] for m in results.get(dim, {}).values() if metric in m]
    return float(np.mean(values)) if values else None


def save_model(encoder: SentenceEncoder, folder: Path, cfg: Config, results: dict | None, dims) -> None:
    """A sentence-transformers folder with a generated model card, written atomically."""
    from bertino.model_card import render_model_card

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


def cli(argv=None) -> None:
    """Entry point: a user's mistake (BertinoError) is one line on stderr and exit code 2, no traceback."""
    sys.exit(run_cli(main, argv, cleanup=distributed.cleanup))


if __name__ == "__main__":
    cli()
