"""Vector indexes in the loop: retrieval evaluated through real FAISS indexes, with the IR metrics of
bertino/metrics.py, and what each index costs — bytes per vector as it stores them, build seconds, milliseconds
per query.

Shapes: Q queries, N corpus texts, d the evaluated (truncated) dim, K the deepest cut-off the metrics need
(min(100, N) for MAP@100), K' ≥ K the depth searched, R a slice of queries.

Every vector is cut to its first d coordinates and L2-normalised, so inner product = cosine. The indexes
(`evaluate.py --index`, `eval.index`; names in bertino/eval_names.py), each with what one vector costs:

    flat         IndexFlatIP: every document's float32 vector, scanned exhaustively                     4·d bytes
    sq8          IndexScalarQuantizer QT_8bit: per dimension the corpus' [min, max] (FAISS's RS_minmax),
                 code = ⌊255 · clip((x − min) / (max − min), 0, 1)⌋, decoded to the middle of its bin,
                 x̂ = min + (code + ½) / 255 · (max − min); the float query against x̂, exhaustively       d bytes
    binary-flat  IndexBinaryFlat: the sign bits (zero-padded to whole bytes), Hamming distance             ⌈d/8⌉ bytes
    hnsw         IndexHNSWFlat: float32 vectors in an HNSW graph (M = HNSW_M links per node,
                 efConstruction, efSearch below): approximate                       4·d bytes + the graph
    hnsw-sq8     IndexHNSWSQ: the sq8 codes in the same graph                          d bytes + the graph

The graph costs what FAISS allocates for it: 4 bytes per neighbour slot (2·M at level 0, M at each upper level a
node reaches), 8 bytes of offset and 4 of level per node; `stored_bytes` adds it up from the index itself.

How a ranking is read from an index — the tie rule of the exact path, order by (−score, corpus id):
- FAISS returns the top K' by its own score with ties in no set order; the results are re-sorted by (−score, id).
- The exhaustive indexes (flat, sq8, binary-flat) give exact rankings of their scores: when a query's K-th best
  score is not strictly better than the K'-th returned, the tie group at the cut could be incomplete, and that
  query is searched again twice as deep (up to N), so ties go to the smaller id as everywhere in bertino.
- flat's own float32 sums (BLAS) differ from the exact path's (float64 sums rounded to float32) in the last bits,
  which would swap near-ties; its candidates are therefore re-scored as the exact path scores them, and a query
  whose K-th re-scored score is within `flat_score_error` of the K'-th FAISS score is searched deeper. flat then
  *is* the exact float32 ranking, bit for bit: the check that an index is wired into the metrics correctly.
- hnsw and hnsw-sq8 are approximate: one search at depth K, its results re-sorted by (−score, id).

Figures per index (beside the IR metrics): `recall_vs_exact@10` — the share of the exact float32 top 10 (exact
path, same tie rule) the index returns in its top 10, averaged over queries; `bytes_per_vector`;
`build_seconds` (the sq8 range, adding, the graph); `query_ms` — milliseconds per query searching one query per
call (the first TIMED_SINGLE_QUERIES queries), `query_ms_batched` — per query, all queries in one call, both at
depth K. FAISS runs on one OpenMP thread by default (`threads`), so that HNSW graphs — and so the metrics — are
the same on every run, and the timings do not measure threads waiting for a core.

Memory: the index holds what it stores (flat and hnsw: the float32 vectors); vectors are normalised and added
ADD_ROWS at a time, the sq8 range is computed ADD_ROWS rows at a time too (FAISS's own training would copy the
whole corpus), and flat's re-scoring gathers RESCORE_BLOCK_ELEMENTS floats at a time. faiss-cpu is an optional extra
(`pip install 'bertino[faiss]'`), imported only here, through `require_faiss`.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError, DataError
from .eval_names import check_indexes
from .metrics import (MATMUL_ROWS, SCORE_BLOCK_ELEMENTS, check_ir_embeddings, cosine_of_pairs, ranking_metrics, sort_by_score_then_id,
                      top_k_cosine)
from .quantization import binary_codes

if TYPE_CHECKING:
    from .eval_sets import IRSet

INSTALL = "pip install 'bertino[faiss]' (or pip install faiss-cpu)"
HNSW_M = 32  # links per node (FAISS's IndexHNSWFlat(d, M)); level 0 has 2·M
HNSW_EF_CONSTRUCTION = 40  # candidates kept while inserting (FAISS's default)
HNSW_EF_SEARCH = 128  # candidates kept while searching (FAISS's default: 16); FAISS searches at least K
TIMED_SINGLE_QUERIES = 256  # queries timed one per search call
ADD_ROWS = 1 << 16  # corpus rows normalised and added at a time
RESCORE_BLOCK_ELEMENTS = 1 << 21  # r·K'·d floats gathered per slice of flat's re-scoring (16 MB of float64)


def require_faiss():
    """The faiss module, or a ConfigError naming the extra to install."""
    try:
        import faiss
    except ImportError:
        raise ConfigError(f"evaluating vector indexes (--index, eval.index) needs the faiss package: "
                          f"{INSTALL}") from None
    return faiss


def flat_score_error(d: int) -> float:
    """A bound on |FAISS's float32 inner product − the exact path's score| for unit vectors of d dims: float32
    sums of d products accumulate at most d·u·Σ|q_i c_i| ≤ d·u (u = 2⁻²⁴), plus the rounding of the vectors
    to float32 and of the exact score; doubled for safety."""
    return 2 * (d + 8) * 2.0**-24


# ================================================================================================ building
def unit_float32(x: torch.Tensor) -> np.ndarray:
    """Rows of x (n, d) normalised in float64 (as the exact path does), as a C-contiguous float32 array (n, d)."""
    out = np.empty(tuple(x.shape), dtype=np.float32)
    for s in range(0, x.shape[0], MATMUL_ROWS):
        out[s : s + MATMUL_ROWS] = F.normalize(x[s : s + MATMUL_ROWS].double(), dim=-1).float().numpy()
    return out


@contextmanager
def faiss_threads(threads: int | None):
    """FAISS's OpenMP threads set to `threads` inside the block (None: left as they are), restored after."""
    faiss = require_faiss()
    previous = faiss.omp_get_max_threads()
    if threads is not None:
        faiss.omp_set_num_threads(threads)
    try:
        yield faiss
    finally:
        faiss.omp_set_num_threads(previous)


def build_index(name: str, corpus: torch.Tensor, threads: int | None = 1):
    """The FAISS index `name` holding the corpus (N, d) → (index, seconds it took). `threads`: FAISS's OpenMP
    threads while building (None: its default; 1 makes HNSW graphs the same on every run)."""
    check_indexes([name])
    n, d = corpus.shape
    with faiss_threads(threads) as faiss:
        start = time.perf_counter()
        if name == "binary-flat":
            index = faiss.IndexBinaryFlat(8 * math.ceil(d / 8))  # whole bytes: zero padding, equal in every vector
            for s in range(0, n, ADD_ROWS):
                index.add(binary_codes(corpus[s : s + ADD_ROWS]).numpy())
            return index, time.perf_counter() - start
        ip, qt8 = faiss.METRIC_INNER_PRODUCT, faiss.ScalarQuantizer.QT_8bit
        index = {"flat": lambda: faiss.IndexFlatIP(d),
                 "sq8": lambda: faiss.IndexScalarQuantizer(d, qt8, ip),
                 "hnsw": lambda: faiss.IndexHNSWFlat(d, HNSW_M, ip),
                 "hnsw-sq8": lambda: faiss.IndexHNSWSQ(d, qt8, HNSW_M, ip)}[name]()
        if name.startswith("hnsw"):
            index.hnsw.efConstruction, index.hnsw.efSearch = HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH
        if name.endswith("sq8"):
            set_sq8_range(faiss, index if name == "sq8" else faiss.downcast_index(index.storage), corpus)
            index.is_trained = True
        for s in range(0, n, ADD_ROWS):
            index.add(unit_float32(corpus[s : s + ADD_ROWS]))
        return index, time.perf_counter() - start


def set_sq8_range(faiss, sq_index, corpus: torch.Tensor) -> None:
    """Train an IndexScalarQuantizer as FAISS's RS_minmax training does — per dimension the min and max of the
    float32 unit corpus vectors (FAISS stores min, then max − min) — ADD_ROWS rows at a time instead of on a copy
    of the whole corpus (tested equal to `train`)."""
    d = corpus.shape[1]
    lo, hi = np.full(d, np.inf, dtype=np.float32), np.full(d, -np.inf, dtype=np.float32)
    for s in range(0, corpus.shape[0], ADD_ROWS):
        x = unit_float32(corpus[s : s + ADD_ROWS])  # (c, d)
        lo, hi = np.minimum(lo, x.min(axis=0)), np.maximum(hi, x.max(axis=0))
    faiss.copy_array_to_vector(np.concatenate([lo, hi - lo]).astype(np.float32), sq_index.sq.trained)
    sq_index.is_trained = True


def stored_bytes(index) -> float:
    """Bytes per vector the index holds: its codes (code_size each) and, for HNSW, its graph — the neighbour slots
    (int32), each node's offset (int64) and level (int32)."""
    faiss = require_faiss()
    n = index.ntotal
    if isinstance(index, faiss.IndexBinary):
        return float(index.code_size)
    if hasattr(index, "hnsw"):
        graph = 4 * index.hnsw.neighbors.size() + 8 * index.hnsw.offsets.size() + 4 * index.hnsw.levels.size()
        return faiss.downcast_index(index.storage).sa_code_size() + graph / n
    return float(index.sa_code_size())


# ================================================================================================ searching
class IndexSearch:
    """One eval set at one dim d through one FAISS index: the ranking `metrics.ranking_metrics` scores, searched
    once for all queries at depth K and kept (Q·K ids)."""

    def __init__(self, name: str, queries: torch.Tensor, corpus: torch.Tensor, *, threads: int | None = 1):
        check_ir_embeddings(queries, corpus)
        if not (torch.isfinite(queries).all() and all(bool(torch.isfinite(corpus[s : s + MATMUL_ROWS]).all())
                                                      for s in range(0, corpus.shape[0], MATMUL_ROWS))):
            raise DataError("index search: the query or corpus embeddings hold NaN/inf")
        self.name, self.queries, self.corpus, self.threads = name, queries, corpus, threads
        self.n_queries, self.n_corpus, self.d = queries.shape[0], corpus.shape[0], corpus.shape[1]
        self.index, self.build_seconds = build_index(name, corpus, threads)
        self.query_vectors = (binary_codes(queries).numpy() if name == "binary-flat"
                              else unit_float32(queries))  # (Q, ⌈d/8⌉) bits or (Q, d) float32
        self._ids: torch.Tensor | None = None  # (Q, K) ranked ids, once searched

    def top_ids(self, q0: int, q1: int, k: int) -> torch.Tensor:
        """The ids (q1 − q0, k) of queries q0..q1−1's top k, best first (−1 where an approximate index found
        fewer than k)."""
        if self._ids is None or self._ids.shape[1] < k:
            self._ids = self.ranked(k)[1]
        return self._ids[q0:q1, :k]

    def faiss_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS's own search: scores (larger is better; −Hamming for bits) and ids (−1: nothing found)."""
        with faiss_threads(self.threads):
            scores, ids = self.index.search(queries, k)
        return (-scores.astype(np.float32) if self.name == "binary-flat" else scores), ids

    def ranked(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every query's top k by (−score, id) → scores (Q, k) float32, ids (Q, k) int64 (−1 and −inf where an
        approximate index found fewer). Exhaustive indexes search deeper until the cut is certain."""
        k = min(k, self.n_corpus)
        scores = torch.full((self.n_queries, k), -math.inf, dtype=torch.float32)
        ids = torch.full((self.n_queries, k), -1, dtype=torch.int64)
        todo = np.arange(self.n_queries)
        depth = k if self.name.startswith("hnsw") else min(self.n_corpus, max(2 * k, k + 16))
        while len(todo):
            faiss_scores, faiss_ids = self.faiss_search(self.query_vectors[todo], depth)  # (r, K')
            found_scores = torch.from_numpy(faiss_scores).float()
            found_ids = torch.from_numpy(faiss_ids).long()
            if self.name == "flat":  # re-score as the exact path does: the same float32 bits
                found_scores = self._exact_scores(todo, found_ids)
            found_scores = found_scores.masked_fill(found_ids < 0, -math.inf)
            top_scores, top_ids = _sort_by_score_then_id(found_scores, found_ids)
            top_scores, top_ids = top_scores[:, :k], top_ids[:, :k]
            scores[todo], ids[todo] = top_scores, top_ids
            if self.name.startswith("hnsw") or depth >= self.n_corpus:
                break
            # The cut is certain when the K-th best is strictly better than anything FAISS did not return.
            bound = torch.from_numpy(faiss_scores[:, -1]).float()  # (r,) the K'-th FAISS score
            margin = flat_score_error(self.d) if self.name == "flat" else 0.0
            uncertain = ~(top_scores[:, -1].double() > bound.double() + margin)
            todo, depth = todo[uncertain.numpy()], min(self.n_corpus, 2 * depth)
        return scores, ids

    def _exact_scores(self, rows: np.ndarray, ids: torch.Tensor) -> torch.Tensor:
        """cos(q, c) of each query row and its candidates ids (r, K'), as metrics.top_k_cosine computes it:
        float64 sums rounded to float32."""
        out = torch.empty(ids.shape, dtype=torch.float32)
        per_slice = max(1, RESCORE_BLOCK_ELEMENTS // (ids.shape[1] * self.d))
        for s in range(0, len(rows), per_slice):
            q = F.normalize(self.queries[torch.from_numpy(rows[s : s + per_slice])].double(), dim=-1)  # (r, d)
            cand = ids[s : s + per_slice].clamp_min(0)  # (r, K')
            out[s : s + per_slice] = cosine_of_pairs(q, self.corpus[cand.reshape(-1)].view(*cand.shape, self.d))
        return out

    def query_milliseconds(self, k: int) -> tuple[float, float]:
        """(ms per query, one query per call over the first TIMED_SINGLE_QUERIES; ms per query, all in one call),
        FAISS's search alone, at depth k, on the index's threads (one by default: on a machine shared with
        other work, or with torch's own OpenMP threads, more threads mostly wait on each other)."""
        k = min(k, self.n_corpus)
        single = self.query_vectors[:TIMED_SINGLE_QUERIES]
        with faiss_threads(self.threads):
            start = time.perf_counter()
            for i in range(single.shape[0]):
                self.index.search(single[i : i + 1], k)
            one = (time.perf_counter() - start) / single.shape[0]
            start = time.perf_counter()
            self.index.search(self.query_vectors, k)
            batched = (time.perf_counter() - start) / self.n_queries
        return 1000 * one, 1000 * batched


def _sort_by_score_then_id(scores: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """metrics.sort_by_score_then_id with the missing results (id −1, score −inf) last."""
    missing = ids < 0
    scores, ids = sort_by_score_then_id(scores, torch.where(missing, torch.iinfo(torch.int64).max, ids))
    return scores, ids.masked_fill(ids == torch.iinfo(torch.int64).max, -1)


# ================================================================================================ metrics
def recall_vs_exact(found: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean over queries of |found ∩ exact| / |exact|: found, exact (Q, k) ids (−1 in found: nothing)."""
    hits = (found.unsqueeze(2) == exact.unsqueeze(1)).any(dim=2).sum(dim=1)  # (Q,)
    return (hits.double() / exact.shape[1]).mean().item()


def exact_top_ids(query_emb: torch.Tensor, corpus_emb: torch.Tensor, k: int, chunk_size: int) -> torch.Tensor:
    """The exact float32 top k ids (Q, k) by (−cosine, id), R = SCORE_BLOCK_ELEMENTS // C queries at a time as
    `metrics.ranking_metrics` goes, so that a (R, C) score block stays bounded whatever Q."""
    rows = max(1, SCORE_BLOCK_ELEMENTS // min(chunk_size, corpus_emb.shape[0]))
    return torch.cat([top_k_cosine(query_emb[q0 : q0 + rows], corpus_emb, k, chunk_size)[1]
                      for q0 in range(0, query_emb.shape[0], rows)])


def index_ir_metrics(
    query_emb: torch.Tensor, corpus_emb: torch.Tensor, relevant: Sequence[set[int]], names: Sequence[str], *,
    threads: int | None = 1, chunk_size: int = 50_000,
) -> dict[str, dict[str, float]]:
    """{index: the IR metrics, recall_vs_exact@10, bytes_per_vector, build_seconds, query_ms, query_ms_batched}
    of query_emb (Q, d) against corpus_emb (N, d) through each index."""
    query_emb, corpus_emb = torch.as_tensor(query_emb), torch.as_tensor(corpus_emb)
    check_indexes(names)
    n_queries, n_corpus = query_emb.shape[0], corpus_emb.shape[0]
    k = min(100, n_corpus)  # the deepest default cut-off (MAP@100)
    exact_top10 = exact_top_ids(query_emb, corpus_emb, min(10, n_corpus), chunk_size)  # (Q, 10)
    out = {}
    for name in names:
        search = IndexSearch(name, query_emb, corpus_emb, threads=threads)
        missing = -(n_queries * n_corpus) - 1  # an id whose key id + q·N is negative: never relevant

        def top_ids(q0: int, q1: int, depth: int, search=search) -> torch.Tensor:
            ids = search.top_ids(q0, q1, depth)
            return ids.masked_fill(ids < 0, missing)

        metrics = ranking_metrics(top_ids, n_queries, n_corpus, relevant, chunk_size=chunk_size)
        one, batched = search.query_milliseconds(k)
        metrics.update({"recall_vs_exact@10": recall_vs_exact(search.top_ids(0, n_queries, exact_top10.shape[1]),
                                                              exact_top10),
                        "bytes_per_vector": stored_bytes(search.index), "build_seconds": search.build_seconds,
                        "query_ms": one, "query_ms_batched": batched})
        out[name] = metrics
        del search  # one index in memory at a time
    return out


def evaluate_indexes(
    embedded: Mapping[str, tuple[torch.Tensor, torch.Tensor]], ir_sets: Sequence[IRSet], dims: Sequence[int],
    names: Sequence[str], *, threads: int | None = 1,
) -> dict[str, dict[int, dict[str, dict[str, float]]]]:
    """{index: {dim: {IR set name: {metric or figure: value}}}} from `evaluation.embed_sets`' embeddings ({}
    without IR sets or indexes)."""
    check_indexes(names)
    if not ir_sets or not names:
        return {}
    require_faiss()
    out: dict[str, dict[int, dict[str, dict[str, float]]]] = {name: {d: {} for d in dims} for name in names}
    for s in ir_sets:
        queries, corpus = embedded[s.name]  # (Q, D), (N, D)
        for d in dims:
            for name, metrics in index_ir_metrics(queries[:, :d], corpus[:, :d], s.relevant, names,
                                                  threads=threads).items():
                out[name][d][s.name] = metrics
    return out

