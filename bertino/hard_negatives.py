"""Hard negatives by dense self-retrieval (the model card's "semantic hard negatives"); the command is bertino/mine.py.

Shapes: M input rows, Q distinct queries, N corpus texts, D embedding dim, R queries per block, C corpus chunk,
K = min(range_max, N) ranks kept per query, W = K − range_min window width, k negatives per row.

The corpus is every distinct positive of the input (in order of first appearance), then the texts of any
`--corpus` files; a text's corpus id is its position. Queries and corpus are encoded once, and each query q ranks
the whole corpus by cosine similarity, ties broken by corpus id, so the ranking is a total order:

    r_0(q), r_1(q), ..., r_{N-1}(q)       ordered by (−cos(q, c), id)

For an input row (q, p) with positive score s⁺ = cos(q, p), the text c = r_i(q) is a hard negative of the row when

    range_min ≤ i < range_max        the window: close to q, but not the very top (i counts every corpus text)
    c ∉ P(q) and c ≠ q               P(q): all the positives q has on any row (a query may repeat with others)
    cos(q, c) < s⁺ − margin          absolute margin below the positive: the false-negative filter (`--margin`,
                                     default 0.05 when no other filter is given)
    cos(q, c) ≤ s⁺ · (1 − r)         relative margin (`--relative-margin r`; NV-Retriever's TopK-PercPos: r = 0.05
                                     keeps negatives at most 95% as similar as the positive)
    cos(q, c) ≤ max_score            or an absolute cap instead of the margin (`--max-score`)

and the row keeps the first k such texts in rank order (`--sampling random`: k of them drawn at random, seeded,
still written in rank order). A row with fewer than k survivors is dropped, and the count is reported.

Why these rules. Lexical (BM25) mining returns passages sharing the query's words, which are often just as good
answers as the labelled positive: "false negatives" that teach the model to push away correct answers. Dense
self-retrieval ranks by meaning, which makes false negatives *more* likely at the very top, hence the window
that skips the first range_min ranks (RocketQA, Qu et al. 2021, arXiv:2010.08191, found that most top-ranked
"negatives" of a dense retriever are unlabelled positives) and the positive-aware margins: a negative must score
clearly below the row's own positive (NV-Retriever, Moreira et al. 2024, arXiv:2407.15831: "TopK-MarginPos" is the
absolute margin, "TopK-PercPos" the relative one, which the paper found best at 95%; sentence-transformers'
`mine_hard_negatives` offers both as absolute_margin / relative_margin).

Memory: queries are scored R at a time against C corpus rows at a time, keeping a running top K
(corpus_search.py: exact, independent of C, FAISS candidates re-scored where installed); the (Q, N) score matrix is
never built, and the embeddings may be memory-mapped files (mine.py's cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from .corpus_search import SEARCH, corpus_top_k
from .errors import ConfigError, DataError
from .metrics import SCORE_BLOCK_ELEMENTS, cosine_of_pairs

SAMPLING = ("top", "random")


# ================================================================================================ the rule, on tensors
class Selection(NamedTuple):
    negative_ids: torch.Tensor  # (M, k) int64 corpus ids in rank order, -1 where fewer than k survived
    negative_scores: torch.Tensor  # (M, k) float32 cos(q, negative), NaN where -1
    positive_scores: torch.Tensor  # (M,) float32 cos(q, p) of each row


def select_negatives(
    query_emb: torch.Tensor,
    corpus_emb: torch.Tensor,
    row_query: torch.Tensor,
    row_positive: torch.Tensor,
    excluded: Sequence[set[int]] | torch.Tensor,
    *,
    num_negatives: int = 2,
    range_min: int = 10,
    range_max: int = 50,
    margin: float | None = 0.05,
    relative_margin: float | None = None,
    max_score: float | None = None,
    sampling: str = "top",
    seed: int = 0,
    chunk_size: int = 50_000,
    search: str = "exact",
    device: str | torch.device | None = None,
    show_progress_bar: bool = False,
) -> Selection:
    """The module docstring's rule for M rows: query_emb (Q, D), corpus_emb (N, D), row_query, row_positive (M,).

    `row_query[m]` is row m's query id, `row_positive[m]` the corpus id of its positive; `excluded[q]` holds the
    corpus ids that may never be q's negatives (all its positives, and q itself when q is also a corpus text) —
    or, at scale, `excluded` is the sorted int64 tensor of their keys q·N + c. The embeddings may be CPU tensors
    over memory-mapped files: they are read a block at a time (`search`, `device`: corpus_search.corpus_top_k).
    """
    check_settings(num_negatives, range_min, range_max, margin, max_score, sampling, chunk_size, relative_margin,
                   search)
    Q, N, M, k = query_emb.shape[0], corpus_emb.shape[0], row_query.shape[0], num_negatives
    K = min(range_max, N)
    W = K - range_min
    if W < k:
        raise DataError(f"the corpus has {N} texts, so ranks [{range_min}, {range_max}) hold {max(W, 0)} "
                        f"candidates, fewer than --num-negatives {k}: lower --range-min or add --corpus files")
    # One int64 key q·N + c per forbidden (query, text) pair, so "is c excluded for q?" is one torch.isin.
    excluded_keys = (excluded if isinstance(excluded, torch.Tensor) else
                     torch.tensor(sorted(q * N + c for q, ids in enumerate(excluded) for c in ids), dtype=torch.int64))
    # Random keys for every (row, window slot), drawn once in row order: the same draw whatever the block sizes.
    sample_keys = (torch.rand(M, W, generator=torch.Generator().manual_seed(seed))  # (M, W)
                   if sampling == "random" else None)

    negative_ids = torch.full((M, k), -1, dtype=torch.int64)  # (M, k)
    negative_scores = torch.full((M, k), math.nan, dtype=torch.float32)  # (M, k)
    positive_scores = torch.empty(M, dtype=torch.float32)  # (M,)
    by_query = torch.argsort(row_query, stable=True)  # (M,) row ids grouped by query, input order within a query
    R = max(1, SCORE_BLOCK_ELEMENTS // min(chunk_size, N))  # an (R, C) score block stays ~100 MB
    starts = torch.searchsorted(row_query[by_query], torch.arange(0, Q + R, R))  # block b's rows: starts[b]:starts[b+1]
    from tqdm.auto import tqdm

    for b, q0 in enumerate(tqdm(range(0, Q, R), desc="Scoring", unit="block", disable=not show_progress_bar)):
        top_scores, top_ids = corpus_top_k(query_emb[q0 : q0 + R], corpus_emb, K, chunk_size, search,
                                           device)  # (R, K) each
        rows = by_query[starts[b] : starts[b + 1]]  # (m,) the input rows whose query is in this block
        local = row_query[rows] - q0  # (m,) their query's row in the block
        cand_ids = top_ids[local, range_min:]  # (m, W) the window, in rank order
        cand_scores = top_scores[local, range_min:]  # (m, W)

        # s⁺ exactly as top_k_cosine computes scores: unit query in float64, dot, / |p|, rounded to float32.
        q = F.normalize(query_emb[row_query[rows]].double(), dim=-1)  # (m, D)
        pos = cosine_of_pairs(q, corpus_emb[row_positive[rows]].unsqueeze(1)).squeeze(1)  # (m,)
        positive_scores[rows] = pos

        keep = ~torch.isin(row_query[rows].unsqueeze(1) * N + cand_ids, excluded_keys)  # (m, W) not a positive of q
        if margin is not None:  # compared in float64, so s⁺ − margin is not rounded before the comparison
            keep &= cand_scores.double() < pos.double().unsqueeze(1) - margin  # (m, W)
        if relative_margin is not None:  # at most (1 − r) times as similar as the positive
            keep &= cand_scores.double() <= pos.double().unsqueeze(1) * (1.0 - relative_margin)  # (m, W)
        if max_score is not None:
            keep &= cand_scores.double() <= max_score  # (m, W)
        if sample_keys is not None:  # the k survivors with the smallest random keys, kept in rank order
            keys = sample_keys[rows].masked_fill(~keep, math.inf)  # (m, W)
            cutoff = keys.sort(dim=1).values[:, k - 1 : k]  # (m, 1) the k-th smallest key (inf: < k survivors)
            keep &= keys <= cutoff  # (m, W) exactly min(k, survivors) per row: float keys do not tie in practice
        slot = keep.cumsum(dim=1)  # (m, W) 1-based position among the survivors, in rank order
        take = keep & (slot <= k)  # (m, W) the first k survivors
        # Scatter each taken candidate to its output column slot − 1; everything else lands in a spare column k.
        col = torch.where(take, slot - 1, torch.full_like(slot, k))  # (m, W)
        ids = torch.full((rows.shape[0], k + 1), -1, dtype=torch.int64).scatter_(1, col, cand_ids)  # (m, k+1)
        scores = torch.full((rows.shape[0], k + 1), math.nan).scatter_(1, col, cand_scores)  # (m, k+1)
        # The spare column got arbitrary rejected values; rows with fewer than k survivors keep -1 / NaN in place.
        negative_ids[rows], negative_scores[rows] = ids[:, :k], scores[:, :k]
    return Selection(negative_ids, negative_scores, positive_scores)


def check_settings(num_negatives, range_min, range_max, margin, max_score, sampling="top", chunk_size=50_000,
                   relative_margin=None, search="exact") -> None:
    """ConfigError, before any encoding, for settings that cannot produce negatives."""
    if isinstance(num_negatives, bool) or not isinstance(num_negatives, int) or num_negatives < 1:
        raise ConfigError(f"num_negatives must be an integer >= 1, got {num_negatives!r}")
    if range_min < 0 or range_min >= range_max:
        raise ConfigError(f"the rank window [range_min, range_max) = [{range_min}, {range_max}) is empty "
                          f"(expected 0 <= range_min < range_max)")
    if range_max - range_min < num_negatives:
        raise ConfigError(f"the rank window [{range_min}, {range_max}) holds {range_max - range_min} candidates, "
                          f"fewer than num_negatives={num_negatives}: widen the window")
    if margin is not None and not (math.isfinite(margin) and margin >= 0):
        raise ConfigError(f"margin must be a finite number >= 0 (a negative margin lets negatives outscore the "
                          f"positive), got {margin}")
    if relative_margin is not None and not (math.isfinite(relative_margin) and 0 <= relative_margin < 1):
        raise ConfigError(f"relative_margin must be in [0, 1) (0.05: negatives at most 95% as similar as the "
                          f"positive), got {relative_margin}")
    if search not in SEARCH:
        raise ConfigError(f"search must be one of {SEARCH}, got {search!r}")
    if max_score is not None and not math.isfinite(max_score):
        raise ConfigError(f"max_score must be a finite number, got {max_score}")
    if sampling not in SAMPLING:
        raise ConfigError(f"sampling must be one of {SAMPLING}, got {sampling!r}")
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")


# ================================================================================================ texts in, rows out
@dataclass(frozen=True)
class MineStats:
    rows_in: int
    rows_out: int
    queries: int  # Q distinct queries
    corpus_size: int  # N
    mean_positive_score: float  # over the rows kept
    mean_negative_score: float  # over their negatives

    @property
    def dropped(self) -> int:
        return self.rows_in - self.rows_out


def mine(encoder, rows: Sequence[dict], **settings) -> list[dict]:
    """Rows {query, positive} → rows {query, positive, negative_1, ..., negative_k}: `mine_with_stats` without the
    statistics (same keyword settings: corpus, num_negatives, range_min, range_max, margin, max_score, ...)."""
    return mine_with_stats(encoder, rows, **settings)[0]


def mine_with_stats(
    encoder,
    rows: Sequence[dict],
    *,
    corpus: Sequence[str] = (),
    query_column: str = "query",
    positive_column: str = "positive",
    num_negatives: int = 2,
    range_min: int = 10,
    range_max: int = 50,
    margin: float | None = 0.05,
    relative_margin: float | None = None,
    max_score: float | None = None,
    sampling: str = "top",
    seed: int = 0,
    batch_size: int = 64,
    chunk_size: int = 50_000,
    show_progress_bar: bool = False,
) -> tuple[list[dict], MineStats]:
    """Mine hard negatives for `rows` with `encoder` (anything with `SentenceEncoder.encode`'s signature).

    The corpus is every distinct positive, then the extra `corpus` texts. Output rows keep the input order, use the
    keys "query" and "positive" whatever the input columns, and a row with fewer than k negatives is left out.
    """
    check_settings(num_negatives, range_min, range_max, margin, max_score, sampling, chunk_size, relative_margin)
    if not rows:
        raise DataError("mine: no input rows")
    pairs = [(_text(row, query_column, i), _text(row, positive_column, i)) for i, row in enumerate(rows)]
    for i, text in enumerate(corpus):
        if not isinstance(text, str):
            raise DataError(f"corpus[{i}] is {type(text).__name__} ({text!r:.60}), expected a string")

    corpus_ids: dict[str, int] = {}  # text → corpus id, positives first, in order of first appearance
    for text in [p for _, p in pairs] + list(corpus):
        corpus_ids.setdefault(text, len(corpus_ids))
    query_ids: dict[str, int] = {}
    for q, _ in pairs:
        query_ids.setdefault(q, len(query_ids))
    excluded: list[set[int]] = [set() for _ in query_ids]  # (Q,) P(q), plus q itself when it is a corpus text
    for q, p in pairs:
        excluded[query_ids[q]].add(corpus_ids[p])
    for q, qid in query_ids.items():
        if q in corpus_ids:
            excluded[qid].add(corpus_ids[q])

    # Encode every distinct text once (a query may also be a corpus text), then pick the rows of each side.
    index = {t: i for i, t in enumerate(dict.fromkeys([*query_ids, *corpus_ids]))}  # text → row of emb
    emb = torch.as_tensor(encoder.encode(list(index), batch_size=batch_size, normalize=True,
                                         show_progress_bar=show_progress_bar, convert_to_tensor=True)).cpu()
    query_emb = emb[torch.tensor([index[t] for t in query_ids])]  # (Q, D)
    corpus_emb = emb[torch.tensor([index[t] for t in corpus_ids])]  # (N, D)

    row_query = torch.tensor([query_ids[q] for q, _ in pairs], dtype=torch.int64)  # (M,)
    row_positive = torch.tensor([corpus_ids[p] for _, p in pairs], dtype=torch.int64)  # (M,)
    sel = select_negatives(query_emb, corpus_emb, row_query, row_positive, excluded, num_negatives=num_negatives,
                           range_min=range_min, range_max=range_max, margin=margin, relative_margin=relative_margin,
                           max_score=max_score, sampling=sampling, seed=seed, chunk_size=chunk_size,
                           show_progress_bar=show_progress_bar)

    texts = list(corpus_ids)  # corpus id → text
    complete = (sel.negative_ids >= 0).all(dim=1)  # (M,)
    out = []
    for m in complete.nonzero()[:, 0].tolist():
        row = {"query": pairs[m][0], "positive": pairs[m][1]}
        row.update((f"negative_{j + 1}", texts[c]) for j, c in enumerate(sel.negative_ids[m].tolist()))
        out.append(row)
    kept = complete.nonzero()[:, 0]
    stats = MineStats(
        rows_in=len(pairs), rows_out=len(out), queries=len(query_ids), corpus_size=len(corpus_ids),
        mean_positive_score=sel.positive_scores[kept].double().mean().item() if len(out) else math.nan,
        mean_negative_score=sel.negative_scores[kept].double().mean().item() if len(out) else math.nan,
    )
    return out, stats


def _text(row: dict, key: str, i: int) -> str:
    if not isinstance(row.get(key), str):
        found = f"{type(row[key]).__name__} ({row[key]!r:.60})" if key in row else f"no such key (keys {sorted(row)})"
        raise DataError(f"rows[{i}][{key!r}]: expected a string, found {found}")
    return row[key]
