"""Reading a task's rows from where they live: JSON lines, JSON, CSV, parquet, `save_to_disk` folders, the hub.

    read_columns(task) → (source for messages, {column: [N raw values]}, line numbers of a line-based file | None)

* Local `.jsonl` / `.jsonl.gz` / `.json` are read line by line (files.read_jsonl), so an error names the LINE of
  the file (`FILE:LINE: ...`). `.csv` and `.parquet` are read by pyarrow (the engine under `datasets`),
  `save_to_disk` folders and hub ids by `datasets`; their errors name the ROW (0-based, not counting a CSV header).
* Values are returned as they are; data.py checks them.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from ..losses import LOSSES
from .config import TaskConfig
from .files import open_maybe_gzip, read_json, read_jsonl, short

LINE_FORMATS = (".jsonl", ".jsonl.gz", ".json", ".json.gz")  # read here, errors name the line
TABULAR_FORMATS = (".csv", ".parquet")  # read by pyarrow, errors name the row
SUPPORTED = "a .jsonl, .jsonl.gz, .json, .csv or .parquet file, a datasets.save_to_disk folder, or a hub id"


def read_columns(task: TaskConfig, base_dir=None) -> tuple[str, dict[str, list], np.ndarray | None]:
    """Return (source for messages, {column: list of N raw values}, line numbers or None)."""
    path = Path(task.dataset).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    lower = path.name.lower()
    columns = source_columns(task)

    if path.is_dir():
        return str(path), _columns_of(_load_from_disk(path, task.split), columns, str(path)), None
    if path.is_file():
        if lower.endswith(LINE_FORMATS):
            values, lines = _read_json_file(path, columns)
            return str(path), values, lines
        if lower.endswith(TABULAR_FORMATS):
            return str(path), _columns_of(_load_tabular(path, text_columns(task)), columns, str(path)), None
        raise DataError(f"{path}: unsupported file type; expected {SUPPORTED}")
    if lower.endswith(LINE_FORMATS + TABULAR_FORMATS) or task.dataset.startswith((".", "/", "~")):
        raise DataError(f"{task.dataset}: no such file or folder (looked at {path.resolve()})")
    source = f"dataset {task.dataset}"
    return source, _columns_of(_load_hub(task, path), columns, source), None


def _read_json_file(path: Path, columns: tuple[str, ...]) -> tuple[dict[str, list], np.ndarray | None]:
    """JSON lines (one object per line), or for .json a single document holding a list of objects."""
    if path.name.lower().endswith((".json", ".json.gz")):
        with _reading(path), open_maybe_gzip(path) as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        if head.startswith(b"["):  # a JSON array: one document, rows are its items
            values = {c: [] for c in columns}
            for i, row in enumerate(read_json(path, DataError)):
                _append_row(values, row, columns, f"{path} row {i}")
            return values, None

    values, lines = {c: [] for c in columns}, []
    targets = [(c, values[c].append) for c in columns]
    for line_no, row in read_jsonl(path):
        try:
            for c, append in targets:
                append(row[c])
        except KeyError:  # a key missing
            _append_row(values, row, columns, f"{path}:{line_no}")  # raises, saying which
            raise AssertionError("unreachable: _append_row accepted a row that failed above")
        lines.append(line_no)
    return values, np.asarray(lines, dtype=np.int64)


def _append_row(values: dict[str, list], row: Any, columns: tuple[str, ...], ref: str) -> None:
    if not isinstance(row, dict):
        raise DataError(f"{ref}: expected a JSON object with keys {', '.join(columns)}, "
                        f"found {type(row).__name__} {short(row)}")
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


def source_columns(task: TaskConfig) -> tuple[str, ...]:
    """The columns to read: `columns`, then the list column of `negatives` if there is one."""
    return task.columns + ((task.negatives.column,) if task.negatives is not None else ())


def text_columns(task: TaskConfig) -> tuple[str, ...]:
    """The columns of `task` that hold texts (a pair+score task's last column is its score)."""
    return LOSSES[task.loss].rows.text_columns(task.columns)


def _load_tabular(path: Path, texts: tuple[str, ...] = ()):
    """A .csv or .parquet file as an Arrow table (the format `datasets` stores; no cache folder is written).

    A CSV's text columns are read as strings whatever they look like (a column of digits is text too)."""
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet

    try:
        if path.name.lower().endswith(".csv"):
            convert = pyarrow.csv.ConvertOptions(column_types={c: pa.string() for c in texts},
                                                 strings_can_be_null=False)
            return pyarrow.csv.read_csv(path, parse_options=pyarrow.csv.ParseOptions(newlines_in_values=True),
                                        convert_options=convert)
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
    """A hub dataset: its repo snapshot through the Hugging Face cache, then read as a local dataset folder.

    Why not `datasets.load_dataset(hub_id)`: offline (HF_HUB_OFFLINE=1) it reads only datasets' own cache of
    earlier downloads, never the hub cache, so a repo fetched once with `huggingface-cli download` (or by another
    tool) would not load. `snapshot_download` finds it in the hub cache offline and downloads it online; the
    folder's README.md `configs:` section maps (config, split) to its parquet files as on the hub."""
    import datasets
    import huggingface_hub

    try:
        folder = huggingface_hub.snapshot_download(task.dataset, repo_type="dataset")
    except Exception as e:  # offline, unknown id: the hub client has many exception types
        raise DataError(f"{task.dataset!r} is neither a local file or folder (looked at {looked_at.resolve()}) "
                        f"nor reachable on the Hugging Face hub or in its cache: {type(e).__name__}: "
                        f"{(str(e).strip().splitlines() or [''])[0]}") from e
    try:
        return datasets.load_dataset(folder, task.config, split=task.split)
    except Exception as e:  # unknown config/split, unreadable files
        raise DataError(f"dataset {task.dataset} (config={task.config!r}, split={task.split!r}, files in "
                        f"{folder}): {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}") from e


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
