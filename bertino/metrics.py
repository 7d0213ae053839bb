"""The metric engine: information-retrieval (IR) metrics of an exact ranking, the exact chunked top k they are defined
on with its tie rule, and semantic-textual-similarity (STS) correlations.

Shapes: Q queries, N corpus texts, D embedding dim, C corpus chunk, R query chunk, K the longest cut-off (100 for
MAP@100, at most N), P STS pairs.

Information retrieval. Each query q has a set of relevant corpus ids rel(q). The corpus is ranked by cosine similarity
cos(q, c) = q·c / (|q| |c|), ties broken by corpus id (smaller first), so the ranking r_1, r_2, ... is a total order
and no result depends on how the corpus is chunked. With hit_i = [r_i ∈ rel(q)] (i = 1-based rank):

    Accuracy@k  = [Σ_{i≤k} hit_i > 0]                       (a relevant text in the top k)
    Precision@k = Σ_{i≤k} hit_i / k
    Recall@k    = Σ_{i≤k} hit_i / |rel|
    MRR@k       = 1 / min{i ≤ k : hit_i}                     (0 when no hit in the top k)
    NDCG@k      = DCG@k / IDCG@k,  DCG@k = Σ_{i≤k} hit_i / log2(i + 1),  IDCG@k = Σ_{i≤min(|rel|,k)} 1 / log2(i + 1)
    MAP@k       = Σ_{i≤k} hit_i · Precision@i / min(k, |rel|)

each averaged over queries (Manning, Raghavan & Schütze, "Introduction to Information Retrieval", ch. 8; the same
definitions as sentence-transformers' InformationRetrievalEvaluator). The scores are exact: only the top K of each
query is kept, and a corpus chunk's top K merged with the running top K gives the top K of the union.
`ranking_metrics` scores any exact ranking: bertino/quantization.py ranks by int8 and binary scores, and
bertino/vector_indexes.py by what a FAISS index returns, through the same `top_k` and tie rule.

Semantic similarity. For pairs (a_j, b_j) with gold score g_j, s_j = cos(a_j, b_j):

    Pearson  = Σ (s_j − s̄)(g_j − ḡ) / sqrt(Σ (s_j − s̄)² · Σ (g_j − ḡ)²)
    Spearman = Pearson(rank(s), rank(g))                     (tied values share their average rank)
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DataError
from .eval_names import IR_METRICS, STS_METRICS  # noqa: F401 (the names these functions return, importable here)

# Scores per (query chunk × corpus chunk) block: R·C ≤ this, so a block's temporaries stay ~100 MB whatever Q and N.
SCORE_BLOCK_ELEMENTS = 1 << 22
MATMUL_ROWS = 1024  # corpus rows per float64 matmul (a 1024 × 768 float64 slice is 6 MB)


# ================================================================================================ IR metrics
def ir_metrics(
    query_emb: torch.Tensor,
    corpus_emb: torch.Tensor,
    relevant: Sequence[set[int]],
    *,
    chunk_size: int = 50_000,
    **cutoffs: Sequence[int],
) -> dict[str, float]:
    """Retrieval metrics of query_emb (Q, D) against corpus_emb (N, D) by cosine similarity.

    `relevant[q]` is the set of corpus row ids relevant to query q (non-empty). The corpus is scored `chunk_size`
    rows at a time against a query chunk of R = SCORE_BLOCK_ELEMENTS // chunk_size queries, so the working memory
    (~100 MB) does not grow with Q or N: the full (Q, N) score matrix is never built. `cutoffs`: `ranking_metrics`'.
    Returns {"map@100": ..., "ndcg@10": ..., ...} (the order of IR_METRICS), each the mean over queries.
    """
    query_emb, corpus_emb = torch.as_tensor(query_emb), torch.as_tensor(corpus_emb)
    check_ir_embeddings(query_emb, corpus_emb)
    return ranking_metrics(lambda q0, q1, k: top_k_cosine(query_emb[q0:q1], corpus_emb, k, chunk_size)[1],
                           query_emb.shape[0], corpus_emb.shape[0], relevant, chunk_size=chunk_size, **cutoffs)


def ranking_metrics(
    top_ids: Callable[[int, int, int], torch.Tensor],
    n_queries: int,
    n_corpus: int,
    relevant: Sequence[set[int]],
    *,
    chunk_size: int = 50_000,
    accuracy_at_k: Sequence[int] = (1, 3, 5, 10),
    precision_recall_at_k: Sequence[int] = (10,),
    mrr_at_k: Sequence[int] = (10,),
    ndcg_at_k: Sequence[int] = (10,),
    map_at_k: Sequence[int] = (100,),
) -> dict[str, float]:
    """The IR metrics of any exact ranking: `top_ids(q0, q1, K)` gives the ids (q1 − q0, K) of the top K corpus
    texts of queries q0..q1−1, best first (`ir_metrics` ranks by cosine, bertino/quantization.py by int8 and
    binary scores). Queries go R = SCORE_BLOCK_ELEMENTS // min(chunk_size, N) at a time."""
    Q, N = n_queries, n_corpus
    _check_relevant(relevant, Q, N, chunk_size)
    cutoffs = {"map": map_at_k, "ndcg": ndcg_at_k, "mrr": mrr_at_k, "accuracy": accuracy_at_k,
               "recall": precision_recall_at_k, "precision": precision_recall_at_k}
    for name, ks in cutoffs.items():
        if any(int(k) < 1 for k in ks):
            raise DataError(f"ir_metrics: cut-offs must be >= 1, got {name}@{list(ks)}")
    K = min(max(int(k) for ks in cutoffs.values() for k in ks), N)  # the deepest rank any metric looks at
    R = max(1, SCORE_BLOCK_ELEMENTS // min(chunk_size, N))  # query chunk: an (R, C) score block stays bounded

    # Every relevant (query, doc) pair as one int64 key q·N + doc, so "is r_i relevant?" is one torch.isin.
    rel_keys = torch.tensor(sorted(q * N + d for q, docs in enumerate(relevant) for d in docs), dtype=torch.int64)
    n_rel = torch.tensor([len(docs) for docs in relevant], dtype=torch.float64)  # (Q,)

    per_query: dict[str, list[torch.Tensor]] = {}  # metric → [(R,) per query chunk]
    for q0 in range(0, Q, R):
        q1 = min(q0 + R, Q)
        keys = top_ids(q0, q1, K) + torch.arange(q0, q1, dtype=torch.int64).unsqueeze(1) * N  # (R, K)
        hits = torch.isin(keys, rel_keys).double()  # (R, K): hit_i of the formulas, rank i = column + 1
        for name, value in _metrics_from_hits(hits, n_rel[q0:q1], cutoffs).items():
            per_query.setdefault(name, []).append(value)
    # One mean over all Q values (not a running sum of chunk sums): the same bits whatever the chunking.
    return {name: torch.cat(per_query[name]).mean().item() for name in _ordered(per_query)}


def top_k_cosine(
    query_emb: torch.Tensor, corpus_emb: torch.Tensor, k: int, chunk_size: int = 50_000
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best corpus rows per query by cosine, ordered by (−score, corpus id): scores, ids, each (R, k).

    k must be <= N. Scores are float32 but accumulated in float64: BLAS picks different kernels (and so different
    summation orders) for different matrix shapes, so float32 dot products change in the last bit with the chunk
    size and near-ties would swap; float64 sums rounded to float32 are the same bits for every chunking.
    """
    q = F.normalize(query_emb.double(), dim=-1)  # (R, D)
    return top_k(lambda c0, c1: _cosine(q, corpus_emb[c0:c1]), q.shape[0], corpus_emb.shape[0], k, chunk_size)


def top_k(
    scores_of: Callable[[int, int], torch.Tensor], n_queries: int, n_corpus: int, k: int, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact top k by (−score, corpus id) of any score: `scores_of(c0, c1)` (R, c1 − c0) scores corpus rows
    c0..c1−1, chunk_size of them at a time. Returns scores (R, k) and ids (R, k); k must be <= N."""
    best_scores = torch.empty(n_queries, 0)  # running top k over the chunks seen so far (the scores' dtype)
    best_ids = torch.empty(n_queries, 0, dtype=torch.int64)
    for c0 in range(0, n_corpus, chunk_size):
        scores = scores_of(c0, min(c0 + chunk_size, n_corpus))  # (R, C)
        if not torch.isfinite(scores).all():
            raise DataError(f"ir_metrics: corpus rows {c0}..{c0 + scores.shape[1] - 1} or the queries hold NaN/inf")
        chunk_scores, chunk_ids = _chunk_top_k(scores, min(k, scores.shape[1]))  # (R, k')
        # Merge: the top k of (running top k ∪ this chunk's top k) is the top k of everything seen so far.
        best_scores = torch.cat([best_scores.to(scores.dtype), chunk_scores], dim=1)  # (R, k + k')
        best_ids = torch.cat([best_ids, chunk_ids + c0], dim=1)  # (R, k + k')
        best_scores, best_ids = sort_by_score_then_id(best_scores, best_ids)
        best_scores, best_ids = best_scores[:, :k], best_ids[:, :k]  # (R, k)
    return best_scores, best_ids


def _cosine(q: torch.Tensor, corpus: torch.Tensor) -> torch.Tensor:
    """cos(q_i, c_j) as float32 (R, C), for unit rows q (R, D) float64 and any rows corpus (C, D).

    The float64 copy is made MATMUL_ROWS corpus rows at a time, so the working memory stays small for any C.
    """
    scores = torch.empty(q.shape[0], corpus.shape[0], dtype=torch.float32)  # (R, C)
    for s in range(0, corpus.shape[0], MATMUL_ROWS):
        c = corpus[s : s + MATMUL_ROWS].double()  # (c, D)
        norm = torch.linalg.vector_norm(c, dim=1).clamp_min(1e-12)  # (c,) as F.normalize's eps
        scores[:, s : s + MATMUL_ROWS] = (q @ c.T) / norm  # (R, c), rounded to float32 on assignment
    return scores


def cosine_of_pairs(q: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """cos(q_r, c_rk) as float32 (R, K), for unit rows q (R, D) float64 and candidate rows (R, K, D) of any dtype:
    the scores `top_k_cosine` gives those pairs (float64 sums, the same eps, rounded to float32) — for re-scoring
    candidates found another way (FAISS, a positive's own score)."""
    c = candidates.double()  # (R, K, D)
    norm = torch.linalg.vector_norm(c, dim=-1).clamp_min(1e-12)  # (R, K) as F.normalize's eps
    return (torch.einsum("rd,rkd->rk", q, c) / norm).float()  # (R, K)


def _chunk_top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k of each row of scores (R, C) by (−score, column): scores, columns (R, k), in that order.

    torch.topk picks an arbitrary subset of the values tied at the cut-off, so only its k-th value is trusted:
    everything strictly above it is in, and the remaining places go to the tied columns with the smallest ids.
    """
    kth = scores.topk(k, dim=1).values[:, -1:]  # (R, 1) the cut-off score
    above = scores > kth  # (R, C) always kept
    tied = scores == kth  # (R, C) kept while places are left, smallest column first
    places = k - above.sum(dim=1, keepdim=True)  # (R, 1) ≥ 1
    if (tied.sum(dim=1, keepdim=True) > places).any():  # more ties than places (rare): first ones by column id
        tied &= tied.cumsum(dim=1, dtype=torch.int32) <= places  # (R, C)
    keep = above | tied  # (R, C), exactly k per row
    cols = keep.nonzero()[:, 1].view(-1, k)  # (R, k) ascending column ids (nonzero is row-major)
    return sort_by_score_then_id(scores.gather(1, cols), cols)


def sort_by_score_then_id(scores: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order each row of scores, ids (R, M) by (−score, id): sort by the secondary key, then stably by the primary."""
    by_id = ids.argsort(dim=1, stable=True)  # (R, M)
    scores, ids = scores.gather(1, by_id), ids.gather(1, by_id)
    by_score = scores.argsort(dim=1, descending=True, stable=True)  # ties keep the id order just made
    return scores.gather(1, by_score), ids.gather(1, by_score)


def _metrics_from_hits(hits: torch.Tensor, n_rel: torch.Tensor, cutoffs: dict) -> dict[str, torch.Tensor]:
    """Per-query metrics (R,) from hits (R, K) (1.0 where the rank-(i+1) text is relevant) and |rel| n_rel (R,)."""
    K = hits.shape[1]
    ranks = torch.arange(1, K + 1, dtype=torch.float64)  # (K,) 1-based ranks
    precision_at_rank = hits.cumsum(dim=1) / ranks  # (R, K) Precision@i for every i
    out = {}
    for k in cutoffs["accuracy"]:
        out[f"accuracy@{k}"] = hits[:, :k].amax(dim=1)
    for k in cutoffs["precision"]:
        out[f"precision@{k}"] = hits[:, :k].sum(dim=1) / k  # / k even when k > N, as in the reference
        out[f"recall@{k}"] = hits[:, :k].sum(dim=1) / n_rel
    for k in cutoffs["mrr"]:
        out[f"mrr@{k}"] = (hits[:, :k] / ranks[:k]).amax(dim=1)  # 1/i is decreasing: the max is the first hit
    for k in cutoffs["ndcg"]:
        discount = 1.0 / torch.log2(torch.arange(1, k + 1, dtype=torch.float64) + 1)  # (k,) 1/log2(i+1)
        ideal = discount.cumsum(dim=0)[(n_rel.clamp(max=k) - 1).long()]  # (R,) IDCG: min(|rel|, k) hits on top
        out[f"ndcg@{k}"] = (hits[:, :k] * discount[: min(k, K)]).sum(dim=1) / ideal
    for k in cutoffs["map"]:
        out[f"map@{k}"] = (hits[:, :k] * precision_at_rank[:, :k]).sum(dim=1) / n_rel.clamp(max=k)
    return out


def check_ir_embeddings(query_emb: torch.Tensor, corpus_emb: torch.Tensor) -> None:
    """query_emb (Q, D) and corpus_emb (N, D), or a DataError."""
    if query_emb.ndim != 2 or corpus_emb.ndim != 2 or query_emb.shape[1] != corpus_emb.shape[1]:
        raise DataError(f"ir_metrics: expected query_emb (Q, D) and corpus_emb (N, D), got "
                        f"{tuple(query_emb.shape)} and {tuple(corpus_emb.shape)}")


def _check_relevant(relevant, Q: int, N: int, chunk_size: int) -> None:
    if Q == 0 or N == 0:
        raise DataError(f"ir_metrics: needs at least one query and one corpus text, got Q={Q}, N={N}")
    if len(relevant) != Q:
        raise DataError(f"ir_metrics: relevant has {len(relevant)} sets for {Q} queries")
    for q, docs in enumerate(relevant):
        if not docs:
            raise DataError(f"ir_metrics: query {q} has no relevant corpus id")
        if any(not 0 <= d < N for d in docs):
            raise DataError(f"ir_metrics: query {q} lists relevant ids {sorted(docs)}, outside 0..{N - 1}")
    if chunk_size < 1:
        raise DataError(f"ir_metrics: chunk_size must be >= 1, got {chunk_size}")


def _ordered(names) -> list[str]:
    """IR_METRICS' order first, any extra cut-offs after it."""
    return [m for m in IR_METRICS if m in names] + sorted(m for m in names if m not in IR_METRICS)


# ================================================================================================ STS metrics
def sts_metrics(e1, e2, gold) -> dict[str, float]:
    """Spearman and Pearson correlation of cos(e1_j, e2_j) with gold_j; e1, e2 (P, D), gold (P,). numpy math.

    A constant gold score has no correlation (DataError); constant cosines (a collapsed model) give NaN.
    """
    a, b, g = _to_numpy(e1), _to_numpy(e2), _to_numpy(gold).reshape(-1)
    if a.ndim != 2 or a.shape != b.shape or a.shape[0] != g.shape[0]:
        raise DataError(f"sts_metrics: expected e1, e2 (P, D) and gold (P,), got {a.shape}, {b.shape}, {g.shape}")
    if g.shape[0] < 2 or np.all(g == g[0]):
        raise DataError(f"sts_metrics: needs at least 2 pairs with different gold scores, got {g.shape[0]} pairs")
    norms = np.maximum(np.linalg.norm(a, axis=1), 1e-12) * np.maximum(np.linalg.norm(b, axis=1), 1e-12)
    cosine = (a * b).sum(axis=1) / norms  # (P,)
    return {"spearman_cosine": _pearson(average_ranks(cosine), average_ranks(g)),
            "pearson_cosine": _pearson(cosine, g)}


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x (P,); tied values share the mean of their ranks: [10, 20, 20, 30] → [1, 2.5, 2.5, 4]."""
    _, group, counts = np.unique(x, return_inverse=True, return_counts=True)  # group of each value, group sizes
    last = np.cumsum(counts)  # rank of each group's last member
    return (last - (counts - 1) / 2.0)[group]  # mean of ranks last-count+1 .. last


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if np.all(x == x[0]) or np.all(y == y[0]):  # undefined; test equality, as x - mean(x) may not round to 0
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    return float((dx * dy).sum() / math.sqrt(float((dx * dx).sum()) * float((dy * dy).sum())))


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)
