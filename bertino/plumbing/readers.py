"""Reading a task's rows from where they live into ONE Arrow table: JSON lines, JSON, CSV, parquet, `save_to_disk`
folders, hub dataset repos (by id, or a local clone of one).

    read_table(task) → Table(table: pa.Table of the task's source columns, source for messages, ...)

Where the rows end up:
* Hub ids, clones of hub repos and `save_to_disk` folders are read by `datasets`, whose Arrow files in its cache
  are memory-mapped: the rows stay on disk, the page cache holds what was read lately.
* A local JSONL / JSON / CSV / parquet file larger than `in_memory_bytes()` (64 MB) is *prepared* once: written,
  column by column as read, into an Arrow stream file under `data_cache_root()` (the `datasets` cache,
  `$HF_DATASETS_CACHE/bertino/`; the format `datasets.Dataset.from_file` opens) and memory-mapped. A later run
  with the same file (path, size, modification time) and columns opens it at once.
* A smaller file is read into memory (no cache files): the same table, the same code.

Every later step (checks, hashes, batches) reads the table column-wise or a batch of rows at a time, so no step
holds the rows as Python strings. Errors name the LINE of a JSONL file (`FILE:LINE: ...`, kept in a `__line__`
column) or the ROW of the others (0-based, not counting a CSV header). How each file format becomes record
batches is file_tables.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from ..losses import LOSSES
from .config import TaskConfig
from .file_tables import LINE, file_batches, with_alternatives
from .files import publish_dir

LINE_FORMATS = (".jsonl", ".jsonl.gz", ".json", ".json.gz")  # read here, errors name the line
TABULAR_FORMATS = (".csv", ".parquet")  # read by pyarrow, errors name the row
SUPPORTED = ("a .jsonl, .jsonl.gz, .json, .csv or .parquet file, a datasets.save_to_disk folder, a hub dataset "
             "repo (its id, or a local clone: data files + README.md `configs:`)")
PREPARED_VERSION = 1  # part of every cache key: bump when the prepared layout changes


def in_memory_bytes() -> int:
    """Files up to this size are read into memory; larger ones are prepared once into the cache and
    memory-mapped (`$BERTINO_DATA_IN_MEMORY_BYTES`, default 64 MB; a `.gz` counts 4× its size)."""
    return int(os.environ.get("BERTINO_DATA_IN_MEMORY_BYTES", 64 << 20))


def data_cache_root() -> Path:
    """Where prepared tables and their hashes live: `datasets`' own cache folder (`$HF_DATASETS_CACHE`, else
    `$HF_HOME/datasets`, else `~/.cache/huggingface/datasets`), in a `bertino/` folder."""
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(os.environ.get("HF_DATASETS_CACHE") or os.path.join(home, "datasets")).expanduser() / "bertino"


@dataclass
class Table:
    """A task's source rows as one Arrow table (memory-mapped or in memory) and how to name its rows.

    `cache_dir` is a folder for files derived from the table (text hashes, check results), or None when the
    table is in memory (derived data is then recomputed: it is small)."""

    table: Any  # pyarrow.Table: the task's source columns, plus LINE / REASON / PROBLEM for JSON sources
    source: str  # the file path, or "dataset ID", for messages
    cache_dir: Path | None = None
    _starts: dict = field(default_factory=dict, repr=False)  # column → chunk start rows, for `value`

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    def has(self, column: str) -> bool:
        return column in self.table.column_names

    def ref(self, row: int) -> str:
        """Where source row `row` came from: 'file.jsonl:17' (its line) or 'dataset X row 17'."""
        if self.has(LINE):
            return f"{self.source}:{self.value(LINE, row)}"
        return f"{self.source} row {row}"

    def value(self, column: str, row: int) -> Any:
        """One value as a Python object (a str, a float, a list...)."""
        chunked = self.table.column(column)
        starts = self._chunk_starts(column)
        c = int(np.searchsorted(starts, row, side="right")) - 1
        return chunked.chunk(c)[row - int(starts[c])].as_py()

    def values(self, column: str, rows: np.ndarray, item: int | None = None) -> list:
        """The values of `column` at source rows `rows` (B,), in that order; `item`: the item-th element of a list
        column. A batch's worth: one scalar read per row, no copy of the column."""
        chunked = self.table.column(column)
        starts = self._chunk_starts(column)
        which = np.searchsorted(starts, rows, side="right") - 1  # (B,) the chunk of each row
        local = np.asarray(rows, dtype=np.int64) - starts[which]  # (B,) the row within its chunk
        chunks = [chunked.chunk(c) for c in range(chunked.num_chunks)]
        if item is None:
            return [chunks[c][i].as_py() for c, i in zip(which.tolist(), local.tolist())]
        return [chunks[c][i].as_py()[item] for c, i in zip(which.tolist(), local.tolist())]

    def _chunk_starts(self, column: str) -> np.ndarray:
        if column not in self._starts:
            lengths = [len(c) for c in self.table.column(column).chunks]
            self._starts[column] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return self._starts[column]


# ──────────────────────────────────────────────────────────────────────────────────────────────────────────────
# Where a task's data comes from
# ──────────────────────────────────────────────────────────────────────────────────────────────────────────────

def read_table(task: TaskConfig, base_dir=None, alternatives: dict[str, str] | None = None) -> Table:
    """The task's source columns as one Arrow table; a relative local path is resolved against `base_dir`.
    `alternatives` {column: other}: a row (JSON) or a source (tables) without `column` gives `other` instead
    (mining's corpus files: "text", else "positive")."""
    alternatives = alternatives or {}
    path = Path(task.dataset).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    lower = path.name.lower()
    columns = source_columns(task)

    if path.is_dir():
        return _from_dataset(_load_folder(path, task), columns, str(path), alternatives)
    if path.is_file():
        if lower.endswith(".csv") and task.negatives is not None:
            raise DataError(f"{path}: tasks.*.negatives reads a list column ({task.negatives.column!r}), and a CSV "
                            f"file cannot hold lists; use JSONL or parquet, or one CSV column per negative "
                            f"(columns: [query, positive, negative_1, negative_2])")
        if lower.endswith(LINE_FORMATS + TABULAR_FORMATS):
            return _from_file(path, task, columns, alternatives)
        raise DataError(f"{path}: unsupported file type; expected {SUPPORTED}")
    if lower.endswith(LINE_FORMATS + TABULAR_FORMATS) or task.dataset.startswith((".", "/", "~")):
        raise DataError(f"{task.dataset}: no such file or folder (looked at {path.resolve()})")
    source = f"dataset {task.dataset}"
    return _from_dataset(_load_hub(task, path), columns, source, alternatives)


def source_columns(task: TaskConfig) -> tuple[str, ...]:
    """The columns to read: `columns`, then the list column of `negatives` if there is one."""
    return task.columns + ((task.negatives.column,) if task.negatives is not None else ())


def text_columns(task: TaskConfig) -> tuple[str, ...]:
    """The columns of `task` that hold texts (a pair+score task's last column is its score)."""
    return LOSSES[task.loss].rows.text_columns(task.columns)


def column_roles(task: TaskConfig) -> dict[str, str]:
    """{source column: "text" | "score" | "list"}: how a JSON value of each column is stored."""
    roles = {c: "text" for c in text_columns(task)}
    if LOSSES[task.loss].rows.scored:
        roles[task.columns[2]] = "score"
    if task.negatives is not None:
        roles[task.negatives.column] = "list"
    return roles


# ──────────────────────────────────────────────────────────────────────────────────────────────────────────────
# Local files: in memory when small, else prepared once into the cache and memory-mapped
# ──────────────────────────────────────────────────────────────────────────────────────────────────────────────

def _from_file(path: Path, task: TaskConfig, columns: tuple[str, ...], alternatives: dict[str, str]) -> Table:
    stat = path.stat()
    size = stat.st_size * (4 if path.name.lower().endswith(".gz") else 1)
    roles = column_roles(task)
    if size <= in_memory_bytes():
        return Table(_in_memory(list(file_batches(path, columns, roles, alternatives)), columns), str(path))
    key = _key({"file": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                "columns": [[c, roles[c]] for c in columns], "alternatives": alternatives})
    folder = data_cache_root() / key
    if not (folder / "table.arrow").is_file():
        with cache_lock(folder):
            if not (folder / "table.arrow").is_file():  # another process may have prepared it meanwhile
                _prepare(path, columns, roles, alternatives, folder)
    return Table(_memory_mapped(folder / "table.arrow"), str(path), cache_dir=folder)


def _prepare(path: Path, columns: tuple[str, ...], roles: dict[str, str], alternatives: dict[str, str],
             folder: Path) -> None:
    """Convert `path` into `folder/table.arrow` (an Arrow stream), batch by batch, through a temp folder."""
    import pyarrow as pa

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    writer = None
    try:
        with open(tmp / "table.arrow", "wb") as sink:
            for batch in file_batches(path, columns, roles, alternatives):
                writer = writer or pa.ipc.new_stream(sink, batch.schema)
                writer.write_batch(batch)
            if writer is None:  # no rows at all: an empty table with the columns
                writer = pa.ipc.new_stream(sink, pa.schema([(c, pa.string()) for c in columns]))
            writer.close()
        (tmp / "source.json").write_text(json.dumps({"file": str(path.resolve()), "columns": list(columns)}) + "\n")
        publish_dir(tmp, folder, replace=False)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        pa.default_memory_pool().release_unused()


def _in_memory(batches: list, columns: tuple[str, ...]):
    import pyarrow as pa

    if not batches:  # no rows at all: an empty table with the columns
        return pa.table({c: pa.array([], type=pa.string()) for c in columns})
    return pa.Table.from_batches(batches)


def _memory_mapped(path: Path):
    import pyarrow as pa

    return pa.ipc.open_stream(pa.memory_map(str(path))).read_all()  # buffers point into the mapping


# ──────────────────────────────────────────────────────────────────────────────────────────────────────────────
# Datasets: save_to_disk folders, hub repos (by id or a local clone)
# ──────────────────────────────────────────────────────────────────────────────────────────────────────────────

def is_save_to_disk_folder(path: Path) -> bool:
    """What `datasets.save_to_disk` writes: a Dataset (state.json) or a DatasetDict (dataset_dict.json)."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _load_folder(path: Path, task: TaskConfig):
    """A `save_to_disk` folder, or else a dataset repo's files (a `git clone` of a hub dataset: data files and a
    README.md whose `configs:` maps config and split to them), read exactly as its hub id is read."""
    if is_save_to_disk_folder(path):
        return _load_from_disk(path, task.split)
    if not any(p.is_file() and p.suffix in (".parquet", ".jsonl", ".json", ".csv", ".arrow", ".gz", ".md")
               for p in path.rglob("*")):
        raise DataError(f"{path}: a folder, but not one written by datasets' save_to_disk (no state.json or "
                        f"dataset_dict.json), nor a dataset repo's files (no data files in it)")
    return _load_dataset(path, task, str(path))


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
    """A hub dataset: its repo snapshot through the Hugging Face cache, then read as a local dataset folder.

    Why not `datasets.load_dataset(hub_id)`: offline (HF_HUB_OFFLINE=1) it reads only datasets' own cache of
    earlier downloads, never the hub cache, so a repo fetched once with `huggingface-cli download` (or by another
    tool) would not load. `snapshot_download` finds it in the hub cache offline and downloads it online; the
    folder's README.md `configs:` section maps (config, split) to its parquet files as on the hub."""
    import huggingface_hub

    try:
        folder = huggingface_hub.snapshot_download(task.dataset, repo_type="dataset")
    except Exception as e:  # offline, unknown id: the hub client has many exception types
        raise DataError(f"{task.dataset!r} is neither a local file or folder (looked at {looked_at.resolve()}) "
                        f"nor reachable on the Hugging Face hub or in its cache: {type(e).__name__}: "
                        f"{(str(e).strip().splitlines() or [''])[0]}") from e
    return _load_dataset(folder, task, f"dataset {task.dataset}", files_in=folder)


def _load_dataset(folder, task: TaskConfig, what: str, files_in=None):
    """`datasets.load_dataset(folder, config, split)`: the one way a repo's files become a Dataset (memory-mapped
    Arrow files in datasets' cache, prepared once)."""
    import datasets

    try:
        return datasets.load_dataset(str(folder), task.config, split=task.split)
    except Exception as e:  # unknown config/split, unreadable files
        where = f"{what} (config={task.config!r}, split={task.split!r}" + (f", files in {files_in}" if files_in
                                                                           else "") + ")"
        raise DataError(f"{where}: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}") from e


def _from_dataset(ds, columns: tuple[str, ...], source: str, alternatives: dict[str, str]) -> Table:
    """A `datasets.Dataset` → its Arrow table (memory-mapped when datasets keeps it in cache files)."""
    read = with_alternatives(ds.column_names, columns, alternatives, source)
    ds = ds.with_format(None).select_columns(list(read))
    if read != columns:
        ds = ds.rename_columns(dict(zip(read, columns)))
    if getattr(ds, "_indices", None) is not None:  # a selection on top of the table: make it a table of its own
        ds = ds.flatten_indices()
    files = [Path(f["filename"]) for f in ds.cache_files]
    cache_dir = None
    if files and all(f.is_file() for f in files) and sum(f.stat().st_size for f in files) > in_memory_bytes():
        # a large memory-mapped dataset: derived files (hashes, checks) are kept, keyed by its cache files
        stats = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
        cache_dir = data_cache_root() / _key({"dataset_files": stats, "columns": list(columns)})
    return Table(ds.data.table, source, cache_dir=cache_dir)


# ──────────────────────────────────────────────────────────────────────────────────────────────────────────────
# The cache
# ──────────────────────────────────────────────────────────────────────────────────────────────────────────────

def _key(identity: dict) -> str:
    """A cache folder name: the hash of what the prepared data depends on."""
    text = json.dumps({"bertino_prepared": PREPARED_VERSION, **identity}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


@contextlib.contextmanager
def cache_lock(folder: Path):
    """One process prepares `folder` at a time (the ranks of a torchrun job, two runs on one machine): an
    exclusive `flock` on `folder.lock`; the others wait, then find it prepared."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no flock (Windows): each process prepares, the first rename wins
        yield
        return
    with open(folder.parent / f"{folder.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
