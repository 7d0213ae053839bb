"""Evaluation: a model scored on eval sets at each Matryoshka dim, every distinct text encoded once.

Shapes: Q queries, N corpus texts, D the model's embedding dim, d a truncated (Matryoshka) dim, P STS pairs.

    evaluate(encoder, ir_files, sts_files, dims)    eval files → {dim: {set name: {metric: value}}}
      = plumbing/eval_data.py's load_eval_sets      the files → IRSet / STSSet (bertino/eval_sets.py)
      + evaluate_sets = embed_sets                  every distinct text of every set encoded once, at full dim D
                      + score_sets                  each dim d: the first d coordinates, scored by bertino/metrics.py

Dim d uses the first d coordinates, re-normalised (cosine does that), so one encoding serves every dim.
bertino/quantization.py scores the same embeddings with int8 and binary vectors, bertino/vector_indexes.py through
FAISS indexes; bertino/eval_tables.py prints the results.

The metric engine (`ir_metrics`, `ranking_metrics`, `top_k`, `sts_metrics`, ...) moved to bertino/metrics.py and the
tables (`format_table`, `comparison_table`, `relative_changes`, `metric_label`) to bertino/eval_tables.py when
this module was split along its jobs; they stay importable from here.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from .errors import ConfigError, DataError
from .eval_sets import IRSet, STSSet
from .eval_tables import (METRIC_LABELS, comparison_table, format_table, metric_label,  # noqa: F401 (moved)
                          relative_change, relative_changes)
from .metrics import (IR_METRICS, MATMUL_ROWS, SCORE_BLOCK_ELEMENTS, STS_METRICS,  # noqa: F401 (moved)
                      average_ranks, check_ir_embeddings, ir_metrics, ranking_metrics, sort_by_score_then_id,
                      sts_metrics, top_k, top_k_cosine)
from .plumbing.eval_data import load_eval_sets


def evaluate(
    encoder,
    ir_files: Sequence[str | os.PathLike] = (),
    sts_files: Sequence[str | os.PathLike] = (),
    dims: Sequence[int] | None = None,
    batch_size: int = 32,
    show_progress_bar: bool = True,
) -> dict[int, dict[str, dict[str, float]]]:
    """Load the eval files and score `encoder` on each at each dim: {dim: {set name: {metric: value}}}."""
    ir_sets, sts_sets = load_eval_sets(ir_files, sts_files)
    return evaluate_sets(encoder, ir_sets, sts_sets, dims, batch_size=batch_size, show_progress_bar=show_progress_bar)


def evaluate_sets(
    encoder,
    ir_sets: Sequence[IRSet],
    sts_sets: Sequence[STSSet],
    dims: Sequence[int] | None = None,
    *,
    batch_size: int = 32,
    show_progress_bar: bool = True,
) -> dict[int, dict[str, dict[str, float]]]:
    """`evaluate` for already-loaded sets (the training loop loads them once and evaluates many times)."""
    dims = check_dims(dims, encoder.dim)
    embedded = embed_sets(encoder, ir_sets, sts_sets, batch_size=batch_size, show_progress_bar=show_progress_bar)
    return score_sets(embedded, ir_sets, sts_sets, dims)


def embed_sets(
    encoder, ir_sets: Sequence[IRSet], sts_sets: Sequence[STSSet], *, batch_size: int = 32,
    show_progress_bar: bool = True,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every distinct text of every set encoded once at full dim D: {IR set: (queries (Q, D), corpus (N, D)),
    STS set: (sentences1 (P, D), sentences2 (P, D))}, by set name."""
    if not ir_sets and not sts_sets:
        raise DataError("nothing to evaluate: give at least one IR or STS eval file")
    index: dict[str, int] = {}  # text → row of `emb`
    for s in ir_sets:
        for text in s.queries + s.corpus:
            index.setdefault(text, len(index))
    for s in sts_sets:
        for text in s.sentences1 + s.sentences2:
            index.setdefault(text, len(index))

    emb = torch.as_tensor(encoder.encode(list(index), batch_size=batch_size, show_progress_bar=show_progress_bar))
    if emb.shape != (len(index), encoder.dim):  # (T, D), T distinct texts
        raise DataError(f"encoder.encode returned shape {tuple(emb.shape)}, expected {(len(index), encoder.dim)}")

    def rows(texts: list[str]) -> torch.Tensor:
        return emb[torch.tensor([index[t] for t in texts], dtype=torch.int64)]  # (len(texts), D)

    embedded = {s.name: (rows(s.queries), rows(s.corpus)) for s in ir_sets}
    embedded.update({s.name: (rows(s.sentences1), rows(s.sentences2)) for s in sts_sets})
    return embedded


def score_sets(
    embedded: dict[str, tuple[torch.Tensor, torch.Tensor]], ir_sets: Sequence[IRSet], sts_sets: Sequence[STSSet],
    dims: Sequence[int],
) -> dict[int, dict[str, dict[str, float]]]:
    """The metrics of `embed_sets`' embeddings at each dim d: the first d coordinates (cosine re-normalises)."""
    results: dict[int, dict[str, dict[str, float]]] = {d: {} for d in dims}
    for s in ir_sets:
        queries, corpus = embedded[s.name]  # (Q, D), (N, D)
        for d in dims:
            results[d][s.name] = ir_metrics(queries[:, :d], corpus[:, :d], s.relevant)
    for s in sts_sets:
        a, b = embedded[s.name]  # (P, D) each
        for d in dims:
            results[d][s.name] = sts_metrics(a[:, :d], b[:, :d], s.scores)
    return results


def check_dims(dims: Sequence[int] | None, full_dim: int) -> list[int]:
    """Validate evaluation dims against the model's dim: None means [full_dim]; each in 1..full_dim, no repeats."""
    if dims is None:
        return [full_dim]
    dims = list(dims)
    if not dims:
        raise ConfigError("dims is empty: give at least one embedding dim")
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= full_dim:
            raise ConfigError(f"dims {dims}: {d!r} is not an embedding dim of this model (expected 1..{full_dim})")
    if len(set(dims)) != len(dims):
        raise ConfigError(f"dims {dims} lists a dim twice")
    return dims


def storage_vs_quality(
    embedded: dict[str, tuple[torch.Tensor, torch.Tensor]], ir_sets: Sequence[IRSet], dims: Sequence[int],
    precisions: Sequence[str], *, rescore: int | None = None, int8_quantile: float = 0.0,
    indexes: Sequence[str] = (), float_results: dict | None = None,
) -> dict[str, dict[int, dict[str, dict[str, float]]]]:
    """{level: {dim: {IR set name: {metric: value}}}} for the model card's storage-vs-quality table and
    `evaluate.py --precision/--index`: each precision (and the rescored rows) by bertino/quantization.py's exact
    search, then each FAISS index by bertino/vector_indexes.py (its figures beside the metrics)."""
    from .quantization import evaluate_precisions
    from .vector_indexes import evaluate_indexes

    by_level = evaluate_precisions(embedded, ir_sets, dims, precisions, rescore, float_results=float_results,
                                   int8_quantile=int8_quantile)
    by_level.update(evaluate_indexes(embedded, ir_sets, dims, indexes))
    return by_level
