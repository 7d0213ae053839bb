"""Local files → Arrow record batches of a task's columns: JSON lines, JSON arrays, CSV, parquet.

    file_batches(path, columns, roles, alternatives) → record batches (readers.py keeps them in memory or writes
                                                       them into a prepared, memory-mapped file)

* parquet and CSV are read by pyarrow, a block at a time; a CSV's text columns as strings whatever they look like.
* JSON is read line by line (files.read_jsonl_lines), so an error names the LINE (`FILE:LINE: ...`, kept in a
  `__line__` column). A line that cannot be a row (invalid JSON, not an object, a missing column, a value of the
  wrong type) is kept as a row with the problem written in `__reason__` / `__problem__` (null on good rows), so that
  row_checks.py can count every bad row and report them together.
* `roles` {column: "text" | "score" | "list"} say how a JSON value is stored (string, float64, list<string>);
  `alternatives` {column: other}: a row or file without `column` gives `other` instead.
"""

from __future__ import annotations

import numbers
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import DataError
from .files import open_maybe_gzip, read_json, read_jsonl_lines, short

LINE, REASON, PROBLEM = "__line__", "__reason__", "__problem__"  # bookkeeping columns of JSON sources
BATCH_ROWS = 8192  # rows per Arrow record batch while converting JSON


def file_batches(path: Path, columns: tuple[str, ...], roles: dict[str, str], alternatives: dict[str, str]) -> Iterator:
    """Record batches of the file's `columns` (plus bookkeeping columns for JSON)."""
    lower = path.name.lower()
    if lower.endswith(".csv"):
        yield from _csv_batches(path, columns, roles, alternatives)
    elif lower.endswith(".parquet"):
        yield from _parquet_batches(path, columns, alternatives)
    else:
        yield from _json_batches(path, columns, roles, alternatives)


def _parquet_batches(path: Path, columns: tuple[str, ...], alternatives: dict[str, str]) -> Iterator:
    import pyarrow.parquet as pq

    try:
        # no pre-buffering, one thread: a row group is then read a page at a time (on 1M rows of ~2 KB in row
        # groups of 100k, a peak of 0.17 GB instead of 1.2 GB, and faster)
        file = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
        read = with_alternatives(file.schema_arrow.names, columns, alternatives, str(path))
        for batch in file.iter_batches(batch_size=BATCH_ROWS, columns=list(read), use_threads=False):
            yield batch.rename_columns(list(columns))
    except DataError:
        raise
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...: all mean "not readable as such"
        raise DataError(f"{path}: cannot read as parquet: {type(e).__name__}: {e}") from e


def _csv_batches(path: Path, columns: tuple[str, ...], roles: dict[str, str],
                 alternatives: dict[str, str]) -> Iterator:
    """A CSV's text columns are read as strings whatever they look like (a column of digits is text too)."""
    import pyarrow as pa
    import pyarrow.csv

    texts = [c for c in columns if roles[c] == "text"]
    texts += [alternatives[c] for c in texts if c in alternatives]
    try:
        reader = pyarrow.csv.open_csv(
            path, parse_options=pyarrow.csv.ParseOptions(newlines_in_values=True),
            read_options=pyarrow.csv.ReadOptions(block_size=16 << 20),
            convert_options=pyarrow.csv.ConvertOptions(column_types={c: pa.string() for c in texts},
                                                       strings_can_be_null=False))
        read = with_alternatives(reader.schema.names, columns, alternatives, str(path))
        for batch in reader:
            yield batch.select(list(read)).rename_columns(list(columns))
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: cannot read as csv: {type(e).__name__}: {e}") from e


def with_alternatives(names, columns: tuple[str, ...], alternatives: dict[str, str], source: str) -> tuple[str, ...]:
    """The source columns to read for `columns`: a column, else its alternative when the source has that."""
    read = tuple(alternatives[c] if c not in names and alternatives.get(c) in names else c for c in columns)
    check_present(names, read, source)
    return read


def check_present(names, columns: tuple[str, ...], source: str) -> None:
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(f"{source}: missing column {missing[0]!r} (in every row); its columns are: "
                        f"{', '.join(names)}")


def _json_batches(path: Path, columns: tuple[str, ...], roles: dict[str, str],
                  alternatives: dict[str, str]) -> Iterator:
    """JSON lines (one object per line), or for .json a single document holding a list of objects."""
    if path.name.lower().endswith((".json", ".json.gz")):
        with _reading(path), open_maybe_gzip(path) as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        if head.startswith(b"["):  # a JSON array: one document, rows are its items (no line numbers)
            items = read_json(path, DataError)
            yield from _rows_to_batches(((None, row, None if isinstance(row, dict) else (
                "not a JSON object", f"expected a JSON object, found {type(row).__name__} {short(row)}"))
                for row in items), columns, roles, alternatives)
            return
    yield from _rows_to_batches(read_jsonl_lines(path), columns, roles, alternatives)


def _rows_to_batches(lines, columns: tuple[str, ...], roles: dict[str, str], alternatives: dict[str, str]) -> Iterator:
    """(line | None, row | None, problem | None) → record batches: one column per source column (its values, or
    null where a value cannot be stored), LINE (when lines are known), REASON and PROBLEM (null on good rows)."""
    import pyarrow as pa

    with_lines = None
    buffer: list[tuple] = []

    def flush():
        values = list(zip(*buffer))  # per field: (line, reason, problem, *columns)
        reasons, problems = list(values[1]), list(values[2])
        names, arrays = [], []
        for j, c in enumerate(columns):
            array, bad = _arrow(list(values[3 + j]), roles[c])
            for i in bad:  # texts that cannot be UTF-8 (a lone surrogate "\ud800", which JSON allows)
                if reasons[i] is None:
                    reasons[i] = f"column {c!r}: not a non-empty string"
                    problems[i] = f"column {c!r}: not valid Unicode text, found {short(values[3 + j][i])}"
            names.append(c)
            arrays.append(array)
        if with_lines:
            names.append(LINE)
            arrays.append(_numbers(list(values[0]), np.int64))
        names += [REASON, PROBLEM]
        arrays += [_strings(reasons)[0], _strings(problems)[0]]
        buffer.clear()
        return pa.RecordBatch.from_arrays(arrays, names=names)

    for line, row, problem in lines:
        with_lines = line is not None
        if problem is not None:
            buffer.append((line, *problem, *([None] * len(columns))))
        else:
            if alternatives:
                row = {**{c: row[a] for c, a in alternatives.items() if c not in row and a in row}, **row}
            buffer.append((line, *_json_row(row, columns, roles)))
        if len(buffer) == BATCH_ROWS:
            yield flush()
    if buffer:
        yield flush()


def _json_row(row: dict, columns: tuple[str, ...], roles: dict[str, str]) -> tuple:
    """(reason, problem, *values) of one JSON object: the first problem in column order, None for none."""
    for c in columns:
        if c not in row:
            return (f"missing column {c!r}", f"missing column {c!r}; the row has keys: "
                    f"{', '.join(map(str, row)) or '(none)'}", *([None] * len(columns)))
    reason = problem = None
    values = []
    for c in columns:
        value, role = row[c], roles[c]
        ok = (type(value) is str if role == "text" else
              isinstance(value, list) and all(type(v) is str for v in value) if role == "list" else
              not isinstance(value, bool) and isinstance(value, numbers.Real))
        if ok and role == "score":
            try:
                value = float(value)
            except OverflowError:  # a JSON integer with 400 digits
                ok = False
                if reason is None:
                    reason, problem = (f"column {c!r}: not a finite number",
                                       f"column {c!r}: expected a finite number, found {short(value)}")
        elif not ok and reason is None:
            reason, problem = {
                "text": (f"column {c!r}: not a non-empty string",
                         f"column {c!r}: expected a non-empty string, found {short(value)}"),
                "list": (f"column {c!r}: not a list of strings",
                         f"column {c!r}: expected a list of strings, found {short(value)}"),
                "score": (f"column {c!r}: not a finite number", f"column {c!r}: expected a number, found "
                                                                  f"{short(value)}")}[role]
        values.append(value if ok else None)
    return (reason, problem, *values)


# Arrays are built from buffers: `pa.array(list)` would import pandas, ~0.3 s at the start of every small run.
def _arrow(values: list, role: str) -> tuple[Any, list[int]]:
    """(Arrow array of one column's values, None → null; indices of rows whose texts are not valid Unicode)."""
    import pyarrow as pa

    if role == "text":
        return _strings(values)
    if role == "score":
        return _numbers(values, np.float64), []
    lengths = np.fromiter((len(v) if v is not None else 0 for v in values), np.int64, len(values))
    items, bad_items = _strings([t for v in values if v is not None for t in v])
    offsets = np.zeros(len(values) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    bad = sorted(set((np.searchsorted(offsets, bad_items, side="right") - 1).tolist()))
    valid = np.fromiter((v is not None for v in values), bool, len(values))
    return pa.Array.from_buffers(pa.list_(pa.string()), len(values), [_bitmap(valid), pa.py_buffer(
        offsets.astype(np.int32))], null_count=int((~valid).sum()), children=[items]), bad


def _strings(values: list) -> tuple[Any, list[int]]:
    import pyarrow as pa

    encoded, bad = [], []
    for i, v in enumerate(values):
        try:
            encoded.append(None if v is None else v.encode("utf-8"))
        except UnicodeEncodeError:
            encoded.append(None)
            bad.append(i)
    n = len(encoded)
    valid = np.fromiter((e is not None for e in encoded), bool, n)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(np.fromiter((len(e) if e is not None else 0 for e in encoded), np.int64, n), out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise DataError(f"{n} rows hold more than 2 GB of text in one column")
    data = b"".join(e for e in encoded if e is not None)
    return pa.Array.from_buffers(pa.string(), n, [_bitmap(valid), pa.py_buffer(offsets.astype(np.int32)),
                                                  pa.py_buffer(data)], null_count=int((~valid).sum())), bad


def _numbers(values: list, dtype):
    import pyarrow as pa

    n = len(values)
    valid = np.fromiter((v is not None for v in values), bool, n)
    data = np.fromiter((v if v is not None else 0 for v in values), dtype, n)
    return pa.Array.from_buffers(pa.from_numpy_dtype(dtype), n, [_bitmap(valid), pa.py_buffer(data)],
                                 null_count=int((~valid).sum()))


def _bitmap(valid: np.ndarray):
    """Arrow's validity bitmap (None when every value is there)."""
    import pyarrow as pa

    return None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))


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
