"""What an evaluation set is: an IR set (queries, a corpus, each query's relevant corpus ids) or an STS set (pairs of
sentences with gold scores). plumbing/eval_data.py reads them from files, datasets and hold-outs;
bertino/evaluation.py scores a model on them.

Shapes (list lengths): Q distinct queries, N corpus texts, P STS pairs.
"""

from __future__ import annotations

from typing import NamedTuple


class IRSet(NamedTuple):
    name: str  # the file's stem
    queries: list[str]  # (Q,) distinct, in order of first appearance
    corpus: list[str]  # (N,) every distinct positive and negative, in order of first appearance
    relevant: list[set[int]]  # (Q,) corpus ids of each query's positives


class STSSet(NamedTuple):
    name: str
    sentences1: list[str]  # (P,)
    sentences2: list[str]  # (P,)
    scores: list[float]  # (P,) gold scores, any scale (the correlations are scale-invariant)
