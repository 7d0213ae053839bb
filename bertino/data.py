"""Task data: read a task's rows from a local file / folder or the hub, check them, balance task sizes.

Shapes: N rows, t text columns (all of a retrieval task's `columns`; the first 2 of a pair+score task's).

    source ──read──▶ {column: [N values]} ──_check_rows──▶ TaskData(texts: N tuples of t str, scores: (N,) | None)

* Local `.jsonl` / `.jsonl.gz` / `.json` are read line by line here, so an error names the LINE of the file.
  `.csv` and `.parquet` are read by pyarrow (the engine under `datasets`), `save_to_disk` folders and hub ids by
  `datasets`; their errors name the ROW (0-based, not counting a CSV header).
* Rows are checked before training starts: a bad row found after an hour of training wastes the hour.
* `balance_to` (V5: "STS dataset balanced to match retrieval dataset size") resamples one task to another's
  row count with a seeded numpy Generator, so every process and every resume gets the same rows.
"""

from __future__ import annotations

import gzip
import json
import math
import numbers
import operator
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from bertino.config import PAIR_SCORE_LOSSES, Config, TaskConfig
from bertino.errors import ConfigError, DataError

LINE_FORMATS = (".jsonl", ".jsonl.gz", ".json", ".json.gz")  # read here, errors name the line
TABULAR_FORMATS = (".csv", ".parquet")  # read by pyarrow, errors name the row
SUPPORTED = "a .jsonl, .jsonl.gz, .json, .csv or .parquet file, a datasets.save_to_disk folder, or a hub id"


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

    def __len__(self) -> int:
        return len(self.texts)

    def row_ref(self, i: int) -> str:
        """Where row i came from, for error messages: 'file.jsonl line 17' or 'dataset X row 17'."""
        if self.line_numbers is not None:
            return f"{self.source} line {int(self.line_numbers[i])}"
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
        )


# ──────────────────────────────────────────────────────────────────────────────────────────────────────────────
# Loading
# ──────────────────────────────────────────────────────────────────────────────────────────────────────────────

def load_task(task: TaskConfig, name: str, *, base_dir: str | os.PathLike | None = None) -> TaskData:
    """Read and check the rows of `task`; a relative local path is resolved against `base_dir` (default: cwd)."""
    source, values, line_numbers = _read(task, base_dir)
    return _check_rows(task, name, source, values, line_numbers)


def load_tasks(cfg: Config, *, base_dir: str | os.PathLike | None = None) -> dict[str, TaskData]:
    """Load every task of `cfg` and apply `balance_to` with `cfg.train.seed`."""
    tasks = {name: load_task(task, name, base_dir=base_dir) for name, task in cfg.tasks.items()}
    return balance_tasks(tasks, cfg.tasks, cfg.train.seed)


def _read(task: TaskConfig, base_dir) -> tuple[str, dict[str, list], np.ndarray | None]:
    """Return (source for messages, {column: list of N raw values}, line numbers or None)."""
    path = Path(task.dataset).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    lower = path.name.lower()

    if path.is_dir():
        return str(path), _columns_of(_load_from_disk(path, task.split), task.columns, str(path)), None
    if path.is_file():
        if lower.endswith(LINE_FORMATS):
            values, lines = _read_json_file(path, task.columns)
            return str(path), values, lines
        if lower.endswith(TABULAR_FORMATS):
            return str(path), _columns_of(_load_tabular(path), task.columns, str(path)), None
        raise DataError(f"{path}: unsupported file type; expected {SUPPORTED}")
    if lower.endswith(LINE_FORMATS + TABULAR_FORMATS) or task.dataset.startswith((".", "/", "~")):
        raise DataError(f"{task.dataset}: no such file or folder (looked at {path.resolve()})")
    source = f"dataset {task.dataset}"
    return source, _columns_of(_load_hub(task, path), task.columns, source), None


def _read_json_file(path: Path, columns: tuple[str, ...]) -> tuple[dict[str, list], np.ndarray | None]:
    """JSON lines (one object per line), or for .json a single document holding a list of objects."""
    opener: Callable = gzip.open if path.name.lower().endswith(".gz") else open
    if path.name.lower().endswith((".json", ".json.gz")):
        with _reading(path), opener(path, "rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        if head.startswith(b"["):  # a JSON array: one document, rows are its items
            with _reading(path), opener(path, "rb") as f:
                try:
                    items = json.loads(f.read())
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise DataError(f"{path}: invalid JSON: {_json_msg(e)}") from e
            values = {c: [] for c in columns}
            for i, row in enumerate(items):
                _append_row(values, row, columns, f"{path} row {i}")
            return values, None

    values, lines = {c: [] for c in columns}, []
    targets = [(c, values[c].append) for c in columns]
    decode = json.JSONDecoder().decode  # what json.loads(str) calls, without its per-call overhead
    with _reading(path), opener(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):  # bytes, so a bad byte is reported with its line
            if not raw.strip():
                continue  # blank lines (e.g. a trailing newline) are not rows
            try:
                row = decode(raw.decode("utf-8-sig" if lineno == 1 else "utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{path} line {lineno}: invalid JSON: {_json_msg(e)}") from e
            try:
                for c, append in targets:
                    append(row[c])
            except (KeyError, TypeError, IndexError):  # not an object, or a key missing
                _append_row(values, row, columns, f"{path} line {lineno}")  # raises, saying which
                raise AssertionError("unreachable: _append_row accepted a row that failed above")
            lines.append(lineno)
    return values, np.asarray(lines, dtype=np.int64)


def _append_row(values: dict[str, list], row: Any, columns: tuple[str, ...], ref: str) -> None:
    if not isinstance(row, dict):
        raise DataError(f"{ref}: expected a JSON object with keys {', '.join(columns)}, "
                        f"found {type(row).__name__} {_short(row)}")
    for c in columns:
        if c not in row:
            raise DataError(f"{ref}: missing column {c!r}; the row has keys: {', '.join(map(str, row)) or '(none)'}")
        values[c].append(row[c])


class _reading:
    """Turn I/O failures (permissions, a corrupt .gz) into a DataError that names the file."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, (OSError, EOFError, zlib.error)):
            raise DataError(f"{self.path}: cannot read: {exc}") from exc
        return False


def _load_tabular(path: Path):
    """A .csv or .parquet file as an Arrow table (the format `datasets` stores; no cache folder is written)."""
    import pyarrow.csv
    import pyarrow.parquet

    try:
        if path.name.lower().endswith(".csv"):
            return pyarrow.csv.read_csv(path, parse_options=pyarrow.csv.ParseOptions(newlines_in_values=True))
        return pyarrow.parquet.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...: all mean "not readable as such"
        raise DataError(f"{path}: cannot read as {path.suffix[1:]}: {type(e).__name__}: {e}") from e


def _load_from_disk(path: Path, split: str):
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{path}: a folder, but not one written by datasets' save_to_disk: "
                        f"{type(e).__name__}: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split {split!r}; the saved DatasetDict has splits: {', '.join(ds)}")
        ds = ds[split]
    return ds


def _load_hub(task: TaskConfig, looked_at: Path):
    import datasets

    try:
        return datasets.load_dataset(task.dataset, task.config, split=task.split)
    except Exception as e:  # offline, unknown id, unknown config/split: the hub client has many exception types
        raise DataError(f"{task.dataset!r} is neither a local file or folder (looked at {looked_at.resolve()}) "
                        f"nor reachable on the Hugging Face hub (config={task.config!r}, split={task.split!r}): "
                        f"{type(e).__name__}: {e}") from e


def _columns_of(table, columns: tuple[str, ...], source: str) -> dict[str, list]:
    """{column: list of values} from a `datasets.Dataset` or an Arrow table, read column-wise (fast for ~1M rows)."""
    names = table.column_names
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(f"{source}: missing column {missing[0]!r} (in every row); its columns are: "
                        f"{', '.join(names)}")
    if hasattr(table, "with_format"):  # a datasets.Dataset: drop any saved numpy/torch format, honour indices
        return table.with_format(None).select_columns(list(columns))[:]
    return {c: table.column(c).to_pylist() for c in columns}


# ──────────────────────────────────────────────────────────────────────────────────────────────────────────────
# Checking
# ──────────────────────────────────────────────────────────────────────────────────────────────────────────────

def _check_rows(task: TaskConfig, name: str, source: str, values: dict[str, list],
                line_numbers: np.ndarray | None) -> TaskData:
    has_score = task.loss in PAIR_SCORE_LOSSES
    text_columns = task.columns[:2] if has_score else task.columns
    n = len(values[task.columns[0]])
    data = TaskData(name, text_columns, [], None, source, line_numbers=line_numbers,
                    score_column=task.columns[2] if has_score else None)
    if n == 0:
        raise DataError(f"task {name!r}: {source} has no rows")

    text_values = [values[c] for c in text_columns]  # t lists of N values
    if not _texts_are_valid(text_values, check_negatives=not has_score):
        _raise_first_bad_text(name, data, text_columns, text_values, check_negatives=not has_score)
    data.texts = list(zip(*text_values))  # N tuples of t str
    if has_score:
        data.scores = _check_scores(task, name, data, values[task.columns[2]])
    return data


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
                                f"string, found {_short(text)}")
        if check_negatives:
            anchor, positive = row[0].strip(), row[1].strip()
            for column, negative in zip(text_columns[2:], row[2:]):
                negative = negative.strip()
                if negative in (positive, anchor):
                    which = text_columns[1] if negative == positive else text_columns[0]
                    raise DataError(f"task {name!r}: {data.row_ref(i)}: column {column!r} equals column "
                                    f"{which!r} ({_short(negative)}); a hard negative must differ from the "
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
                                f"found {_short(value)}")
            try:
                finite = math.isfinite(float(value))
            except OverflowError:
                finite = False
            if not finite:
                raise DataError(f"task {name!r}: {data.row_ref(i)}: column {column!r}: expected a finite "
                                f"number, found {_short(value)}")
        scores = np.asarray([float(v) for v in raw], dtype=np.float64)  # numbers.Real that are not int/float
    with np.errstate(over="ignore"):  # overflow is reported below, with the row
        scaled = (scores / task.score_scale).astype(np.float32)  # (N,)
    bad = np.flatnonzero(~np.isfinite(scaled))
    if bad.size:
        i = int(bad[0])
        raise DataError(f"task {name!r}: {data.row_ref(i)}: column {column!r}: {raw[i]!r} / score_scale "
                        f"{task.score_scale} does not fit in float32")
    if task.loss == "cosine":  # CosineSimilarityLoss regresses cos(e1, e2) onto the score: it must be in [0, 1]
        bad = np.flatnonzero((scaled < 0) | (scaled > 1))
        if bad.size:
            i = int(bad[0])
            raise DataError(f"task {name!r}: {data.row_ref(i)}: column {column!r}: the 'cosine' loss needs "
                            f"scores in [0, 1] after dividing by score_scale ({task.score_scale}), found "
                            f"{raw[i]!r}; set tasks.{name}.score_scale (stsb_multi_mt: 5.0)")
    return scaled


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_msg(e: Exception) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"{e.msg} (line {e.lineno}, column {e.colno})" if e.lineno > 1 else f"{e.msg} (column {e.colno})"
    return f"not UTF-8 text ({e})"


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
