"""The tables of evaluation results, as markdown: a set's metrics per dim (the model card's evaluation table), several
models side by side with their relative change (the card's "Comparison with V4"), and storage vs quality (retrieval
at every dim × vector precision or index, with the bytes each vector costs).

`results` is {dim: {set name: {metric: value}}} (`evaluation.evaluate` returns it; the dims may be strings, as in an
`evaluate.py --json` file); `by_level` is {level: results} with a level a precision or an index of
bertino/eval_names.py.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from .eval_names import INDEXES, IR_METRICS, bytes_per_vector

METRIC_LABELS = {  # how tables print the metric names (the model card's spelling)
    "map": "MAP", "ndcg": "NDCG", "mrr": "MRR", "accuracy": "Accuracy", "recall": "Recall",
    "precision": "Precision", "spearman_cosine": "Spearman Cosine", "pearson_cosine": "Pearson Cosine",
    "recall_vs_exact": "Recall vs exact",
}


def format_table(results: dict) -> str:
    """Markdown: per set, one row per metric, one column per dim ("| metric | 768d | 128d |"), 4 decimals."""
    dims = list(results)
    if not dims:
        return ""
    blocks = []
    for name in results[dims[0]]:
        lines = [f"### {name}", "", "| metric | " + " | ".join(f"{d}d" for d in dims) + " |",
                 "|---" + "|---:" * len(dims) + "|"]
        for metric in results[dims[0]][name]:
            values = " | ".join(_fmt(results[d].get(name, {}).get(metric)) for d in dims)
            lines.append(f"| {metric_label(metric)} | {values} |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def relative_change(value: float, reference: float) -> float | None:
    """100 · (value − reference) / reference: the card's "+0.48%"; None where it is undefined (0 or NaN)."""
    if reference == 0 or math.isnan(reference) or math.isnan(value):
        return None
    return 100.0 * (value - reference) / reference


def relative_changes(per_model: dict) -> dict:
    """{model: {dim: {set: {metric: percent}}}} for every model but the first, against the first, dim by dim."""
    first = next(iter(per_model.values()))
    return {model: {d: {name: {m: relative_change(v, first[d][name][m]) for m, v in metrics.items()
                               if d in first and m in first[d].get(name, {})}
                        for name, metrics in sets.items()} for d, sets in results.items()}
            for model, results in list(per_model.items())[1:]}


def comparison_table(per_model: dict, changes: dict) -> str:
    """Markdown, per set: one row per metric; columns (model, dim), dims first as in the card's comparison."""
    models = list(per_model)
    dims = [d for d in per_model[models[0]] if all(d in r for r in per_model.values())]
    columns = [(m, d) for d in dims for m in models]
    blocks = []
    for name, metrics in per_model[models[0]][dims[0]].items():
        lines = [f"### {name}", "", "| metric | " + " | ".join(f"{m} ({d}d)" for m, d in columns) + " |",
                 "|---" + "|---:" * len(columns) + "|"]
        for metric in metrics:
            cells = []
            for m, d in columns:
                value = per_model[m][d].get(name, {}).get(metric)
                cell = "–" if value is None or math.isnan(value) else f"{value:.4f}"
                change = changes.get(m, {}).get(d, {}).get(name, {}).get(metric)
                cells.append(cell + (f" ({change:+.2f}%)" if change is not None else ""))
            lines.append(f"| {metric_label(metric)} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def metric_label(metric: str) -> str:
    """"map@100" → "MAP@100", "spearman_cosine" → "Spearman Cosine" (unknown names pass through)."""
    name, at, k = metric.partition("@")
    return METRIC_LABELS.get(name, name) + at + k


# ================================================================================================ storage vs quality
def stored_bytes(level: str, d: int, values: Mapping) -> float:
    """Bytes one vector costs at `level`: a precision's formula (eval_names.bytes_per_vector), or what a FAISS index
    measured it holds (its `bytes_per_vector` figure: the codes plus, for HNSW, the graph)."""
    return values["bytes_per_vector"] if level in INDEXES else bytes_per_vector(level, d)


def format_precision_table(by_level: Mapping[str, Mapping], full_dim: int, metrics: Sequence[str] = IR_METRICS,
                           rescore: int | None = None, int8_range: str = "min/max") -> str:
    """Markdown, per IR set: one row per (dim, level) with bytes/vector and the storage relative to the full
    float32 vector (4·full_dim bytes), one column per metric, 4 decimals. `int8_range` names the int8
    calibration statistic for the note under the table."""
    levels = list(by_level)
    dims = list(dict.fromkeys(int(d) for lv in levels for d in by_level[lv]))
    names = list(dict.fromkeys(name for lv in levels for sets in by_level[lv].values() for name in sets))
    blocks = []
    for name in names:
        lines = [f"### {name}: storage vs quality", "",
                 "| dim | precision | bytes/vector | storage | " + " | ".join(map(metric_label, metrics)) + " |",
                 "|---:|---|---:|---:|" + "---:|" * len(metrics)]
        for d in dims:
            for level in levels:
                values = _lookup(by_level, level, d).get(name)
                if values is None:
                    continue
                size = stored_bytes(level, d, values)
                cells = " | ".join(_fmt(values.get(m)) for m in metrics)
                lines.append(f"| {d} | {level} | {size:.0f} | {size / (4 * full_dim):.1%} | {cells} |")
        blocks.append("\n".join(lines))
    note = (f"storage: bytes/vector over the full {full_dim}-dim float32 vector's {4 * full_dim} bytes; "
            f"int8: codes over the corpus' per-dimension {int8_range}, the float query scored against the decoded "
            "codes; binary: sign bits, Hamming distance"
            + (f"; +rescore: its top {rescore} re-ranked by the float query (bits: against the ±1 bits, "
               f"int8: against the decoded int8 codes, which are stored too)" if rescore else "")
            + ("; FAISS indexes: their own bytes per vector (codes, and the graph for HNSW)"
               if any(lv in INDEXES for lv in levels) else "") + ".")
    return "\n\n".join(blocks) + f"\n\n{note}\n" if blocks else ""


INDEX_COLUMNS = (("bytes_per_vector", "bytes/vector", "{:.0f}"), ("build_seconds", "build s", "{:.3f}"),
                 ("query_ms", "query ms (1 at a time)", "{:.3f}"),
                 ("query_ms_batched", "query ms (batched)", "{:.3f}"),
                 ("recall_vs_exact@10", "Recall vs exact@10", "{:.4f}"), ("ndcg@10", "NDCG@10", "{:.4f}"))


def format_index_table(by_level: Mapping[str, Mapping]) -> str:
    """Markdown, per IR set: one row per (dim, FAISS index) with what the index costs — bytes per vector as it
    stores them, build seconds, milliseconds per query (one query per search call, and all queries in one call) —
    and what it finds: recall@10 against the exact float32 search, NDCG@10."""
    levels = [lv for lv in by_level if lv in INDEXES]
    dims = list(dict.fromkeys(int(d) for lv in levels for d in by_level[lv]))
    names = list(dict.fromkeys(name for lv in levels for sets in by_level[lv].values() for name in sets))
    blocks = []
    for name in names:
        lines = [f"### {name}: vector indexes (FAISS)", "",
                 "| dim | index | " + " | ".join(label for _, label, _ in INDEX_COLUMNS) + " |",
                 "|---:|---|" + "---:|" * len(INDEX_COLUMNS)]
        for d in dims:
            for level in levels:
                values = _lookup(by_level, level, d).get(name)
                if values is not None:
                    cells = " | ".join(_fmt(values.get(key), form) for key, _, form in INDEX_COLUMNS)
                    lines.append(f"| {d} | {level} | {cells} |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n" if blocks else ""


def _lookup(by_level: Mapping, level: str, d: int) -> Mapping:
    sets = by_level[level]
    return sets.get(d, sets.get(str(d), {}))  # int dims, or the strings of a --json file


def _fmt(value, form: str = "{:.4f}") -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else form.format(value)
