"""Train a sentence encoder with the multi-sentence-BERTino V5 recipe (GradCache MNRL + CoSENT, Matryoshka).

    python train.py --config configs/v5.json [key.sub=value ...]
    torchrun --nproc_per_node=N train.py --config configs/v5.json [key.sub=value ...]

One training step, in the order things happen:
    batch of ONE task (rows) → all its texts tokenized once
    cached loss:  GradCache pass 1 (no grad, autocast) → pass 2 (loss, scaled cache) → pass 3 (recompute, backward)
    plain loss:   one forward of the batch (autocast) → scaled loss → backward
    unscale_ → clip → optimizer step (skipped on inf under fp16) → scaler update → scheduler step
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from bertino import SentenceEncoder, distributed
from bertino.checkpoint import load_into, read_weights
from bertino.config import Config, check_against_model, config_to_dict, effective_scale, load_config
from bertino.data import load_tasks
from bertino.errors import BertinoError, DataError
from bertino.evaluation import evaluate_sets, format_table, load_eval_sets
from bertino.grad_cache import grad_cache_step, make_mini_batches, pad_batch
from bertino.objectives import PAIR_LOSSES, Objective
from bertino.optim import make_optimizer, make_scheduler
from bertino.sampler import MultiTaskBatchSampler, NoDuplicatesBatchSampler, PlainBatchSampler
from bertino import trainer_state as ts


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a JSON config, e.g. configs/v5.json")
    p.add_argument("overrides", nargs="*", help="dotted overrides with JSON values: train.max_steps=10")
    return p.parse_args(argv)


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
        if is_main:
            warnings.warn("train.fp16 needs CUDA and this machine has none: training with "
                          + ("bfloat16 autocast instead (no GradScaler needed)." if native
                             else "fp32 instead (this CPU has no native bfloat16)."), stacklevel=1)
        return torch.bfloat16 if native else None
    if tc.bf16 == "auto":
        return torch.bfloat16 if native else None
    if tc.bf16 and not native and is_main:
        warnings.warn(f"train.bf16: {device.type} has no native bfloat16 matmuls, so bf16 is emulated and much "
                      "slower than fp32 here; bf16=\"auto\" picks it only where it is fast.", stacklevel=1)
    return torch.bfloat16 if tc.bf16 else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def main(argv=None) -> None:
    args = parse_args(argv)
    # ---------------------------------------------------------------------------------------- config, processes
    cfg = load_config(args.config, args.overrides)
    tc = cfg.train
    dist_info, device = distributed.setup()
    is_main = dist_info.is_main
    seed_everything(tc.seed)
    amp_dtype = precision(cfg, device, is_main)
    # nanoGPT's trick: one code path, the scaler is a no-op unless fp16.
    scaler = torch.amp.GradScaler(device.type, enabled=(amp_dtype == torch.float16))

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)

    # ---------------------------------------------------------------------------------------- model
    encoder = SentenceEncoder.from_pretrained(cfg.model.name_or_path, max_seq_length=cfg.model.max_seq_length)
    check_against_model(cfg, encoder.dim, encoder.model.config.max_position_embeddings)
    encoder.to(device).train()
    pad_id = encoder.tokenizer.pad_token_id

    # ---------------------------------------------------------------------------------------- data
    tasks = load_tasks(cfg)
    samplers = {}
    for name, data in tasks.items():
        common = dict(seed=tc.seed, drop_last=tc.dataloader_drop_last, num_replicas=dist_info.world_size,
                      rank=dist_info.rank)
        if tc.batch_sampler == "no_duplicates":
            samplers[name] = NoDuplicatesBatchSampler(data.texts, tc.per_device_train_batch_size, **common)
        else:
            samplers[name] = PlainBatchSampler(len(data), tc.per_device_train_batch_size, **common)
        if len(samplers[name]) == 0:
            raise DataError(f"task {name!r} ({data.source}): {len(data)} rows make no batch of "
                            f"{tc.per_device_train_batch_size * dist_info.world_size} rows without duplicate texts; "
                            f"lower train.per_device_train_batch_size or set train.dataloader_drop_last=false")
    batches = MultiTaskBatchSampler(samplers, mode=tc.multi_dataset_batch_sampler, seed=tc.seed)
    steps_per_epoch = len(batches)
    total_steps = tc.max_steps if tc.max_steps > 0 else tc.num_train_epochs * steps_per_epoch
    objectives = {
        name: Objective(t.loss, effective_scale(t), cfg.matryoshka.dims if cfg.matryoshka else None,
                        cfg.matryoshka.weights if cfg.matryoshka else None, gather=tc.gather_across_devices)
        for name, t in cfg.tasks.items()
    }
    eval_ir, eval_sts = load_eval_sets(cfg.eval.ir, cfg.eval.sts)
    eval_dims = list(cfg.eval.dims or (cfg.matryoshka.dims if cfg.matryoshka else [encoder.dim]))

    # ---------------------------------------------------------------------------------------- optimizer, DDP
    optimizer = make_optimizer(encoder, tc.learning_rate, tc.weight_decay)
    scheduler = make_scheduler(optimizer, total_steps, tc.warmup_ratio, tc.lr_scheduler_type)
    model = encoder
    if dist_info.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            encoder, device_ids=[device.index] if device.type == "cuda" else None)

    # ---------------------------------------------------------------------------------------- run folder, resume
    out = Path(tc.output_dir)
    resume_from = ts.resolve_resume(tc.resume_from_checkpoint, out)
    state = ts.TrainerState()
    if resume_from is not None:
        load_into(encoder.model, read_weights(resume_from), source=str(resume_from))
        state = ts.load_training_state(resume_from, dist_info.rank, optimizer, scheduler, scaler)
    run_config = config_to_dict(cfg)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(run_config, indent=2) + "\n")
        print(f"bertino: {sum(len(t) for t in tasks.values())} rows in {len(tasks)} task(s), {steps_per_epoch} "
              f"steps/epoch, {total_steps} steps, {dist_info.world_size} process(es) on {device}, "
              f"precision {amp_dtype or torch.float32}" + (f", resuming from {resume_from}" if resume_from else ""),
              file=sys.stderr)
    log = MetricsLog(out / "metrics.jsonl", enabled=is_main)

    def save_checkpoint() -> None:
        final = out / f"checkpoint-{state.step}"
        tmp = ts.tmp_dir_for(final)
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
        distributed.barrier()

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

    # ---------------------------------------------------------------------------------------- training loop
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=state.step, disable=not is_main, desc="train", unit="step",
               dynamic_ncols=True)
    window = {"loss": {}, "examples": 0, "t0": time.perf_counter()}
    last_results = None
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
                                       keep_graphs=tc.grad_cache_memory_budget, autocast=autocast)
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
            finite = bool(torch.isfinite(loss) & torch.isfinite(grad_norm))  # note: one host sync per step
            if scaler.is_enabled():
                scaler.step(optimizer)  # the scaler skips the step itself when it finds inf/NaN gradients
            elif finite:
                optimizer.step()
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.batch_in_epoch += 1
            if finite:
                state.nonfinite_in_a_row = 0
            else:  # under fp16 the scaler already skipped the step and lowered its scale: log it, go on
                state.skipped_steps += 1
                state.nonfinite_in_a_row += 1
                log.write({"step": state.step, "skipped": "non-finite loss or gradient", "task": task_name,
                           "loss_scale": scaler.get_scale() if scaler.is_enabled() else None})
                if not scaler.is_enabled() and state.nonfinite_in_a_row >= tc.max_consecutive_nonfinite:
                    raise BertinoError(
                        f"{state.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient (last at step "
                        f"{state.step}, task {task_name!r}); stopping. Lower train.learning_rate or check the data")

            # ---- logging, evaluation, checkpoints
            window["loss"].setdefault(task_name, []).append(loss)
            window["examples"] += len(rows) * dist_info.world_size
            bar.update(1)
            if state.step % tc.logging_steps == 0 or state.step == total_steps:
                elapsed = time.perf_counter() - window["t0"]
                record = {"step": state.step, "epoch": round(state.epoch + state.batch_in_epoch / steps_per_epoch, 4),
                          "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                          "loss_scale": scaler.get_scale() if scaler.is_enabled() else 1.0,
                          "examples_per_sec": round(window["examples"] / max(elapsed, 1e-9), 2),
                          "skipped_steps": state.skipped_steps}
                for name, losses in window["loss"].items():
                    record[f"loss/{name}"] = distributed.all_reduce_mean(torch.stack(losses).float().mean()).item()
                log.write(record)
                bar.set_postfix(loss=f"{np.mean([v for k, v in record.items() if k.startswith('loss/')]):.4f}",
                                lr=f"{record['lr']:.2e}", ex_s=record["examples_per_sec"])
                window = {"loss": {}, "examples": 0, "t0": time.perf_counter()}
            if tc.eval_steps > 0 and state.step % tc.eval_steps == 0 and state.step < total_steps:
                last_results = run_evaluation()
            if tc.save_steps > 0 and state.step % tc.save_steps == 0 and state.step < total_steps:
                save_checkpoint()
            if state.step >= total_steps:
                break
        else:  # the epoch ran out
            state.epoch += 1
            state.batch_in_epoch = 0
            continue
        break
    bar.close()

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
    """Append-only JSON lines; rank 0 only. Each line is flushed, so a killed run keeps what it logged."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def cli(argv=None) -> None:
    """Entry point: a user's mistake (BertinoError) is one line on stderr and exit code 2, no traceback."""
    try:
        main(argv)
    except BertinoError as e:
        print(f"error: {e}", file=sys.stderr)
        distributed.cleanup()
        sys.exit(2)


if __name__ == "__main__":
    cli()
