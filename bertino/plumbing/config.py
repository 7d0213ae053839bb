"""bertino's run configuration: frozen dataclasses, loaded from `configs/*.json`, overridden by `key.sub=value`.

A config goes through three steps, each of which fails loudly with a message that says where:

    JSON file ──read_json──▶ dict ──apply_overrides──▶ dict ──build (type hints)──▶ Config ──_validate──▶ Config

* `build` (typed_json.py) walks the dataclass type hints, so the dataclasses below *are* the schema.
* `_validate` checks what a type cannot express (Matryoshka dims descending, one weight per dim, ...).
* Checks that need the model (dims ≤ the model's hidden size) are in `check_against_model`, called at train time.

The resolved config is written to every run folder with `save_config`; `load_config(saved) == cfg`.
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from ..errors import ConfigError
from ..eval_names import INDEXES, IR_METRICS, PRECISIONS, STS_METRICS, check_indexes, check_precisions
from ..losses import LOSSES
from ..speedups.settings import SpeedupsConfig, check_speedups
from .files import read_json, write_json
from .typed_json import DuplicateKey, apply_overrides, build, reject_duplicate_keys, require, show, to_plain

LossName = Literal[tuple(LOSSES)]  # "mnrl", "cached_mnrl", "cosent", "cosine": bertino/losses.py
SchedulerName = Literal["cosine", "linear", "constant"]
BatchSamplerName = Literal["no_duplicates", "batch_sampler"]
MultiDatasetSamplerName = Literal["proportional", "round_robin"]
DropoutMasks = Literal["stream", "keyed"]
PrecisionName = Literal[PRECISIONS]  # "float32", "int8", "binary": bertino/eval_names.py
IndexName = Literal[INDEXES]  # "flat", "sq8", "binary-flat", "hnsw", "hnsw-sq8": bertino/eval_names.py
ReportTarget = Literal["tensorboard"]


# ──────────────────────────────────────────────────────────────────────────────────────────────────────────────
# The schema
# ──────────────────────────────────────────────────────────────────────────────────────────────────────────────

@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str  # local folder, hub id, or `pypi:NAME==VERSION` (see bertino/plumbing/sources.py)
    max_seq_length: int = 256  # tokens per text; longer texts are truncated
    dropout_masks: DropoutMasks = "stream"  # "stream": torch's random stream, replayed in GradCache's pass 3;
    #   "keyed": each mask element a function of (seed, step, text, layer, site, position) — the same masks in
    #   any chunk, padding or rank (bertino/keyed_dropout.py; docs/gradcache.md §2 says when to choose which)


@dataclass(frozen=True)
class NegativesConfig:
    """Hard negatives taken from ONE list-valued column (nickprock/it-wiki-retrieval-synthetic-hn's
    `hard_negatives`) instead of one column per negative: the first `count` items become negatives 1..count."""

    column: str  # the source column holding a list of strings per row
    count: int  # how many to take, from the front of each list (the miner's order: hardest first)
    short_rows: Literal["drop", "error"] = "drop"  # a row with fewer than `count`: dropped (and counted) or an error


@dataclass(frozen=True)
class TaskConfig:
    dataset: str  # local file/folder (.jsonl, .jsonl.gz, .json, .csv, .parquet, save_to_disk) or a hub id
    columns: tuple[str, ...]  # which source columns, in loss order: (anchor, positive, neg...) or (s1, s2, score)
    loss: LossName
    config: str | None = None  # hub dataset config name (e.g. "it" for stsb_multi_mt)
    split: str = "train"  # split of a hub dataset or of a save_to_disk DatasetDict
    scale: float | None = None  # similarity scale of mnrl/cached_mnrl/cosent; None: the loss's default (20)
    score_scale: float = 1.0  # scores are divided by this (stsb_multi_mt: 5.0 maps 0–5 to 0–1)
    balance_to: str | None = None  # up/down-sample this task to the row count of the named task
    negatives: NegativesConfig | None = None  # retrieval: negatives from one list column, after `columns`
    holdout: float = 0.0  # a seeded fraction of the rows kept out of training and evaluated on (the card: 0.05)
    bad_rows: Literal["error", "drop"] = "error"  # a row that fails the checks (plumbing/row_checks.py): stop the
    #   run with one error counting them all, or drop such rows (counted in the summary line)


@dataclass(frozen=True)
class MatryoshkaConfig:
    dims: tuple[int, ...]  # strictly descending, e.g. (768, 512, 256, 128); each loss is applied to e[:, :d]
    weights: tuple[float, ...]  # one non-negative weight per dim: loss = Σ_d w_d · loss_d


@dataclass(frozen=True)
class TrainConfig:
    per_device_train_batch_size: int = 128  # logical batch per process (GradCache makes it fit in memory)
    mini_batch_size: int = 16  # GradCache: how many TEXTS (of any column) go through the encoder at once; the
    #                            batch's B·columns texts are cut into chunks of this size (≥ all of them: one)
    num_train_epochs: int = 4  # ignored when max_steps > 0
    max_steps: int = -1  # -1: run num_train_epochs; > 0: stop after this many optimizer steps
    learning_rate: float = 1e-5  # peak AdamW learning rate
    lr_scheduler_type: SchedulerName = "cosine"  # decay after warm-up (linear warm-up in all three cases)
    warmup_ratio: float = 0.1  # fraction of the total steps spent warming up linearly from 0
    weight_decay: float = 0.01  # AdamW decoupled weight decay (not applied to biases and LayerNorm weights)
    max_grad_norm: float = 1.0  # clip the global gradient norm to this; 0 disables clipping
    fp16: bool = False  # float16 autocast + GradScaler (needs CUDA; checked at train time)
    bf16: bool | Literal["auto"] = False  # bfloat16 autocast, no scaler needed; "auto": only where the hardware
    #                                       has native bf16 (CUDA, or a CPU with AVX512-BF16/AMX), else fp32
    seed: int = 42  # seeds the samplers, the dropout masks and balance_to's sampling
    batch_sampler: BatchSamplerName = "no_duplicates"  # no_duplicates: no text twice in a batch (false negatives)
    multi_dataset_batch_sampler: MultiDatasetSamplerName = "proportional"  # how batches of tasks are interleaved
    gather_across_devices: bool = False  # MNRL: use the other processes' candidates as extra in-batch negatives
    dataloader_drop_last: bool = False  # drop each task's last incomplete batch
    output_dir: str = "runs/v5"  # the run folder (config.json, metrics.jsonl, checkpoint-*/, final/, best/)
    logging_steps: int = 10  # append the running loss to metrics.jsonl every this many steps
    eval_steps: int = 0  # evaluate every this many steps; 0 = only at the end
    save_steps: int = 250  # write checkpoint-STEP/ every this many steps; 0 = only the final model
    save_total_limit: int | None = None  # keep at most this many checkpoint-*/ folders (oldest deleted); None = all
    load_best_model_at_end: bool = False  # final/ gets best/'s weights (best/ is saved whenever there is an eval)
    metric_for_best_model: str = "ndcg@10"  # one of IR_METRICS / STS_METRICS: its mean over the eval sets at the
    #                                        largest eval dim picks best/
    resume_from_checkpoint: str | bool | None = None  # a checkpoint folder, true = latest in output_dir, null = no
    max_consecutive_nonfinite: int = 10  # stop after this many skipped steps in a row with a NaN/inf loss or
    #                                     gradient (fp16 gradient overflows, which the GradScaler handles, do not count)
    ddp_timeout: int = 1800  # seconds a rank waits for the others (HF Trainer's name): a lost rank ends the job
    report_to: tuple[ReportTarget, ...] = ()  # the HF Trainer's key: ["tensorboard"] also writes metrics.jsonl's
    #                                           scalars as TensorBoard events (pip install 'bertino[tensorboard]')
    logging_dir: str | None = None  # the TensorBoard folder; null: output_dir/runs


@dataclass(frozen=True)
class EvalDataset:
    """An evaluation set read like a task's data (a hub id, parquet, a save_to_disk folder, JSONL)."""

    dataset: str
    columns: tuple[str, ...]  # IR: (query, positive, negative...); STS: (sentence1, sentence2, score)
    config: str | None = None
    split: str = "test"
    score_scale: float = 1.0  # STS only; the correlations do not depend on it, it is accepted for symmetry
    negatives: NegativesConfig | None = None  # IR only: negatives from one list column
    name: str | None = None  # the set's name in tables and metrics.jsonl; default: the dataset's last part + split


@dataclass(frozen=True)
class EvalConfig:
    ir: tuple[str | EvalDataset, ...] = ()  # retrieval JSONL files {"query", "positive", "negative_*"?} or datasets
    sts: tuple[str | EvalDataset, ...] = ()  # STS JSONL files {"sentence1", "sentence2", "score"} or datasets
    dims: tuple[int, ...] | None = None  # truncation dims to report; None = matryoshka dims (or the full dim)
    batch_size: int = 32  # encoding batch size during evaluation
    precision: tuple[PrecisionName, ...] = PRECISIONS  # the model card's storage-vs-quality table: retrieval with
    #                                                     float32, int8 and binary vectors (bertino/quantization.py)
    rescore: int | None = None  # also binary's top K re-ranked by the float query (needs "binary" in precision)
    int8_quantile: float = 0.0  # int8's range per dimension: 0 = the corpus' min and max; p = its p and 1 − p
    #                             quantiles (values beyond are clipped)
    index: tuple[IndexName, ...] = ()  # also through these FAISS indexes (bertino/vector_indexes.py; needs the
    #                                    faiss extra): recall vs exact search, bytes/vector, build and query time
    compare_base: bool = False  # the cards of best/ and final/ also compare the run with its base model (the
    #                             card's "Comparison with V4" table: relative change per metric, on the same sets)


@dataclass(frozen=True)
class Config:
    model: ModelConfig
    tasks: dict[str, TaskConfig]  # task name → task; names are used in logs and `balance_to`
    matryoshka: MatryoshkaConfig | None = None  # None: plain training at the full dim
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    speedups: SpeedupsConfig | None = field(default_factory=SpeedupsConfig)  # None: the textbook, nothing installed
    #                                   (bertino/speedups/settings.py: every switch, its default and its cost)


# ──────────────────────────────────────────────────────────────────────────────────────────────────────────────
# Loading: JSON → overrides → dataclasses → validation
# ──────────────────────────────────────────────────────────────────────────────────────────────────────────────

def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Config:
    """Read a JSON config, apply `a.b.c=JSONVALUE` overrides, build and validate the dataclasses."""
    try:
        data = read_json(path, ConfigError, object_pairs_hook=reject_duplicate_keys)
    except DuplicateKey as e:
        raise ConfigError(f"{path}: key {e.args[0]!r} appears twice in the same object") from None
    return config_from_dict(apply_overrides(data, overrides), source=str(path))


def config_from_dict(data: Any, source: str = "config", notices: list[str] | None = None) -> Config:
    """Build and validate a `Config` from plain JSON data (as `config_to_dict` produces).

    Keys that moved (`MOVED_KEYS`) are read at their new place; each one found adds a notice to `notices`, or, when
    None, prints it (process rank 0 only)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a JSON object, found {show(data)}")
    data, moved = move_old_keys(data)
    for message in moved:
        if notices is not None:
            notices.append(message)
        elif os.environ.get("RANK", "0") == "0":
            print(f"notice: {message}", file=sys.stderr)
    cfg = build(Config, data, "")
    _validate(cfg)
    return cfg


# Keys that moved, old → new: they keep working (in configs, overrides and old run folders), with a notice.
MOVED_KEYS = {
    "train.grad_cache_memory_budget": "speedups.memory_budget",
    "train.grad_cache_linear_tape": "speedups.linear_tape",
    "train.grad_cache_first_pass_mini_batch_size": "speedups.first_pass_mini_batch_size",
    "train.grad_cache_length_multiple": "speedups.length_multiple",
    "train.grad_cache_mini_batch_tokens": "speedups.mini_batch_tokens",
    "train.grad_cache_cuda_graphs": "speedups.cuda_graphs",
    "train.grad_cache_auto_mini_batch_gib": "speedups.auto_mini_batch_gib",
    "train.adamw_fused": "speedups.adamw_fused",
}


def move_old_keys(data: dict) -> tuple[dict, list[str]]:
    """`data` with every key of `MOVED_KEYS` at its new place (a copy if any moved) → (data, one notice per key)."""
    found = [old for old in MOVED_KEYS if old.split(".")[1] in (data.get("train") or {})]
    if not found:
        return data, []
    data, notices = copy.deepcopy(data), []
    defaults = SpeedupsConfig()
    for old in found:
        new = MOVED_KEYS[old]
        section, key = new.split(".")
        value = data["train"].pop(old.split(".")[1])
        if data.get(section, {}) is None:  # "speedups": null, the textbook: an old key may only ask for nothing
            if value != getattr(defaults, key):
                raise ConfigError(f"{old} (now {new}) is {show(value)}, but speedups is null (the textbook, no "
                                  f"speed-up); drop one of them")
            continue
        target = data.setdefault(section, {})
        if key in target and target[key] != value:
            raise ConfigError(f"{old} and {new} are the same key (it moved) and disagree: {show(value)} vs "
                              f"{show(target[key])}; keep {new}")
        target[key] = value
        notices.append(f"{old} is now {new} (the old key still works)")
    return data, notices


def config_to_dict(cfg: Any) -> Any:
    """Plain JSON data for a config (or any part of one): dataclasses → dicts, tuples → lists."""
    return to_plain(cfg)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as JSON, atomically (the folder is created if needed)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json(path, config_to_dict(cfg))


def _validate(cfg: Config) -> None:
    """Cross-field checks that a type hint cannot express, section by section. Each message names the key."""
    require(cfg.model.max_seq_length >= 1, "model.max_seq_length", cfg.model.max_seq_length, "≥ 1")
    _validate_tasks(cfg.tasks)
    if cfg.matryoshka is not None:
        _validate_matryoshka(cfg.matryoshka)
    _validate_train(cfg)
    _validate_eval(cfg.eval)
    if cfg.speedups is not None:
        check_speedups(cfg.speedups, cfg.model.dropout_masks)  # where the speed-ups live: speedups/settings.py


def _validate_tasks(tasks: dict[str, TaskConfig]) -> None:
    if not tasks:
        raise ConfigError("tasks: at least one task is needed, found an empty object")
    for name, task in tasks.items():
        p = f"tasks.{name}"
        if not name or "." in name or "=" in name or "/" in name:
            raise ConfigError(f"{p}: task names must be non-empty and contain no '.', '=' or '/' (they are "
                              f"addressed as tasks.NAME.key=value, and logged as loss/NAME and loss/NAME/DIMd, "
                              f"where a '/' would read as another level); rename the task")
        _check_columns(task, p)
        _check_negatives(task.negatives, task.loss, task.columns, p)
        require(0.0 <= task.holdout < 1.0, f"{p}.holdout", task.holdout, "in [0, 1) (a fraction of the rows)")
        require(task.scale is None or task.scale > 0, f"{p}.scale", task.scale, "> 0")
        if task.scale is not None and LOSSES[task.loss].default_scale is None:
            raise ConfigError(f"{p}.scale: the {task.loss!r} loss has no scale; remove the key (found {task.scale})")
        require(task.score_scale > 0, f"{p}.score_scale", task.score_scale, "> 0")
        if task.score_scale != 1.0 and not LOSSES[task.loss].rows.scored:
            raise ConfigError(f"{p}.score_scale: loss {task.loss!r} uses no scores; remove the key "
                              f"(found {task.score_scale})")
        target = task.balance_to
        if target is None:
            continue
        if target == name:
            raise ConfigError(f"{p}.balance_to: a task cannot be balanced to itself ({target!r})")
        if target not in tasks:
            raise ConfigError(f"{p}.balance_to: no task named {target!r}; tasks are: {', '.join(tasks)}")
        if tasks[target].balance_to is not None:
            raise ConfigError(f"{p}.balance_to: {target!r} is itself balanced (to {tasks[target].balance_to!r}); "
                              f"point balance_to at an unbalanced task")


def _validate_matryoshka(m: MatryoshkaConfig) -> None:
    dims, weights = m.dims, m.weights
    if not dims:
        raise ConfigError("matryoshka.dims: need at least one dim (use \"matryoshka\": null for plain training)")
    if len(dims) != len(weights):
        raise ConfigError(f"matryoshka.weights: one weight per dim is needed; found {len(dims)} dims "
                          f"{list(dims)} and {len(weights)} weights {list(weights)}")
    if any(d <= 0 for d in dims):
        raise ConfigError(f"matryoshka.dims: every dim must be > 0, found {list(dims)}")
    if any(a <= b for a, b in zip(dims, dims[1:])):
        raise ConfigError(f"matryoshka.dims: must be strictly descending (e.g. [768, 512, 256, 128]), "
                          f"found {list(dims)}")
    if any(w < 0 for w in weights):
        raise ConfigError(f"matryoshka.weights: every weight must be ≥ 0, found {list(weights)}")
    if sum(weights) == 0:
        raise ConfigError(f"matryoshka.weights: at least one weight must be > 0, found {list(weights)}")


def _validate_train(cfg: Config) -> None:
    t = cfg.train
    for key, ok, expected in (
            ("per_device_train_batch_size", t.per_device_train_batch_size >= 1, "≥ 1"),
            ("mini_batch_size", t.mini_batch_size >= 1, "≥ 1 (texts per mini-batch)"),
            ("max_steps", t.max_steps == -1 or t.max_steps >= 1, "-1 (use epochs) or ≥ 1"),
            ("num_train_epochs", t.max_steps != -1 or t.num_train_epochs >= 1, "≥ 1 when max_steps is -1"),
            ("learning_rate", t.learning_rate > 0, "> 0"),
            ("warmup_ratio", 0.0 <= t.warmup_ratio <= 1.0, "in [0, 1]"),
            ("weight_decay", t.weight_decay >= 0, "≥ 0"),
            ("max_grad_norm", t.max_grad_norm >= 0, "≥ 0 (0 disables clipping)"),
            ("seed", t.seed >= 0, "≥ 0"),
            ("logging_steps", t.logging_steps >= 1, "≥ 1"),
            ("eval_steps", t.eval_steps >= 0, "≥ 0 (0 = only at the end)"),
            ("save_steps", t.save_steps >= 0, "≥ 0 (0 = only the final model)"),
            ("save_total_limit", t.save_total_limit is None or t.save_total_limit >= 1, "null or ≥ 1"),
            ("max_consecutive_nonfinite", t.max_consecutive_nonfinite >= 1, "≥ 1"),
            ("ddp_timeout", t.ddp_timeout >= 1, "≥ 1 (seconds)")):
        require(ok, f"train.{key}", getattr(t, key), expected)
    if t.fp16 and t.bf16 is True:
        raise ConfigError("train.fp16 and train.bf16: choose at most one mixed-precision mode, found both true")
    if t.metric_for_best_model not in IR_METRICS + STS_METRICS:
        raise ConfigError(f"train.metric_for_best_model: unknown metric {t.metric_for_best_model!r}; valid: "
                          f"{', '.join(IR_METRICS + STS_METRICS)}")
    if t.load_best_model_at_end:
        ir = t.metric_for_best_model in IR_METRICS
        wanted, files = ("eval.ir", cfg.eval.ir) if ir else ("eval.sts", cfg.eval.sts)
        holdouts = [n for n, task in cfg.tasks.items() if task.holdout > 0 and LOSSES[task.loss].rows.scored != ir]
        if not files and not holdouts:
            raise ConfigError(f"train.load_best_model_at_end: metric_for_best_model "
                              f"{t.metric_for_best_model!r} needs at least one file in {wanted} (or a task with a "
                              f"holdout), found none")
    if len(set(t.report_to)) != len(t.report_to):
        raise ConfigError(f"train.report_to: lists a target twice, found {list(t.report_to)}")


def _validate_eval(e: EvalConfig) -> None:
    if e.dims is not None:
        if not e.dims or any(d <= 0 for d in e.dims) or len(set(e.dims)) != len(e.dims):
            raise ConfigError(f"eval.dims: expected distinct dims > 0 (or null), found {list(e.dims)}")
    require(e.batch_size >= 1, "eval.batch_size", e.batch_size, "≥ 1")
    check_precisions(e.precision, e.rescore, key="eval.precision")
    require(0.0 <= e.int8_quantile < 0.5, "eval.int8_quantile", e.int8_quantile,
            "in [0, 0.5) (0: min/max; p: the p and 1 − p quantiles)")
    check_indexes(e.index, key="eval.index")
    for key, sets, loss in (("eval.ir", e.ir, "mnrl"), ("eval.sts", e.sts, "cosent")):
        for i, entry in enumerate(sets):
            if isinstance(entry, EvalDataset):
                _check_columns(eval_task(entry, loss), f"{key}[{i}]")
                _check_negatives(entry.negatives, loss, entry.columns, f"{key}[{i}]")
                require(entry.score_scale > 0, f"{key}[{i}].score_scale", entry.score_scale, "> 0")


def _check_columns(task: TaskConfig, p: str) -> None:
    cols = task.columns
    if any(not c for c in cols) or len(set(cols)) != len(cols):
        raise ConfigError(f"{p}.columns: column names must be non-empty and distinct, found {list(cols)}")
    problem = LOSSES[task.loss].rows.column_problem(cols)
    if problem:
        raise ConfigError(f"{p}.columns: loss {task.loss!r} {problem}")


def _check_negatives(negatives: NegativesConfig | None, loss: str, columns: tuple[str, ...], p: str) -> None:
    if negatives is None:
        return
    if LOSSES[loss].rows.scored:
        raise ConfigError(f"{p}.negatives: loss {loss!r} takes no hard negatives; remove the key")
    require(negatives.count >= 1, f"{p}.negatives.count", negatives.count, "≥ 1")
    if negatives.column in columns:
        raise ConfigError(f"{p}.negatives.column: {negatives.column!r} is also in {p}.columns; the list column "
                          f"is named only under negatives")


def eval_task(entry: EvalDataset, loss: str) -> TaskConfig:
    """An eval dataset as a task config, so that it is read and checked by exactly the code training data is."""
    return TaskConfig(dataset=entry.dataset, columns=entry.columns, loss=loss, config=entry.config,
                      split=entry.split, score_scale=entry.score_scale, negatives=entry.negatives)


def check_against_model(cfg: Config, model_dim: int, max_positions: int | None = None) -> None:
    """Train-time checks that need the model: Matryoshka / eval dims ≤ `model_dim`, max_seq_length ≤ positions."""
    for key, dims in (("matryoshka.dims", cfg.matryoshka.dims if cfg.matryoshka else ()),
                      ("eval.dims", cfg.eval.dims or ())):
        too_big = [d for d in dims if d > model_dim]
        if too_big:
            raise ConfigError(f"{key}: {too_big} larger than the model's embedding dim {model_dim} "
                              f"({cfg.model.name_or_path}); found {list(dims)}")
    if max_positions is not None and cfg.model.max_seq_length > max_positions:
        raise ConfigError(f"model.max_seq_length: {cfg.model.name_or_path} has {max_positions} position "
                          f"embeddings, found max_seq_length {cfg.model.max_seq_length}")
