"""Task data: read a task's rows from a local file / folder or the hub, check them, balance task sizes.

Shapes: N rows, t text columns (all of a retrieval task's `columns`; the first 2 of a pair+score task's).

    source ──read──▶ {column: [N values]} ──_check_rows──▶ TaskData(texts: N tuples of t str, scores: (N,) | None)

* readers.py reads the columns from a file, a folder or the hub; errors name the file's LINE (`FILE:LINE`) or,
  for tables, the ROW.
* Rows are checked before training starts: a bad row found after an hour of training wastes the hour.
* `negatives: {column, count}` takes a retrieval task's hard negatives from ONE list column: the first `count`
  items become flat columns `column[0]`, `column[1]`, ... — exactly the rows `negative_1`, `negative_2` columns
  would give, so the sampler, mining and evaluation see the same texts. Shorter rows are dropped (and counted).
* `holdout: f` keeps a seeded fraction of the rows out of training (the card evaluates on a 5% hold-out), before
  balancing: `split_holdout`.
* `balance_to` (V5: "STS dataset balanced to match retrieval dataset size") resamples one task to another's
  row count with a seeded numpy Generator, so every process and every resume gets the same rows.

    read ──▶ negatives expanded, short rows dropped ──▶ rows checked ──▶ hold-out split ──▶ balance_to
"""

from __future__ import annotations

import math
import numbers
import operator
import os
import zlib
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from ..errors import ConfigError, DataError
from ..losses import LOSSES
from ..sampler import MultiTaskBatchSampler, NoDuplicatesBatchSampler, PlainBatchSampler
from .config import Config, TaskConfig
from .files import short
from .readers import read_columns


@dataclass
class TaskData:
    """The checked rows of one task.

    columns: the t text columns, so `len(columns) == len(texts[i])` (a pair+score task's score column is in
             `score_column`): (anchor, positive, negative_1, ...) or (sentence1, sentence2).
    texts:   N tuples of t non-empty strings, in `columns` order.
    scores:  (N,) float32, already divided by `score_scale`; None for retrieval tasks.
    """

    name: str
    columns: tuple[str, ...]
    texts: list[tuple[str, ...]]
    scores: np.ndarray | None
    source: str  # the file path or hub id, for messages
    line_numbers: np.ndarray | None = None  # (N,) 1-based line of each row in a line-based file, else None
    row_ids: np.ndarray | None = None  # (N,) index of each row in the source after `select`; None = identity
    score_column: str | None = None  # the source column the scores came from (pair+score tasks only)
    dropped_rows: int = 0  # rows dropped on reading because their negatives list was shorter than needed

    def __len__(self) -> int:
        return len(self.texts)

    def row_ref(self, i: int) -> str:
        """Where row i came from, for error messages: 'file.jsonl:17' (its line) or 'dataset X row 17'."""
        if self.line_numbers is not None:
            return f"{self.source}:{int(self.line_numbers[i])}"
        row = i if self.row_ids is None else int(self.row_ids[i])
        return f"{self.source} row {row}"

    def select(self, indices: np.ndarray) -> "TaskData":
        """A new TaskData with rows `indices` (in that order, repeats allowed); row_ref still points at the source."""
        indices = np.asarray(indices, dtype=np.int64)
        row_ids = np.arange(len(self), dtype=np.int64) if self.row_ids is None else self.row_ids
        return TaskData(
            name=self.name,
            columns=self.columns,
            score_column=self.score_column,
            texts=[self.texts[i] for i in indices.tolist()],
            scores=None if self.scores is None else self.scores[indices],
            source=self.source,
            line_numbers=None if self.line_numbers is None else self.line_numbers[indices],
            row_ids=row_ids[indices],
            dropped_rows=self.dropped_rows,
        )


# ──────────────────────────────────────────────────────────────────────────────────────────────────────────────
# Loading
# ──────────────────────────────────────────────────────────────────────────────────────────────────────────────

def load_task(task: TaskConfig, name: str, *, base_dir: str | os.PathLike | None = None) -> TaskData:
    """Read and check the rows of `task`; a relative local path is resolved against `base_dir` (default: cwd)."""
    source, values, line_numbers = read_columns(task, base_dir)
    return _check_rows(task, name, source, values, line_numbers)


def load_tasks(cfg: Config, *, base_dir: str | os.PathLike | None = None) -> dict[str, TaskData]:
    """The training rows of every task of `cfg`: hold-outs removed, then `balance_to` applied with the seed."""
    return load_run_data(cfg, base_dir=base_dir).tasks


@dataclass
class RunData:
    """What a run reads: the training rows of each task, and the rows each task holds out for evaluation."""

    tasks: dict[str, TaskData]  # after the hold-out split and balance_to
    holdouts: dict[str, TaskData]  # task name → its held-out rows (only tasks with `holdout` > 0)


def load_run_data(cfg: Config, *, base_dir: str | os.PathLike | None = None) -> RunData:
    """Load every task, split off its hold-out (seeded), then balance: the targets are sizes after the split."""
    train, held = {}, {}
    for name, task in cfg.tasks.items():
        train[name], holdout = split_holdout(load_task(task, name, base_dir=base_dir), task.holdout, cfg.train.seed)
        if holdout is not None:
            held[name] = holdout
    return RunData(balance_tasks(train, cfg.tasks, cfg.train.seed), held)


# ──────────────────────────────────────────────────────────────────────────────────────────────────────────────
# Checking
# ──────────────────────────────────────────────────────────────────────────────────────────────────────────────

def _check_rows(task: TaskConfig, name: str, source: str, values: dict[str, list],
                line_numbers: np.ndarray | None) -> TaskData:
    has_score = LOSSES[task.loss].rows.scored
    text_columns = LOSSES[task.loss].rows.text_columns(task.columns)
    if len(values[task.columns[0]]) == 0:
        raise DataError(f"task {name!r}: {source} has no rows")
    row_ids, dropped = None, 0
    if task.negatives is not None:
        n = len(values[task.columns[0]])
        values, negative_columns, row_ids = _expand_negatives(task, name, source, values, line_numbers)
        text_columns += negative_columns
        if row_ids is not None:  # some rows were too short: keep line numbers and row ids pointing at the source
            dropped = n - len(row_ids)
            line_numbers = None if line_numbers is None else line_numbers[row_ids]
    data = TaskData(name, text_columns, [], None, source, line_numbers=line_numbers, row_ids=row_ids,
                    score_column=task.columns[2] if has_score else None, dropped_rows=dropped)
    if len(values[task.columns[0]]) == 0:
        raise DataError(f"task {name!r}: {source}: every row has fewer than {task.negatives.count} items in "
                        f"column {task.negatives.column!r}, so none is left")

    text_values = [values[c] for c in text_columns]  # t lists of N values
    if not _texts_are_valid(text_values, check_negatives=not has_score):
        _raise_first_bad_text(name, data, text_columns, text_values, check_negatives=not has_score)
    data.texts = list(zip(*text_values))  # N tuples of t str
    if has_score:
        data.scores = _check_scores(task, name, data, values[task.columns[2]])
    return data


def _expand_negatives(task: TaskConfig, name: str, source: str, values: dict[str, list],
                      line_numbers: np.ndarray | None) -> tuple[dict[str, list], tuple[str, ...], np.ndarray | None]:
    """The list column of `task.negatives` → `count` flat columns named `column[0]`, `column[1]`, ...

    Each row keeps the FIRST `count` items (a miner writes the hardest first). A row with fewer items is dropped
    (short_rows "drop") or an error ("error"). Returns (values with the flat columns, their names, the kept row
    indices into the source, or None when every row was kept)."""
    column, count = task.negatives.column, task.negatives.count
    lists = values.pop(column)  # N lists of strings
    for i, items in enumerate(lists):
        if not isinstance(items, (list, tuple)):
            where = f"{source}:{int(line_numbers[i])}" if line_numbers is not None else f"{source} row {i}"
            raise DataError(f"task {name!r}: {where}: column {column!r}: expected a list of strings "
                            f"(tasks.{name}.negatives), found {short(items)}")
    lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))  # (N,)
    kept = None
    if (lengths < count).any():
        if task.negatives.short_rows == "error":
            i = int(np.flatnonzero(lengths < count)[0])
            where = f"{source}:{int(line_numbers[i])}" if line_numbers is not None else f"{source} row {i}"
            raise DataError(f"task {name!r}: {where}: column {column!r} has {lengths[i]} item(s), "
                            f"tasks.{name}.negatives.count is {count}; set negatives.short_rows to \"drop\" to "
                            f"skip such rows")
        kept = np.flatnonzero(lengths >= count)  # (N_kept,)
        values = {c: [v[i] for i in kept.tolist()] for c, v in values.items()}
        lists = [lists[i] for i in kept.tolist()]
    names = tuple(f"{column}[{j}]" for j in range(count))
    for j, flat in enumerate(names):
        values[flat] = [items[j] for items in lists]
    return values, names, kept


def _texts_are_valid(text_values: list[list], check_negatives: bool) -> bool:
    """The fast check (map/set run in C: ~1 s for 1M rows): every value a non-blank str, and no negative equal to
    its anchor or positive. When it fails, `_raise_first_bad_text` walks the rows to explain where."""
    for column in text_values:
        if set(map(type, column)) != {str} or not all(map(str.strip, column)):
            return False
    if check_negatives and len(text_values) > 2:  # a negative that equals the positive is also the right answer
        anchor, positive, *negatives = [list(map(str.strip, column)) for column in text_values]
        for negative in negatives:
            if any(map(operator.eq, negative, positive)) or any(map(operator.eq, negative, anchor)):
                return False
    return True


def _raise_first_bad_text(name: str, data: TaskData, text_columns: tuple[str, ...], text_values: list[list],
                          check_negatives: bool) -> None:
    for i, row in enumerate(zip(*text_values)):
        for column, text in zip(text_columns, row):
            if type(text) is not str or not text.strip():
                raise DataError(f"task {name!r}: {data.row_ref(i)}: column {column!r}: expected a non-empty "
                                f"string, found {short(text)}")
        if check_negatives:
            anchor, positive = row[0].strip(), row[1].strip()
            for column, negative in zip(text_columns[2:], row[2:]):
                negative = negative.strip()
                if negative in (positive, anchor):
                    which = text_columns[1] if negative == positive else text_columns[0]
                    raise DataError(f"task {name!r}: {data.row_ref(i)}: column {column!r} equals column "
                                    f"{which!r} ({short(negative)}); a hard negative must differ from the "
                                    f"query and its positive")
    raise AssertionError("_texts_are_valid and _raise_first_bad_text disagree")  # a bug in this file


def _check_scores(task: TaskConfig, name: str, data: TaskData, raw: list) -> np.ndarray:
    """(N,) float32 scores divided by score_scale; any non-number, NaN or inf is a DataError naming its row."""
    column = task.columns[2]
    scores = None
    if set(map(type, raw)) <= {int, float}:  # the fast path (bool is its own type, so it is not let through)
        try:
            scores = np.asarray(raw, dtype=np.float64)  # (N,)
        except OverflowError:  # a JSON integer with 400 digits: let the loop below name it
            scores = None
    if scores is None or not np.isfinite(scores).all():
        for i, value in enumerate(raw):  # slow, only to explain the first bad value
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise DataError(f"task {name!r}: {data.row_ref(i)}: column {column!r}: expected a number, "
                                f"found {short(value)}")
            try:
                finite = math.isfinite(float(value))
            except OverflowError:
                finite = False
            if not finite:
                raise DataError(f"task {name!r}: {data.row_ref(i)}: column {column!r}: expected a finite "
                                f"number, found {short(value)}")
        scores = np.asarray([float(v) for v in raw], dtype=np.float64)  # numbers.Real that are not int/float
    with np.errstate(over="ignore"):  # overflow is reported below, with the row
        scaled = (scores / task.score_scale).astype(np.float32)  # (N,)
    bad = np.flatnonzero(~np.isfinite(scaled))
    if bad.size:
        i = int(bad[0])
        raise DataError(f"task {name!r}: {data.row_ref(i)}: column {column!r}: {raw[i]!r} / score_scale "
                        f"{task.score_scale} does not fit in float32")
    if LOSSES[task.loss].needs_varied_scores and len(scaled) and (scaled == scaled[0]).all():
        raise DataError(f"task {name!r} ({data.source}): every gold score in column {column!r} is {raw[0]!r}; "
                        f"{task.loss!r} learns only from pairs whose scores differ, so it would train nothing")
    if task.loss == "cosine":  # CosineSimilarityLoss regresses cos(e1, e2) onto the score: it must be in [0, 1]
        bad = np.flatnonzero((scaled < 0) | (scaled > 1))
        if bad.size:
            i = int(bad[0])
            raise DataError(f"task {name!r}: {data.row_ref(i)}: column {column!r}: the 'cosine' loss needs "
                            f"scores in [0, 1] after dividing by score_scale ({task.score_scale}), found "
                            f"{raw[i]!r}; set tasks.{name}.score_scale (stsb_multi_mt: 5.0)")
    return scaled


# ──────────────────────────────────────────────────────────────────────────────────────────────────────────────
# Hold-out
# ──────────────────────────────────────────────────────────────────────────────────────────────────────────────

HOLDOUT_STREAM = zlib.crc32(b"holdout")  # a third seed word, so the hold-out draw is not balance_to's draw


def holdout_indices(n: int, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, held-out indices) into n rows, both sorted: round(fraction · n) rows drawn at random
    (at least 1 when fraction > 0). Disjoint, and together every row once."""
    k = max(1, round(fraction * n))  # (k,) held out
    held = np.zeros(n, dtype=bool)
    held[rng.permutation(n)[:k]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def split_holdout(data: TaskData, fraction: float, seed: int) -> tuple[TaskData, TaskData | None]:
    """(training rows, held-out rows or None). The draw is seeded with (seed, crc32(task name), HOLDOUT_STREAM):
    the same rows on every run, every rank and every resume, and whatever other tasks the config has."""
    if fraction <= 0:
        return data, None
    rng = np.random.default_rng([seed, zlib.crc32(data.name.encode("utf-8")), HOLDOUT_STREAM])
    train, held = holdout_indices(len(data), fraction, rng)
    if len(train) == 0:
        raise DataError(f"task {data.name!r} ({data.source}): holdout {fraction} of {len(data)} rows leaves no "
                        f"row to train on")
    return data.select(train), data.select(held)


# ──────────────────────────────────────────────────────────────────────────────────────────────────────────────
# Balancing
# ──────────────────────────────────────────────────────────────────────────────────────────────────────────────

def balance_indices(m: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices (n,) into m rows: every row floor(n/m) times, then a random subset (without replacement) of the
    remaining n mod m. So n < m is a plain random subset, and n = 2.5·m keeps every row twice plus half once.
    The subset is sorted: the result keeps the source order, the batch sampler does the shuffling."""
    reps, rest = divmod(n, m)
    extra = np.sort(rng.choice(m, size=rest, replace=False))  # (rest,)
    return np.concatenate([np.tile(np.arange(m, dtype=np.int64), reps), extra.astype(np.int64)])


def balance_tasks(tasks: dict[str, TaskData], cfgs: Mapping[str, TaskConfig], seed: int) -> dict[str, TaskData]:
    """Resample each task whose config has `balance_to` to the row count of the named task.

    Deterministic: the Generator is seeded with (seed, crc32(task name)), so the result depends neither on dict
    order nor on which other tasks exist. Target sizes are those before balancing (chains are rejected by config).
    """
    out = dict(tasks)
    for name, data in tasks.items():
        cfg = cfgs.get(name)
        if cfg is None or cfg.balance_to is None:
            continue
        if cfg.balance_to not in tasks:
            raise ConfigError(f"tasks.{name}.balance_to: task {cfg.balance_to!r} was not loaded; "
                              f"loaded tasks: {', '.join(tasks)}")
        target = len(tasks[cfg.balance_to])
        if target == len(data):
            continue
        rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
        out[name] = data.select(balance_indices(len(data), target, rng))
    return out


# ──────────────────────────────────────────────────────────────────────────────────────────────────────────────
# Batches
# ──────────────────────────────────────────────────────────────────────────────────────────────────────────────

def batch_schedule(cfg: Config, tasks: dict[str, TaskData], world_size: int = 1, rank: int = 0
                   ) -> MultiTaskBatchSampler:
    """The run's batches: one sampler per task as the config says, mixed into one schedule (this rank's share).

    A task that cannot fill ONE batch is a DataError.
    """
    train, size = cfg.train, cfg.train.per_device_train_batch_size
    samplers = {}
    for name, data in tasks.items():
        def make(batch_size=size, drop_last=train.dataloader_drop_last, num_replicas=world_size, rank=rank):
            common = dict(seed=train.seed, drop_last=drop_last, num_replicas=num_replicas, rank=rank)
            if train.batch_sampler == "no_duplicates":
                return NoDuplicatesBatchSampler(data.texts, batch_size, **common)
            return PlainBatchSampler(len(data), batch_size, **common)

        samplers[name] = make()
        if len(next(iter(samplers[name]), [])) < size:  # the pool could not fill even the first batch
            need = (f"a step needs {size * world_size} rows (train.per_device_train_batch_size {size} × "
                    f"{world_size} process(es))")
            fit = len(next(iter(make(size * world_size, False, 1, 0))))  # the largest step batch the rows make
            if fit < len(data) and train.batch_sampler == "no_duplicates":
                why = (f"but its {len(data)} rows fill at most {fit} without repeating a text (rows that share a "
                       f"query, positive or negative cannot share a batch)")
            else:
                why = f"but it has only {len(data)} rows"
            raise DataError(f"task {name!r} ({data.source}): {need}, {why}; lower "
                            f"train.per_device_train_batch_size")
    return MultiTaskBatchSampler(samplers, mode=train.multi_dataset_batch_sampler, seed=train.seed)
