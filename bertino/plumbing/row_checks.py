"""The checks every training row passes before training starts, run column-wise on the task's Arrow table.

    check_rows(table, task, name) → Checked(kept source rows (N,), scores (N,) float32 | None, counts)

A bad row found after an hour of training wastes the hour, so every row is checked first — in Arrow, a record
batch at a time (~2 s for 1M rows of 4 texts), never as Python strings. A row is bad, for the first reason that
applies, in this order:

    the source could not give the row      invalid JSON, not an object, a missing column, a value of the wrong type
    the negatives list is not a list       (tasks.NAME.negatives)
    a text is not a non-empty string       None, a number, '', only whitespace (Python's str.strip)
    a hard negative equals its query or its positive (after strip): it would be a right answer
    a score is not a finite number, does not fit float32 after score_scale, or (cosine) is outside [0, 1]

A row whose negatives list is shorter than `negatives.count` is *short*, not bad: `negatives.short_rows` drops
it (counted) or stops the run at the first one. Bad rows stop the run with ONE error that counts them by reason
and names the first few (`FILE:LINE` or `SOURCE row N`), unless `tasks.NAME.bad_rows` is "drop": then they are
left out and counted in the summary line. For a prepared (memory-mapped) table the result is cached next to it,
so a second run does not check again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from ..errors import DataError
from ..losses import LOSSES
from .config import TaskConfig
from .files import atomic_write_with, short
from .file_tables import PROBLEM, REASON
from .arrow_arrays import is_list_of_texts, is_text_type, list_item, to_numpy
from .readers import Table, text_columns

FIRST_FEW = 5  # bad rows named in the error
CHECKS_VERSION = 1  # part of the cache key of check results
# Every character Python's str.strip() removes (str.isspace), for Arrow's utf8_trim: the same rule, column-wise.
WHITESPACE = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200b)))
              + "\u2028\u2029\u202f\u205f\u3000")


@dataclass
class Checked:
    kept: np.ndarray  # (N,) int64 source rows that train, ascending
    scores: np.ndarray | None  # (N,) float32 scores of the kept rows, divided by score_scale; None: retrieval
    short_rows: int = 0  # dropped: negatives list shorter than negatives.count
    bad_rows: dict[str, int] = field(default_factory=dict)  # dropped under bad_rows "drop": reason → count


def text_spec(task: TaskConfig) -> tuple[tuple[str, int | None], ...]:
    """The task's text columns as (source column, list item or None): `columns` (a pair+score task's first
    two), then items 0..count-1 of the `negatives` list column."""
    spec = tuple((c, None) for c in text_columns(task))
    if task.negatives is not None:
        spec += tuple((task.negatives.column, j) for j in range(task.negatives.count))
    return spec


def spec_names(spec) -> tuple[str, ...]:
    """Display names: a flat column's own, `column[j]` for item j of a list column."""
    return tuple(c if j is None else f"{c}[{j}]" for c, j in spec)


def check_rows(table: Table, task: TaskConfig, name: str) -> Checked:
    """Check every row of `table` for `task` (cached beside a memory-mapped table) → the rows that train."""
    if table.num_rows == 0:
        raise DataError(f"task {name!r}: {table.source} has no rows")
    cached = None if table.cache_dir is None else table.cache_dir / f"checks-{_settings_key(task)}.npz"
    if cached is not None and cached.is_file():
        with np.load(cached) as f:
            return Checked(f["kept"], f["scores"] if LOSSES[task.loss].rows.scored else None,
                           int(f["short_rows"]), json.loads(str(f["bad_rows"])))
    checked = _check(table, task, name)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, kept=checked.kept, short_rows=checked.short_rows, bad_rows=json.dumps(checked.bad_rows),
                         scores=checked.scores if checked.scores is not None else np.empty(0, np.float32))

        atomic_write_with(cached, write)
    return checked


def _settings_key(task: TaskConfig) -> str:
    """What the outcome of the checks depends on, besides the table."""
    n = task.negatives
    settings = {"v": CHECKS_VERSION, "columns": task.columns, "rows": LOSSES[task.loss].rows.name, "loss": task.loss,
                "score_scale": task.score_scale, "bad_rows": task.bad_rows,
                "negatives": None if n is None else [n.column, n.count, n.short_rows]}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]


class _Reasons:
    """Reason codes (1, 2, ...) → a short reason for counting and how to explain one row in full."""

    def __init__(self):
        self.codes: dict[str, int] = {}
        self.explain: list = [None]  # code → (kind, *args)

    def code(self, reason: str, *how) -> int:
        if reason not in self.codes:
            self.codes[reason] = len(self.explain)
            self.explain.append(how)
        return self.codes[reason]

    def name(self, code: int) -> str:
        return next(r for r, c in self.codes.items() if c == code)


def _check(table: Table, task: TaskConfig, name: str) -> Checked:
    import pyarrow.compute as pc

    has_score = LOSSES[task.loss].rows.scored
    spec, names = text_spec(task), spec_names(text_spec(task))
    negatives = task.negatives
    reasons = _Reasons()
    codes = np.zeros(table.num_rows, dtype=np.int16)  # (N,) 0: fine, else the row's first reason
    short = np.zeros(table.num_rows, dtype=bool)  # (N,) negatives list too short
    scores = np.zeros(table.num_rows, dtype=np.float32) if has_score else None  # (N,) scaled
    start = 0
    for batch in table.table.to_batches(max_chunksize=1 << 16):
        n = batch.num_rows
        code = codes[start:start + n]  # a view: writing into it writes `codes`

        def mark(mask: np.ndarray, reason: str, *how) -> None:
            if mask.any():
                code[(code == 0) & mask] = reasons.code(reason, *how)

        if table.has(REASON):  # what the reader could not store (JSON sources)
            stored = batch.column(REASON)
            for i in np.flatnonzero(to_numpy(stored.is_valid())).tolist():
                code[i] = code[i] or reasons.code(stored[i].as_py(), "stored")
        if negatives is not None:
            lists = batch.column(negatives.column)
            valid = (to_numpy(lists.is_valid()) if is_list_of_texts(lists.type)
                     else np.zeros(n, dtype=bool))
            mark(~valid, f"column {negatives.column!r}: not a list of strings", "list", negatives.column)
            if valid.any():
                lengths = to_numpy(pc.list_value_length(lists), 0)
                short[start:start + n] = valid & (code == 0) & (lengths < negatives.count)
        trimmed = []
        for (column, item), shown in zip(spec, names):
            array = batch.column(column)
            if item is not None:
                array = list_item(array, item) if is_list_of_texts(array.type) else None
            if array is None or not is_text_type(array.type):
                bad = np.ones(n, dtype=bool)
                trimmed.append(None)
            else:
                t = pc.utf8_trim(array, characters=WHITESPACE)
                bad = to_numpy(pc.utf8_length(t), 0) == 0  # blank, or null (a Python scalar in pc.equal imports pandas)
                trimmed.append(t)
            bad &= ~short[start:start + n]  # a missing item of a short list is the short list's business
            mark(bad, f"column {shown!r}: not a non-empty string", "text", shown, column, item)
        if not has_score and len(spec) > 2 and trimmed[0] is not None and trimmed[1] is not None:
            for k in range(2, len(spec)):  # a negative equal to the positive is also the right answer
                if trimmed[k] is None:
                    continue
                for other in (1, 0):
                    same = to_numpy(pc.equal(trimmed[k], trimmed[other]), False)
                    mark(same, f"column {names[k]!r} equals column {names[other]!r}", "equal", names[k],
                         names[other], spec[k])
        if has_score:
            _check_scores(batch.column(task.columns[2]), task, code, scores[start:start + n], mark)
        start += n

    if short.any() and negatives.short_rows == "error":
        i = int(np.flatnonzero(short)[0])
        items = table.value(negatives.column, i)
        raise DataError(f"task {name!r}: {table.ref(i)}: column {negatives.column!r} has {len(items)} item(s), "
                        f"tasks.{name}.negatives.count is {negatives.count}; set negatives.short_rows to \"drop\" "
                        f"to skip such rows")
    bad = codes != 0
    if bad.any() and task.bad_rows == "error":
        raise DataError(_report(table, task, name, codes, reasons))
    kept = np.flatnonzero(~bad & ~short).astype(np.int64)
    counts = {reasons.name(c): int(k) for c, k in zip(*np.unique(codes[bad], return_counts=True))}
    if len(kept) == 0:
        why = (f"every row has fewer than {negatives.count} items in column {negatives.column!r}"
               if short.any() and not bad.any() else "no row is left after dropping the bad ones"
               if not short.any() else "every row is short of negatives or bad")
        raise DataError(f"task {name!r}: {table.source}: {why}, so none is left"
                        + (f" ({_counts(counts)})" if counts else ""))
    checked = Checked(kept, None if scores is None else scores[kept], int(short.sum()), counts)
    if has_score and LOSSES[task.loss].needs_varied_scores and (checked.scores == checked.scores[0]).all():
        raw = table.value(task.columns[2], int(kept[0]))
        raise DataError(f"task {name!r} ({table.source}): every gold score in column {task.columns[2]!r} is "
                        f"{raw!r}; {task.loss!r} learns only from pairs whose scores differ, so it would train "
                        f"nothing")
    return checked


def _check_scores(array, task: TaskConfig, code: np.ndarray, out: np.ndarray, mark) -> None:
    """Scores of one record batch → `out` (n,) float32 (divided by score_scale); bad ones marked."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = task.columns[2]
    t = array.type
    numeric = pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
    if not numeric:  # text, bool, lists, all-null: none is a number
        mark(np.ones(len(array), dtype=bool), f"column {column!r}: not a finite number", "number", column)
        return
    values = to_numpy(pc.cast(array, pa.float64()), np.nan)  # (n,) null → NaN; decimals too
    null = ~to_numpy(array.is_valid())
    mark(null, f"column {column!r}: not a finite number", "number", column)
    mark(~np.isfinite(values), f"column {column!r}: not a finite number", "finite", column)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, with the row
        scaled = (values / task.score_scale).astype(np.float32)  # (n,)
    mark(~np.isfinite(scaled), f"column {column!r}: does not fit in float32 after score_scale", "float32", column)
    if task.loss == "cosine":  # CosineSimilarityLoss regresses cos(e1, e2) onto the score: it must be in [0, 1]
        with np.errstate(invalid="ignore"):
            mark((scaled < 0) | (scaled > 1), f"column {column!r}: outside [0, 1] after score_scale", "range",
                 column)
    out[:] = scaled


def _counts(counts: dict[str, int]) -> str:
    return "; ".join(f"{k} × {reason}" for reason, k in sorted(counts.items(), key=lambda kv: -kv[1]))


def _report(table: Table, task: TaskConfig, name: str, codes: np.ndarray, reasons: _Reasons) -> str:
    """One error for all the bad rows: how many, by reason, and the first few in full."""
    bad = np.flatnonzero(codes)
    first = [f"{table.ref(int(i))}: {_explain(table, task, name, int(i), reasons.explain[codes[i]])}"
             for i in bad[:FIRST_FEW]]
    hint = f"set tasks.{name}.bad_rows to \"drop\" to train without them"
    if len(bad) == 1:  # as before bad rows were counted: a line the reader could not use is named by its file first
        stored = reasons.explain[codes[bad[0]]][0] == "stored"
        return ("" if stored else f"task {name!r}: ") + f"{first[0]} ({hint})"
    counts = {reasons.name(c): int(k) for c, k in zip(*np.unique(codes[bad], return_counts=True))}
    return (f"task {name!r}: {len(bad)} bad rows in {table.source} ({_counts(counts)}); the first "
            f"{len(first)}: " + "; ".join(first) + f" ({hint})")


def _explain(table: Table, task: TaskConfig, name: str, row: int, how: tuple) -> str:
    """The full message for one bad row, with the value that is wrong."""
    kind, *args = how
    if kind == "stored":
        return table.value(PROBLEM, row)
    if kind == "list":
        return (f"column {args[0]!r}: expected a list of strings (tasks.{name}.negatives), found "
                f"{short(table.value(args[0], row))}")
    if kind == "text":
        shown, column, item = args
        value = table.value(column, row)
        value = value[item] if item is not None and isinstance(value, list) and len(value) > item else (
            value if item is None else None)
        return f"column {shown!r}: expected a non-empty string, found {short(value)}"
    if kind == "equal":
        shown, other, (column, item) = args
        value = table.value(column, row)
        value = (value[item] if item is not None else value).strip()
        return (f"column {shown!r} equals column {other!r} ({short(value)}); a hard negative must differ from the "
                f"query and its positive")
    raw = table.value(args[0], row)
    if kind == "number":
        return f"column {args[0]!r}: expected a number, found {short(raw)}"
    if kind == "finite":
        return f"column {args[0]!r}: expected a finite number, found {short(raw)}"
    if kind == "float32":
        return f"column {args[0]!r}: {raw!r} / score_scale {task.score_scale} does not fit in float32"
    return (f"column {args[0]!r}: the 'cosine' loss needs scores in [0, 1] after dividing by score_scale "
            f"({task.score_scale}), found {raw!r}; set tasks.{name}.score_scale (stsb_multi_mt: 5.0)")
