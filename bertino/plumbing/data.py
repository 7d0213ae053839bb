"""Task data: a task's rows as index arrays into one Arrow table, checked, split, balanced, batched.

Shapes: N rows, t text columns (all of a retrieval task's `columns` and its listed negatives; the first 2 of a
pair+score task's), B rows in a batch.

    source ──readers.read_table──▶ Arrow table (memory-mapped, or in memory when small)
           ──row_checks.check_rows──▶ the rows that train (N,) + their scores
           ──split_holdout──▶ ──balance_to──▶ TaskData(table, rows (N,) int64 source rows, scores (N,) | None)

* The rows never become Python lists: a TaskData is the table plus an index array. Everything that changes which
  rows train — dropping short or bad rows, the seeded hold-out, `balance_to`'s resampling — is an operation on
  that array (`TaskData.select`), and a batch's texts are read from the table when the step needs them
  (`TaskData.batch`). The no-duplicates sampler and the ranks' fingerprint work on 64-bit hashes of the texts
  (text_hashes.py), computed once.
* Rows are checked before training starts (row_checks.py): a bad row found after an hour of training wastes the
  hour. Bad rows stop the run with one error that counts them, or are dropped (`tasks.NAME.bad_rows`).
* `negatives: {column, count}` takes a retrieval task's hard negatives from ONE list column: its first `count`
  items are text columns `column[0]`, `column[1]`, ... — exactly the rows `negative_1`, `negative_2` columns would
  give, so the sampler, mining and evaluation see the same texts. Shorter rows are dropped (and counted).
* `holdout: f` keeps a seeded fraction of the rows out of training (the card evaluates on a 5% hold-out), before
  balancing: `split_holdout`.
* `balance_to` (V5: "STS dataset balanced to match retrieval dataset size") resamples one task to another's
  row count with a seeded numpy Generator, so every process and every resume gets the same rows.

    read ──▶ rows checked, short and bad rows dropped ──▶ hold-out split ──▶ balance_to
"""

from __future__ import annotations

import hashlib
import os
import zlib
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

import numpy as np

from ..errors import ConfigError, DataError
from ..losses import LOSSES
from ..sampler import MultiTaskBatchSampler, NoDuplicatesBatchSampler, PlainBatchSampler
from .config import Config, TaskConfig
from .readers import Table, read_table
from .row_checks import check_rows, spec_names, text_spec
from .text_hashes import RowsOf, text_hashes


@dataclass
class TaskData:
    """The checked rows of one task: source rows of one Arrow table, read a batch at a time.

    columns: the t text columns, in loss order: (anchor, positive, negative_1, ...) or (sentence1, sentence2);
             a listed negative is named `column[j]` (a pair+score task's score column is in `score_column`).
    rows:    (N,) int64 source rows of `table`, in this task's order (repeats allowed: balance_to).
    scores:  (N,) float32, already divided by `score_scale`; None for retrieval tasks.
    """

    name: str
    columns: tuple[str, ...]
    table: Table
    spec: tuple[tuple[str, int | None], ...]  # each text column as (source column, list item or None)
    rows: np.ndarray
    scores: np.ndarray | None
    score_column: str | None = None  # the source column the scores came from (pair+score tasks only)
    dropped_rows: int = 0  # rows dropped on reading because their negatives list was shorter than needed
    bad_rows: dict[str, int] = field(default_factory=dict)  # rows dropped as bad (bad_rows "drop"), by reason
    _hashes: list = field(default_factory=list, repr=False)  # [(N_src, t) uint64] once computed, shared by selects

    @property
    def source(self) -> str:
        return self.table.source

    @property
    def row_ids(self) -> np.ndarray:
        """(N,) the source row of each row (its index in the file after a `select`)."""
        return self.rows

    def __len__(self) -> int:
        return len(self.rows)

    def row_ref(self, i: int) -> str:
        """Where row i came from, for error messages: 'file.jsonl:17' (its line) or 'dataset X row 17'."""
        return self.table.ref(int(self.rows[i]))

    def select(self, indices) -> "TaskData":
        """A new TaskData with rows `indices` (in that order, repeats allowed); row_ref still points at the source."""
        indices = np.asarray(indices, dtype=np.int64)
        return replace(self, rows=self.rows[indices], scores=None if self.scores is None else self.scores[indices])

    # ---- reading texts
    def batch(self, rows: Sequence[int]) -> tuple[list[str], np.ndarray | None]:
        """The B rows `rows` → (their t·B texts column after column — text c·B + i is column c of row i, the
        layout `Objective` reads —, their (B,) float32 scores or None). Read from the table: one batch at a time."""
        source = self.rows[np.asarray(rows, dtype=np.int64)]  # (B,)
        texts = [text for column, item in self.spec for text in self.table.values(column, source, item)]
        return texts, None if self.scores is None else self.scores[np.asarray(rows, dtype=np.int64)]

    def text_rows(self, indices: Sequence[int] | None = None) -> list[tuple[str, ...]]:
        """Rows `indices` (default: all) as tuples of t texts. Builds Python strings: for small data (evaluation
        hold-outs, tests); training reads `batch`."""
        indices = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64)
        source = self.rows[indices]
        return list(zip(*(self.table.values(column, source, item) for column, item in self.spec)))

    def text_ids(self) -> RowsOf:
        """(N, t) uint64 hashes of every row's texts (equal texts, equal hashes), gathered on demand: what the
        no-duplicates sampler compares."""
        return RowsOf(self._source_hashes(), self.rows)

    def _source_hashes(self) -> np.ndarray:
        if not self._hashes:
            self._hashes.append(text_hashes(self.table, self.spec))
        return self._hashes[0]

    def fingerprint(self, legacy: bool = False) -> dict:
        """{"rows": N, "hashes": hex}: blake2b of the rows' text hashes, in order, and of their scores — what the
        ranks compare before the first step and a resume compares with its checkpoint; reads 8 bytes per text.
        `legacy`: the older {"rows", "blake2b"} of the texts themselves, which checkpoints before it recorded."""
        h = hashlib.blake2b(digest_size=16)
        ids = self.text_ids()
        for start in range(0, len(self), 1 << 16):  # chunks: bounded memory whatever N
            if legacy:
                chunk = self.text_rows(np.arange(start, min(start + (1 << 16), len(self))))
                h.update("\x1e".join("\x1f".join(row) for row in chunk).encode("utf-8", "surrogatepass") + b"\x1e")
            else:
                h.update(np.ascontiguousarray(ids[start:start + (1 << 16)], dtype="<u8").tobytes())
        if self.scores is not None:
            h.update(np.ascontiguousarray(self.scores, dtype=np.float32).tobytes())
        return {"rows": len(self), "blake2b" if legacy else "hashes": h.hexdigest()}

    @classmethod
    def from_rows(cls, name: str, columns: Sequence[str], texts: Sequence[Sequence[str]],
                  scores: Sequence[float] | None = None, source: str = "rows",
                  lines: Sequence[int] | None = None) -> "TaskData":
        """A TaskData of rows given in memory (tests, tools): t text columns, optional scores, and the line of
        each row in `source` (else row refs are 'SOURCE row i')."""
        import pyarrow as pa

        from .file_tables import LINE

        columns = tuple(columns)
        table = {c: pa.array([row[k] for row in texts], type=pa.string()) for k, c in enumerate(columns)}
        if lines is not None:
            table[LINE] = pa.array(np.asarray(lines, dtype=np.int64))
        table = pa.table(table)
        return cls(name, columns, Table(table, source), tuple((c, None) for c in columns),
                   np.arange(len(texts), dtype=np.int64),
                   None if scores is None else np.asarray(scores, dtype=np.float32))


# ──────────────────────────────────────────────────────────────────────────────────────────────────────────────
# Loading
# ──────────────────────────────────────────────────────────────────────────────────────────────────────────────

def load_task(task: TaskConfig, name: str, *, base_dir: str | os.PathLike | None = None) -> TaskData:
    """Read and check the rows of `task`; a relative local path is resolved against `base_dir` (default: cwd)."""
    table = read_table(task, base_dir)
    checked = check_rows(table, task, name)
    spec = text_spec(task)
    has_score = LOSSES[task.loss].rows.scored
    return TaskData(name, spec_names(spec), table, spec, checked.kept, checked.scores,
                    score_column=task.columns[2] if has_score else None, dropped_rows=checked.short_rows,
                    bad_rows=checked.bad_rows)


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
                return NoDuplicatesBatchSampler(data.text_ids(), batch_size, **common)
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
