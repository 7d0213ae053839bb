"""The names evaluation accepts — metrics, vector precisions, vector indexes — and their checks.

The config schema (plumbing/config.py), the command lines and the modules that compute the numbers all take their
names from here, so the config never imports the code that computes them: this module imports nothing of
bertino's but its errors.

    metrics      IR_METRICS (bertino/metrics.py computes them), STS_METRICS
    precisions   PRECISIONS: how vectors are stored and scored in the exact search (bertino/quantization.py);
                 RESCORED: the two rows `--rescore K` adds after "binary"; `bytes_per_vector` of each
    indexes      INDEXES: the FAISS indexes of `evaluate.py --index` / `eval.index` (bertino/vector_indexes.py)
"""

from __future__ import annotations

import math
from typing import Sequence

from .errors import ConfigError

IR_METRICS = ("map@100", "ndcg@10", "mrr@10", "accuracy@1", "accuracy@3", "accuracy@5", "accuracy@10",
              "recall@10", "precision@10")
STS_METRICS = ("spearman_cosine", "pearson_cosine")

PRECISIONS = ("float32", "int8", "binary")  # `evaluate.py --precision`, `eval.precision`
RESCORED = ("binary+rescore-bits", "binary+rescore-int8")  # added after "binary" by `--rescore K` / eval.rescore

INDEXES = ("flat", "sq8", "binary-flat", "hnsw", "hnsw-sq8")  # `evaluate.py --index`, `eval.index`


def check_precisions(precisions: Sequence[str], rescore: int | None, key: str = "--precision") -> None:
    """Names from PRECISIONS, each once; a rescore depth K ≥ 1 only together with "binary"."""
    precisions = list(precisions)
    unknown = [p for p in precisions if p not in PRECISIONS]
    if not precisions or unknown or len(set(precisions)) != len(precisions):
        raise ConfigError(f"{key}: expected distinct names from {', '.join(PRECISIONS)}, found "
                          f"{','.join(precisions) or 'nothing'}")
    if rescore is not None:
        where = "--rescore" if key == "--precision" else "eval.rescore"
        if isinstance(rescore, bool) or not isinstance(rescore, int) or rescore < 1:
            raise ConfigError(f"{where}: expected a number of candidates >= 1, found {rescore!r}")
        if "binary" not in precisions:
            raise ConfigError(f"{where} {rescore}: rescoring re-ranks the binary search's candidates; add binary "
                              f"to {key} (found {','.join(precisions)})")


def check_indexes(indexes: Sequence[str], key: str = "--index") -> None:
    """Names from INDEXES, each once (an empty list asks for none)."""
    indexes = list(indexes)
    unknown = [i for i in indexes if i not in INDEXES]
    if unknown or len(set(indexes)) != len(indexes):
        raise ConfigError(f"{key}: expected distinct names from {', '.join(INDEXES)}, found "
                          f"{','.join(indexes) or 'nothing'}")


def bytes_per_vector(level: str, d: int) -> int:
    """What one stored vector of `d` dims costs at a precision level (rescore-int8: the bits and the int8 codes)."""
    bits = math.ceil(d / 8)
    return {"float32": 4 * d, "int8": d, "binary": bits, "binary+rescore-bits": bits,
            "binary+rescore-int8": bits + d}[level]
