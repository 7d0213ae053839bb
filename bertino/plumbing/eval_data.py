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
Every problem is a DataError that names the file and, where they apply, the line ("FILE:LINE") and the key.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterator, Sequence

from ..errors import DataError
from ..evaluation import IRSet, STSSet
from .files import read_jsonl


def load_ir_file(path: str | os.PathLike) -> IRSet:
    """Read JSONL rows {"query": str, "positive": str | [str, ...], "negative_1": str, ...} into an IRSet.

    A query on several rows gets all their positives; negatives (`negative` / `negative_*` keys) join the corpus
    but are relevant to no query (unless they are some query's positive).
    """
    corpus_ids: dict[str, int] = {}  # text → corpus id, in order of first appearance
    query_ids: dict[str, int] = {}
    relevant: list[set[int]] = []
    for where, row in read_rows(path):
        query = text_field(row, "query", where)
        positives = _texts(row, "positive", where)
        negative_keys = [key for key in row if key == "negative" or key.startswith("negative_")]
        negatives = [text for key in negative_keys for text in _texts(row, key, where)]
        for text in positives + negatives:
            corpus_ids.setdefault(text, len(corpus_ids))
        if query not in query_ids:
            query_ids[query] = len(query_ids)
            relevant.append(set())
        relevant[query_ids[query]].update(corpus_ids[t] for t in positives)
    return IRSet(_set_name(path), list(query_ids), list(corpus_ids), relevant)


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
    ir_files: Sequence[str | os.PathLike] = (), sts_files: Sequence[str | os.PathLike] = ()
) -> tuple[list[IRSet], list[STSSet]]:
    """Load every file before any encoding, so a bad file fails in seconds; set names must be unique."""
    ir_sets, sts_sets = [load_ir_file(p) for p in ir_files], [load_sts_file(p) for p in sts_files]
    names = [s.name for s in ir_sets + sts_sets]
    files = [str(p) for p in list(ir_files) + list(sts_files)]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise DataError(f"two eval files share the set name {name!r} (the file's stem): "
                            f"{files[names.index(name)]} and {files[i]}; rename one")
    return ir_sets, sts_sets


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
