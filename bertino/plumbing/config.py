"""bertino's run configuration: frozen dataclasses, loaded from `configs/*.json`, overridden by `key.sub=value`.

A config goes through three steps, each of which fails loudly with a message that says where:

    JSON file ──read_json──▶ dict ──apply_overrides──▶ dict ──build (type hints)──▶ Config ──_validate──▶ Config

* `build` (typed_json.py) walks the dataclass type hints, so the dataclasses below *are* the schema.
* `_validate` checks what a type cannot express (Matryoshka dims descending, one weight per dim, ...).
* Checks that need the model (dims ≤ the model's hidden size) are in `check_against_model`, called at train time.

The resolved config is written to every run folder with `save_config`; `load_config(saved) == cfg`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from ..errors import ConfigError
from ..evaluation import IR_METRICS, STS_METRICS
from ..losses import LOSSES
from ..quantization import PRECISIONS, check_precisions
from .files import read_json, write_json
from .typed_json import DuplicateKey, apply_overrides, build, reject_duplicate_keys, require, show, to_plain

LossName = Literal[tuple(LOSSES)]  # "mnrl", "cached_mnrl", "cosent", "cosine": bertino/losses.py
SchedulerName = Literal["cosine", "linear", "constant"]
BatchSamplerName = Literal["no_duplicates", "batch_sampler"]
MultiDatasetSamplerName = Literal["proportional", "round_robin"]
DropoutMasks = Literal["stream", "keyed"]
PrecisionName = Literal[PRECISIONS]  # "float32", "int8", "binary": bertino/quantization.py
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
    grad_cache_memory_budget: int = 0  # mini-batches whose autograd graph is kept instead of recomputed; 0 =
    #                                    classic GradCache's peak memory (the last chunk's graph is kept for free)
    grad_cache_linear_tape: bool = False  # GradCache pass 3 replays pass 1's q/k/v/out_lin/lin2 outputs instead of
    #                                       recomputing them (bertino/speedups/linear_tape.py): faster, more memory
    ddp_timeout: int = 1800  # seconds a rank waits for the others (HF Trainer's name): a lost rank ends the job
    grad_cache_first_pass_mini_batch_size: int | None = None  # texts per chunk of GradCache's no-grad pass 1, when
    #   larger than mini_batch_size (fewer, larger forwards; needs model.dropout_masks "keyed"); null: the same
    report_to: tuple[ReportTarget, ...] = ()  # the HF Trainer's key: ["tensorboard"] also writes metrics.jsonl's
    #                                           scalars as TensorBoard events (pip install 'bertino[tensorboard]')
    logging_dir: str | None = None  # the TensorBoard folder; null: output_dir/runs
    grad_cache_length_multiple: int | None = None  # static shapes: each GradCache mini-batch padded to a multiple
    #   of this many tokens (≤ model.max_seq_length), so lengths repeat step to step; null: to its longest text
    grad_cache_mini_batch_tokens: int | None = None  # a token budget per mini-batch: at padded length L it holds
    #   ⌊tokens / L⌋ texts (short texts in large chunks) instead of mini_batch_size; null: mini_batch_size texts
    grad_cache_cuda_graphs: bool = False  # GradCache passes 1 and 3 replayed as CUDA graphs, one per mini-batch
    #   shape (bertino/speedups/cuda_graphs.py; needs grad_cache_length_multiple and keyed masks; runs every task's
    #   loss through GradCache); on a CPU the same code runs without capturing
    grad_cache_auto_mini_batch_gib: float | None = None  # on CUDA: the largest mini-batch whose forward + backward
    #   at max_seq_length fits in this many GiB, measured at start (bertino/speedups/memory_fit.py); null: as set
    adamw_fused: bool = False  # AdamW's fused kernel (torch's fused=True) instead of the multi-tensor one


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
    compare_base: bool = False  # the cards of best/ and final/ also compare the run with its base model (the
    #                             card's "Comparison with V4" table: relative change per metric, on the same sets)


@dataclass(frozen=True)
class Config:
    model: ModelConfig
    tasks: dict[str, TaskConfig]  # task name → task; names are used in logs and `balance_to`
    matryoshka: MatryoshkaConfig | None = None  # None: plain training at the full dim
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


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


def config_from_dict(data: Any, source: str = "config") -> Config:
    """Build and validate a `Config` from plain JSON data (as `config_to_dict` produces)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a JSON object, found {show(data)}")
    cfg = build(Config, data, "")
    _validate(cfg)
    return cfg


def config_to_dict(cfg: Any) -> Any:
    """Plain JSON data for a config (or any part of one): dataclasses → dicts, tuples → lists."""
    return to_plain(cfg)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as JSON, atomically (the folder is created if needed)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json(path, config_to_dict(cfg))


def _validate(cfg: Config) -> None:
    """Cross-field checks that a type hint cannot express. Each message names the offending key."""
    m, t, e = cfg.model, cfg.train, cfg.eval
    require(m.max_seq_length >= 1, "model.max_seq_length", m.max_seq_length, "≥ 1")

    if not cfg.tasks:
        raise ConfigError("tasks: at least one task is needed, found an empty object")
    for name, task in cfg.tasks.items():
        p = f"tasks.{name}"
        if not name or "." in name or "=" in name:
            raise ConfigError(f"{p}: task names must be non-empty and contain no '.' or '=' "
                              f"(they are addressed as tasks.NAME.key=value)")
        _check_columns(task, p)
        _check_negatives(task.negatives, task.loss, task.columns, p)
        require(0.0 <= task.holdout < 1.0, f"{p}.holdout", task.holdout, "in [0, 1) (a fraction of the rows)")
        require(task.scale is None or task.scale > 0, f"{p}.scale", task.scale, "> 0")
        if task.scale is not None and LOSSES[task.loss].default_scale is None:
            raise ConfigError(f"{p}.scale: the {task.loss!r} loss has no scale; remove the key (found {task.scale})")
        require(task.score_scale > 0, f"{p}.score_scale", task.score_scale, "> 0")
        if task.score_scale != 1.0 and LOSSES[task.loss].rows == "retrieval":
            raise ConfigError(f"{p}.score_scale: loss {task.loss!r} uses no scores; remove the key "
                              f"(found {task.score_scale})")
        if task.balance_to is not None:
            target = task.balance_to
            if target == name:
                raise ConfigError(f"{p}.balance_to: a task cannot be balanced to itself ({target!r})")
            if target not in cfg.tasks:
                raise ConfigError(f"{p}.balance_to: no task named {target!r}; tasks are: {', '.join(cfg.tasks)}")
            if cfg.tasks[target].balance_to is not None:
                raise ConfigError(f"{p}.balance_to: {target!r} is itself balanced (to "
                                  f"{cfg.tasks[target].balance_to!r}); point balance_to at an unbalanced task")

    if cfg.matryoshka is not None:
        dims, weights = cfg.matryoshka.dims, cfg.matryoshka.weights
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

    require(t.per_device_train_batch_size >= 1, "train.per_device_train_batch_size",
             t.per_device_train_batch_size, "≥ 1")
    require(t.mini_batch_size >= 1, "train.mini_batch_size", t.mini_batch_size, "≥ 1 (texts per mini-batch)")
    require(t.max_steps == -1 or t.max_steps >= 1, "train.max_steps", t.max_steps, "-1 (use epochs) or ≥ 1")
    require(t.max_steps != -1 or t.num_train_epochs >= 1, "train.num_train_epochs", t.num_train_epochs,
             "≥ 1 when max_steps is -1")
    require(t.learning_rate > 0, "train.learning_rate", t.learning_rate, "> 0")
    require(0.0 <= t.warmup_ratio <= 1.0, "train.warmup_ratio", t.warmup_ratio, "in [0, 1]")
    require(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "≥ 0")
    require(t.max_grad_norm >= 0, "train.max_grad_norm", t.max_grad_norm, "≥ 0 (0 disables clipping)")
    if t.fp16 and t.bf16 is True:
        raise ConfigError("train.fp16 and train.bf16: choose at most one mixed-precision mode, found both true")
    require(t.seed >= 0, "train.seed", t.seed, "≥ 0")
    require(t.logging_steps >= 1, "train.logging_steps", t.logging_steps, "≥ 1")
    require(t.eval_steps >= 0, "train.eval_steps", t.eval_steps, "≥ 0 (0 = only at the end)")
    require(t.save_steps >= 0, "train.save_steps", t.save_steps, "≥ 0 (0 = only the final model)")
    require(t.save_total_limit is None or t.save_total_limit >= 1, "train.save_total_limit",
             t.save_total_limit, "null or ≥ 1")
    if t.metric_for_best_model not in IR_METRICS + STS_METRICS:
        raise ConfigError(f"train.metric_for_best_model: unknown metric {t.metric_for_best_model!r}; valid: "
                          f"{', '.join(IR_METRICS + STS_METRICS)}")
    if t.load_best_model_at_end:
        ir = t.metric_for_best_model in IR_METRICS
        wanted, files = ("eval.ir", e.ir) if ir else ("eval.sts", e.sts)
        holdouts = [n for n, task in cfg.tasks.items()
                    if task.holdout > 0 and (LOSSES[task.loss].rows == "retrieval") == ir]
        if not files and not holdouts:
            raise ConfigError(f"train.load_best_model_at_end: metric_for_best_model "
                              f"{t.metric_for_best_model!r} needs at least one file in {wanted} (or a task with a "
                              f"holdout), found none")
    require(t.max_consecutive_nonfinite >= 1, "train.max_consecutive_nonfinite", t.max_consecutive_nonfinite,
             "≥ 1")
    require(t.ddp_timeout >= 1, "train.ddp_timeout", t.ddp_timeout, "≥ 1 (seconds)")
    first = t.grad_cache_first_pass_mini_batch_size
    if first is not None:
        require(first >= 1, "train.grad_cache_first_pass_mini_batch_size", first, "≥ 1 or null")
        if m.dropout_masks != "keyed":
            raise ConfigError("train.grad_cache_first_pass_mini_batch_size: pass 1 in other chunks than pass 3 needs "
                              "dropout masks that do not depend on the chunk: set model.dropout_masks to \"keyed\" "
                              f"(found {m.dropout_masks!r})")
        if t.grad_cache_memory_budget or t.grad_cache_linear_tape:
            raise ConfigError("train.grad_cache_first_pass_mini_batch_size: a separate first pass recomputes every "
                              "mini-batch in pass 3, so it cannot be combined with train.grad_cache_memory_budget "
                              "or train.grad_cache_linear_tape; set those to 0 / false")
    require(t.grad_cache_memory_budget >= 0, "train.grad_cache_memory_budget", t.grad_cache_memory_budget,
             "≥ 0 (0 = classic GradCache's memory)")
    for key in ("grad_cache_length_multiple", "grad_cache_mini_batch_tokens"):
        value = getattr(t, key)
        require(value is None or value >= 1, f"train.{key}", value, "≥ 1 or null")
        if value is not None and first is not None:
            raise ConfigError(f"train.{key}: static shapes cut pass 1 and pass 3 alike, so they cannot be combined "
                              "with train.grad_cache_first_pass_mini_batch_size; set one of them to null")
    gib = t.grad_cache_auto_mini_batch_gib
    require(gib is None or gib > 0, "train.grad_cache_auto_mini_batch_gib", gib, "> 0 (GiB) or null")
    if t.grad_cache_cuda_graphs:
        if m.dropout_masks != "keyed":
            raise ConfigError("train.grad_cache_cuda_graphs: pass 3's replay must draw pass 1's dropout masks without "
                              "a random generator: set model.dropout_masks to \"keyed\" "
                              f"(found {m.dropout_masks!r})")
        if t.grad_cache_length_multiple is None:
            raise ConfigError("train.grad_cache_cuda_graphs: graphs need mini-batch shapes that repeat: set "
                              "train.grad_cache_length_multiple (e.g. 32)")
        if t.grad_cache_memory_budget or t.grad_cache_linear_tape or first is not None:
            raise ConfigError("train.grad_cache_cuda_graphs: graphed passes recompute every mini-batch, so they "
                              "cannot be combined with train.grad_cache_memory_budget, train.grad_cache_linear_tape "
                              "or train.grad_cache_first_pass_mini_batch_size; set those to 0 / false / null")

    if e.dims is not None:
        if not e.dims or any(d <= 0 for d in e.dims) or len(set(e.dims)) != len(e.dims):
            raise ConfigError(f"eval.dims: expected distinct dims > 0 (or null), found {list(e.dims)}")
    require(e.batch_size >= 1, "eval.batch_size", e.batch_size, "≥ 1")
    check_precisions(e.precision, e.rescore, key="eval.precision")
    if len(set(t.report_to)) != len(t.report_to):
        raise ConfigError(f"train.report_to: lists a target twice, found {list(t.report_to)}")
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
    if LOSSES[task.loss].rows == "retrieval" and len(cols) < 2:
        raise ConfigError(f"{p}.columns: loss {task.loss!r} needs ≥ 2 columns (anchor, positive, negatives...), "
                          f"found {len(cols)}: {list(cols)}")
    if LOSSES[task.loss].rows == "pair_score" and len(cols) != 3:
        raise ConfigError(f"{p}.columns: loss {task.loss!r} needs exactly 3 columns (sentence1, sentence2, "
                          f"score), found {len(cols)}: {list(cols)}")


def _check_negatives(negatives: NegativesConfig | None, loss: str, columns: tuple[str, ...], p: str) -> None:
    if negatives is None:
        return
    if LOSSES[loss].rows != "retrieval":
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
