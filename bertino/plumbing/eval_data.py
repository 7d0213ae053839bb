"""Evaluation files: the JSONL (optionally gzipped) files that `evaluation.evaluate_sets` scores a model on.

Shapes (list lengths): Q distinct queries, N corpus texts, P STS pairs.

Two formats, one JSON object per line (blank lines are skipped; the name must end in .jsonl or .jsonl.gz):

    IR   {"query": str, "positive": str | [str, ...], "negative_1": str, ...}   → IRSet
    STS  {"sentence1": str, "sentence2": str, "score": number}                 → STSSet

Information retrieval: the corpus is every distinct positive and negative, in order of first appearance. A query on
several rows gets all their positives; negatives (`negative` / `negative_*` keys) join the corpus but are relevant
to no query (unless they are some query's positive). Semantic similarity: gold scores on any scale (the
correlations are scale-invariant), at least 2 rows with different scores.

A set is named after its file's stem ("dev.jsonl.gz" → "dev"), so the names of one run's files must differ.
Evaluation sets may also be datasets (`EvalDataset`: a hub id such as stsb_multi_mt `it`/`dev`, parquet, a
save_to_disk folder), read and checked by the training data's own code (data.py), and a task's hold-out
(`tasks.NAME.holdout`) is an IR or STS set of its own, `NAME_holdout`.
Every problem is a DataError that names the file and, where they apply, the line ("FILE:LINE") and the key.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from ..errors import DataError
from ..eval_sets import IRSet, STSSet
from .config import EvalDataset, eval_task
from .data import TaskData, load_task
from .files import read_jsonl


class _IRBuilder:
    """Collects (query, positives, negatives) rows into an IRSet: corpus ids in order of first appearance, a query
    on several rows gets all their positives, negatives are relevant to no query (unless some query's positive)."""

    def __init__(self):
        self.corpus_ids: dict[str, int] = {}  # text → corpus id
        self.query_ids: dict[str, int] = {}
        self.relevant: list[set[int]] = []

    def add(self, query: str, positives: Sequence[str], negatives: Sequence[str]) -> None:
        for text in (*positives, *negatives):
            self.corpus_ids.setdefault(text, len(self.corpus_ids))
        if query not in self.query_ids:
            self.query_ids[query] = len(self.query_ids)
            self.relevant.append(set())
        self.relevant[self.query_ids[query]].update(self.corpus_ids[t] for t in positives)

    def build(self, name: str) -> IRSet:
        return IRSet(name, list(self.query_ids), list(self.corpus_ids), self.relevant)


def load_ir_file(path: str | os.PathLike) -> IRSet:
    """Read JSONL rows {"query": str, "positive": str | [str, ...], "negative_1": str, ...} into an IRSet.

    A query on several rows gets all their positives; negatives (`negative` / `negative_*` keys) join the corpus
    but are relevant to no query (unless they are some query's positive).
    """
    builder = _IRBuilder()
    for where, row in read_rows(path):
        query = text_field(row, "query", where)
        positives = _texts(row, "positive", where)
        negative_keys = [key for key in row if key == "negative" or key.startswith("negative_")]
        builder.add(query, positives, [text for key in negative_keys for text in _texts(row, key, where)])
    return builder.build(_set_name(path))


def ir_set_from_rows(name: str, data: TaskData) -> IRSet:
    """A retrieval task's checked rows (anchor, positive, negatives...) as an IRSet: the card's hold-out
    evaluation, queries against a corpus of the rows' positives and hard negatives."""
    builder = _IRBuilder()
    for query, positive, *negatives in data.text_rows():
        builder.add(query, [positive], negatives)
    return builder.build(name)


def sts_set_from_rows(name: str, data: TaskData, origin: str | None = None) -> STSSet:
    """A pair+score task's checked rows as an STSSet (the scores already divided by score_scale). `origin` names
    where the rows come from in an error (a task's hold-out: `tasks.NAME.holdout`)."""
    if len(data) < 2 or len(set(data.scores.tolist())) < 2:
        found = f"found {len(data)} row(s), {len(set(data.scores.tolist()))} distinct score(s)"
        if origin is not None:
            raise DataError(f"{origin}: the hold-out of task {data.name!r} ({data.source}) is evaluated as an STS "
                            f"set, which needs at least 2 rows with different scores ({found}); raise {origin} "
                            f"or set it to 0")
        raise DataError(f"{data.source}: an STS set needs at least 2 rows with different scores ({found})")
    s1, s2 = (list(column) for column in zip(*data.text_rows()))
    return STSSet(name, s1, s2, [float(x) for x in data.scores])


def load_sts_file(path: str | os.PathLike) -> STSSet:
    """Read JSONL rows {"sentence1": str, "sentence2": str, "score": number} into an STSSet."""
    s1, s2, scores = [], [], []
    for where, row in read_rows(path):
        s1.append(text_field(row, "sentence1", where))
        s2.append(text_field(row, "sentence2", where))
        score = row.get("score")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise DataError(f"{where}: key 'score' must be a finite number, found {score!r}"
                            if "score" in row else f"{where}: missing key 'score' (found keys {sorted(row)})")
        scores.append(float(score))
    if len(scores) < 2 or len(set(scores)) < 2:
        raise DataError(f"{path}: an STS file needs at least 2 rows with different scores "
                        f"(found {len(scores)} rows, {len(set(scores))} distinct scores)")
    return STSSet(_set_name(path), s1, s2, scores)


def load_eval_sets(
    ir_files: Sequence[str | os.PathLike | EvalDataset] = (), sts_files: Sequence[str | os.PathLike | EvalDataset] = (),
    holdouts: Mapping[str, TaskData] | None = None,
) -> tuple[list[IRSet], list[STSSet]]:
    """Load every set before any encoding, so a bad file fails in seconds; set names must be unique.

    An entry is a JSONL file or an `EvalDataset` (a hub id, parquet, a save_to_disk folder: read by the training
    data's readers). `holdouts` (task → held-out rows) adds one set per task, named `TASK_holdout`."""
    ir_sets = [_load_entry(p, "mnrl") for p in ir_files]
    sts_sets = [_load_entry(p, "cosent") for p in sts_files]
    for task, data in (holdouts or {}).items():
        if data.scores is None:
            ir_sets.append(ir_set_from_rows(f"{task}_holdout", data))
        else:
            sts_sets.append(sts_set_from_rows(f"{task}_holdout", data, origin=f"tasks.{task}.holdout"))
    names = [s.name for s in ir_sets + sts_sets]
    files = [str(getattr(p, "dataset", p)) for p in list(ir_files) + list(sts_files)] + [
        f"tasks.{t}.holdout" for t in holdouts or {}]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise DataError(f"two eval sets share the set name {name!r} (a file's stem, or an eval dataset's name): "
                            f"{files[names.index(name)]} and {files[i]}; rename one")
    return ir_sets, sts_sets


def _load_entry(entry: str | os.PathLike | EvalDataset, loss: str) -> IRSet | STSSet:
    if not isinstance(entry, EvalDataset):
        return load_ir_file(entry) if loss == "mnrl" else load_sts_file(entry)
    name = entry.name or f"{entry.dataset.rstrip('/').split('/')[-1]}_{entry.split}"
    data = load_task(eval_task(entry, loss), name)
    return ir_set_from_rows(name, data) if loss == "mnrl" else sts_set_from_rows(name, data)


def _set_name(path: str | os.PathLike) -> str:
    name = Path(path).name
    for suffix in (".gz", ".jsonl"):
        name = name.removesuffix(suffix)
    return name


def read_rows(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """Yield ("FILE:LINE", row) for each non-blank line; DataError on a misnamed or empty file or a bad line."""
    path = Path(path)
    if not (path.name.endswith(".jsonl") or path.name.endswith(".jsonl.gz")):
        raise DataError(f"{path}: expected a .jsonl or .jsonl.gz eval file")
    n_rows = 0
    for line_no, row in read_jsonl(path):
        n_rows += 1
        yield f"{path}:{line_no}", row
    if n_rows == 0:
        raise DataError(f"{path}: the file has no rows")


def text_field(row: dict, key: str, where: str) -> str:
    if key not in row:
        raise DataError(f"{where}: missing key {key!r} (found keys {sorted(row)})")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: key {key!r} must be a string, found {type(value).__name__} ({value!r:.60})")
    if not value.strip():  # as training data: an empty text would be a query or document of nothing
        raise DataError(f"{where}: key {key!r} must be a non-empty string, found {value!r}")
    return value


def _texts(row: dict, key: str, where: str) -> list[str]:
    """A string, or a non-empty list of strings (several positives for one query)."""
    value = row.get(key)
    if isinstance(value, list):
        if not value or not all(isinstance(t, str) and t.strip() for t in value):
            raise DataError(f"{where}: key {key!r} must be a non-empty string or a non-empty list of non-empty "
                            f"strings, found {value!r:.60}")
        return value
    return [text_field(row, key, where)]
