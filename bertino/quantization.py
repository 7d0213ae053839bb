"""Quantized retrieval: int8 and binary embeddings stored and scored as a vector index does, with the IR metrics
of bertino/metrics.py (the same exact top k, the same tie rule, the same chunking).

Shapes: Q queries, N corpus texts, d the evaluated (truncated) dim, B = ceil(d / 8) bytes of packed sign bits,
R query chunk, C corpus chunk, c a slice of MATMUL_ROWS corpus rows, K the rescoring depth, M candidates.

Every vector is first cut to its first d coordinates and L2-normalised (what cosine does): x ∈ R^d, |x| = 1.
The precision levels, each with what one stored vector costs:

    float32   cos(q, c), bertino.metrics.ir_metrics unchanged                                          4·d bytes
    int8      calibration on the corpus: per dimension i a range [lo_i, hi_i] — by default the minimum and
              maximum of x_ni over the N corpus vectors of the set (the min/max statistic of FAISS's
              ScalarQuantizer RS_minmax and of sentence-transformers' quantize_embeddings); with `quantile=p`
              the p and 1 − p quantiles instead (FAISS's RS_quantiles: a few outliers no longer stretch the
              range, values beyond it are clipped) — cut into 255 steps of step_i = (hi_i − lo_i) / 255
              (1 where hi_i = lo_i). A document is stored as
                  code_i = clip(round((x_i − lo_i) / step_i), 0, 255) − 128     ∈ {−128, …, 127}
              (round half to even) and decoded as x̂_i = lo_i + (code_i + 128) · step_i, within step_i / 2 of
              x_i inside the range. The score is the float query against the decoded document,
                  s(q, c) = Σ_i q_i · x̂_i(c)
              — asymmetric, as FAISS's IndexScalarQuantizer (SQ8) and Qdrant's scalar quantization score:
              the query is never quantized. (FAISS's own codes floor into 255 bins and decode to the bin's
              middle; its `sq8` index is evaluated by bertino/vector_indexes.py.)                          d bytes
    binary    sign bits b_i = [x_i > 0], 8 to a byte. The score is the Hamming distance
                  H(q, c) = popcount(bits(q) XOR bits(c))               (smaller is better)
              computed as a matrix product of the ±1 vectors, s(q, c) = Σ_i (2b_i(q) − 1)(2b_i(c) − 1)
              = d − 2·H(q, c) (larger is better: the same order).                                        B bytes
    binary+rescore-bits   the top K by Hamming, re-ranked by the float query against the documents' bits
              decoded to ±1: s = q · (2b(c) − 1). (sentence-transformers' rescoring decodes to 0/1 instead; the
              order is the same, q · b = (q · (2b − 1) + Σ_i q_i) / 2 and Σ_i q_i is the query's own constant.)
                                                                                                      B bytes
    binary+rescore-int8   the same top K re-ranked by the int8 score above, s = q · x̂(c)          B + d bytes

Why the int8 score is the float query against decoded documents: the dot product of two offset codes,
Σ_i qcode_i · ccode_i, is about Σ_i (q_i − m_i)(x_i − m_i) / step_i² with m_i the middle of dimension i's range
— every dimension shifted and weighted by 1 / step_i², not the cosine — and no vector index scores that way
(FAISS SQ8 decodes, Qdrant corrects the product for the offset, USearch's i8 codes are symmetric, without one).

Ranks after the K rescored ones keep their Hamming order, so every cut-off is defined (K ≥ 10 rescores all of
NDCG@10); a depth K ≥ N rescores the whole corpus. Ties are broken by corpus id, smaller first, as in the float
path: the binary scores are integers (computed exactly, whatever the summation order: `exact_dtype`), and the
int8 and rescored scores are float64 sums rounded to float32, so no result depends on the chunk size. Storage
relative to the full float32 vector: bytes / (4·D). The stored codes (N·d bytes of int8 and N·B of bits, what the
index itself holds) are the only memory that grows with N; scores are computed in the (R, C) blocks of
bertino/metrics.py.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from .errors import ConfigError, DataError
from .eval_names import PRECISIONS, RESCORED, bytes_per_vector, check_precisions  # noqa: F401 (importable here)
from .eval_tables import format_precision_table  # noqa: F401 (moved to eval_tables.py; importable here as before)
from .metrics import MATMUL_ROWS, check_ir_embeddings, ir_metrics, ranking_metrics, sort_by_score_then_id, top_k

if TYPE_CHECKING:
    from .eval_sets import IRSet

RESCORE_BLOCK_ELEMENTS = 1 << 20  # r·K·d per rescoring slice: each float64 temporary 8 MB
QUANTILE_BLOCK_ELEMENTS = 1 << 23  # N·b per block of b dimensions sorted for the quantiles: 64 MB of float64


def result_levels(precisions: Sequence[str], rescore: int | None) -> list[str]:
    """The result rows for the requested precisions: each of them, and the two rescored ones after "binary"."""
    check_precisions(precisions, rescore)
    out = []
    for p in precisions:
        out += [p, *RESCORED] if p == "binary" and rescore is not None else [p]
    return out


# ================================================================================================ the codes
def unit(x: torch.Tensor) -> torch.Tensor:
    """x (n, d) → float64 rows of length 1 (a zero row stays zero, as in F.normalize)."""
    return F.normalize(x.double(), dim=-1)


class Int8Calibration(NamedTuple):
    lo: torch.Tensor  # (d,) float64: the bottom of each dimension's range
    step: torch.Tensor  # (d,) float64: (hi − lo) / 255 per dimension (1 where hi = lo)


def calibrate_int8(corpus: torch.Tensor, quantile: float = 0.0) -> Int8Calibration:
    """Each dimension's range over the unit corpus vectors (N, d): [min, max] (quantile 0), else the `quantile` and
    1 − `quantile` quantiles (linear interpolation between order statistics, as numpy.quantile). Min/max go
    MATMUL_ROWS rows at a time (exact, so the chunking does not matter); quantiles sort a block of dimensions at
    a time, QUANTILE_BLOCK_ELEMENTS values of it."""
    if not 0.0 <= quantile < 0.5:
        raise ConfigError(f"int8 calibration: the quantile must be in [0, 0.5), found {quantile}")
    n, d = corpus.shape
    if quantile == 0.0:
        lo = torch.full((d,), math.inf, dtype=torch.float64)  # (d,)
        hi = torch.full((d,), -math.inf, dtype=torch.float64)  # (d,)
        for s in range(0, n, MATMUL_ROWS):
            x = unit(corpus[s : s + MATMUL_ROWS])  # (c, d)
            lo, hi = torch.minimum(lo, x.amin(dim=0)), torch.maximum(hi, x.amax(dim=0))
    else:
        norms = torch.cat([torch.linalg.vector_norm(corpus[s : s + MATMUL_ROWS].double(), dim=1)
                           for s in range(0, n, MATMUL_ROWS)]).clamp_min(1e-12)  # (N,) as F.normalize's eps
        lo, hi = torch.empty(d, dtype=torch.float64), torch.empty(d, dtype=torch.float64)
        width = max(1, QUANTILE_BLOCK_ELEMENTS // n)  # dimensions per block
        for j in range(0, d, width):
            column = (corpus[:, j : j + width].double() / norms.unsqueeze(1)).sort(dim=0).values  # (N, b) sorted
            lo[j : j + width], hi[j : j + width] = _interpolate(column, quantile), _interpolate(column, 1 - quantile)
    step = torch.where(hi > lo, (hi - lo) / 255, torch.ones_like(lo))  # (d,)
    return Int8Calibration(lo, step)


def _interpolate(sorted_columns: torch.Tensor, p: float) -> torch.Tensor:
    """The p-quantile of each column of sorted values (N, b): v[⌊t⌋] + (t − ⌊t⌋)(v[⌊t⌋+1] − v[⌊t⌋]), t = p(N − 1)."""
    t = p * (sorted_columns.shape[0] - 1)
    below = math.floor(t)
    above = min(below + 1, sorted_columns.shape[0] - 1)
    return sorted_columns[below] + (t - below) * (sorted_columns[above] - sorted_columns[below])  # (b,)


def int8_codes(x: torch.Tensor, cal: Int8Calibration) -> torch.Tensor:
    """code_i = clip(round((x_i − lo_i) / step_i), 0, 255) − 128 of the unit rows of x (n, d) → int8 (n, d)."""
    out = torch.empty(x.shape, dtype=torch.int8)
    for s in range(0, x.shape[0], MATMUL_ROWS):
        steps = torch.round((unit(x[s : s + MATMUL_ROWS]) - cal.lo) / cal.step).clamp(0, 255)  # (c, d) 0..255
        out[s : s + MATMUL_ROWS] = (steps - 128).to(torch.int8)
    return out


def dequantize_int8(codes: torch.Tensor, cal: Int8Calibration) -> torch.Tensor:
    """x̂_i = lo_i + (code_i + 128) · step_i: int8 codes (..., d) → float64 (..., d)."""
    return codes.double().add_(128).mul_(cal.step).add_(cal.lo)  # in place: one temporary


BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)  # numpy.packbits' order: first bit high


def binary_codes(x: torch.Tensor) -> torch.Tensor:
    """Sign bits [x_i > 0] of x (n, d), 8 to a byte as numpy.packbits packs them → uint8 (n, B), MATMUL_ROWS rows
    at a time (the unpacked bits of a whole corpus would take as much memory as its float32 vectors)."""
    n, d = x.shape
    out = torch.empty(n, math.ceil(d / 8), dtype=torch.uint8)  # (n, B)
    for s in range(0, n, MATMUL_ROWS):
        rows = x[s : s + MATMUL_ROWS]
        bits = torch.zeros(rows.shape[0], out.shape[1] * 8, dtype=torch.uint8)  # (c, 8B), zero padding past d
        bits[:, :d] = rows > 0  # the sign does not change with normalisation
        out[s : s + MATMUL_ROWS] = (bits.view(rows.shape[0], -1, 8) * BIT_WEIGHTS).sum(dim=2, dtype=torch.uint8)
    return out  # each byte a sum of distinct powers of two: no carry


def signs(packed: torch.Tensor, d: int) -> torch.Tensor:
    """Packed bits (n, B) → the ±1 vectors 2b − 1 of their first d bits, float64 (n, d)."""
    bits = (packed.unsqueeze(-1) & BIT_WEIGHTS) != 0  # (n, B, 8)
    return bits.view(packed.shape[0], -1)[:, :d].double().mul_(2).sub_(1)  # in place: one temporary


# ================================================================================================ search
class QuantizedIndex:
    """One eval set at one dim d, stored as a vector index would: the float queries (int8 is scored, and binary
    rescored, against them), the int8 codes (calibrated on this corpus) and the packed sign bits.
    `top_ids(level)` is the exact ranking `metrics.ranking_metrics` scores."""

    def __init__(self, queries: torch.Tensor, corpus: torch.Tensor, *, chunk_size: int = 50_000,
                 rescore: int | None = None, int8_quantile: float = 0.0):
        check_ir_embeddings(queries, corpus)
        if not (_all_finite(queries) and _all_finite(corpus)):
            raise DataError("quantized search: the query or corpus embeddings hold NaN/inf")
        self.d, self.n_corpus, self.chunk_size = corpus.shape[1], corpus.shape[0], chunk_size
        self.rescore = None if rescore is None else min(rescore, self.n_corpus)  # K ≥ N: the whole corpus
        self.query_unit = unit(queries)  # (Q, d) the float query of int8 and of the rescoring
        self.cal = calibrate_int8(corpus, int8_quantile)
        self.corpus_int8 = int8_codes(corpus, self.cal)  # (N, d)
        self.query_bits, self.corpus_bits = binary_codes(queries), binary_codes(corpus)  # (Q|N, B)
        self._candidates: dict[tuple[int, int], torch.Tensor] = {}  # (q0, q1) → binary top M ids (R, M)

    def top_ids(self, level: str) -> Callable[[int, int, int], torch.Tensor]:
        """(q0, q1, K) → the ids (q1 − q0, K) of queries q0..q1−1's top K at `level`, best first."""
        if level == "int8":
            return lambda q0, q1, k: self._top(self._int8_scores(q0, q1), q1 - q0, k)
        if level == "binary":
            return lambda q0, q1, k: self._binary_candidates(q0, q1, k)[:, :k]
        if level in RESCORED:
            return lambda q0, q1, k: self._rescored(q0, q1, k, documents=level.rsplit("-", 1)[1])
        raise ConfigError(f"unknown quantized level {level!r}; expected int8, binary, {', '.join(RESCORED)}")

    def _top(self, scores_of, n_queries: int, k: int) -> torch.Tensor:
        return top_k(scores_of, n_queries, self.n_corpus, k, self.chunk_size)[1]

    def _int8_scores(self, q0: int, q1: int):
        q = self.query_unit[q0:q1]  # (R, d) float64

        def scores_of(c0: int, c1: int) -> torch.Tensor:  # Σ_i q_i · x̂_i, (R, C) float64 sums → float32
            return _blockwise(q, self.corpus_int8, c0, c1, lambda codes: dequantize_int8(codes, self.cal),
                              out_dtype=torch.float32)

        return scores_of

    def _binary_candidates(self, q0: int, q1: int, k: int) -> torch.Tensor:
        """The top max(k, K) by (Hamming, id), computed once per query chunk for every binary level."""
        m = max(k, self.rescore or 0)
        cached = self._candidates.get((q0, q1))
        if cached is None or cached.shape[1] < m:
            dtype = exact_dtype(self.d, 1)
            q = signs(self.query_bits[q0:q1], self.d).to(dtype)  # (R, d) ±1

            def scores_of(c0: int, c1: int) -> torch.Tensor:  # d − 2·Hamming, (R, C) integers
                return _blockwise(q, self.corpus_bits, c0, c1, lambda bits: signs(bits, self.d).to(dtype))

            cached = self._candidates[(q0, q1)] = self._top(scores_of, q1 - q0, m)  # (R, M)
        return cached

    def _rescored(self, q0: int, q1: int, k: int, documents: str) -> torch.Tensor:
        """The binary top K re-ranked by q · (decoded document), then the binary ranks K+1.. → ids (R, k)."""
        candidates = self._binary_candidates(q0, q1, k)  # (R, M), M ≥ max(k, K)
        K = self.rescore
        head = candidates[:, :K]  # (R, K)
        scores = torch.empty(head.shape, dtype=torch.float32)  # (R, K)
        rows = max(1, RESCORE_BLOCK_ELEMENTS // (K * self.d))  # queries per slice: an (r, K, d) block stays small
        for s in range(0, head.shape[0], rows):
            ids = head[s : s + rows]  # (r, K)
            if documents == "bits":
                docs = signs(self.corpus_bits[ids.reshape(-1)], self.d)  # (r·K, d) ±1
            else:
                docs = dequantize_int8(self.corpus_int8[ids.reshape(-1)], self.cal)  # (r·K, d) x̂
            q = self.query_unit[q0 + s : q0 + s + ids.shape[0]]  # (r, d)
            # An elementwise product summed along d, one row at a time: the same sum for any slice of queries.
            scores[s : s + rows] = docs.view(*ids.shape, self.d).mul_(q.unsqueeze(1)).sum(dim=-1)  # (r, K)
        _, head = sort_by_score_then_id(scores, head)  # (R, K) by (−rescored score, id)
        return torch.cat([head, candidates[:, K:]], dim=1)[:, :k]


def _all_finite(x: torch.Tensor) -> bool:
    """No NaN/inf in x (n, d), MATMUL_ROWS rows at a time (isfinite of a whole corpus makes float temporaries)."""
    return all(bool(torch.isfinite(x[s : s + MATMUL_ROWS]).all()) for s in range(0, x.shape[0], MATMUL_ROWS))


def exact_dtype(d: int, largest_product: int) -> torch.dtype:
    """float32 where a dot product of d integer products, each at most `largest_product` in size, can never leave
    the integers float32 holds exactly (|x| ≤ 2^24: every partial sum is exact, in any order), else float64."""
    return torch.float32 if d * largest_product <= 2**24 else torch.float64


def _blockwise(q: torch.Tensor, stored: torch.Tensor, c0: int, c1: int, decode,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """q (R, d) · decode(stored rows)ᵀ for corpus rows c0..c1−1, MATMUL_ROWS at a time → (R, C) in `out_dtype`
    (default q's dtype; a float64 product is rounded to float32 on assignment)."""
    scores = torch.empty(q.shape[0], c1 - c0, dtype=out_dtype or q.dtype)  # (R, C)
    for s in range(c0, c1, MATMUL_ROWS):
        e = min(s + MATMUL_ROWS, c1)
        scores[:, s - c0 : e - c0] = q @ decode(stored[s:e]).T  # (R, c)
    return scores


def quantized_ir_metrics(
    query_emb: torch.Tensor, corpus_emb: torch.Tensor, relevant: Sequence[set[int]], levels: Sequence[str], *,
    rescore: int | None = None, chunk_size: int = 50_000, int8_quantile: float = 0.0, **cutoffs: Sequence[int],
) -> dict[str, dict[str, float]]:
    """{level: the IR metrics} of query_emb (Q, d) against corpus_emb (N, d) at each level of `levels`
    (float32: `ir_metrics` itself). `cutoffs` as in `metrics.ranking_metrics`."""
    query_emb, corpus_emb = torch.as_tensor(query_emb), torch.as_tensor(corpus_emb)
    if any(level in RESCORED for level in levels) and rescore is None:
        raise ConfigError(f"levels {list(levels)}: rescoring needs a depth (rescore=K)")
    out = {}
    index = None
    for level in levels:
        if level == "float32":
            out[level] = ir_metrics(query_emb, corpus_emb, relevant, chunk_size=chunk_size, **cutoffs)
            continue
        if index is None:  # built once, shared by the quantized levels
            index = QuantizedIndex(query_emb, corpus_emb, chunk_size=chunk_size, rescore=rescore,
                                   int8_quantile=int8_quantile)
        out[level] = ranking_metrics(index.top_ids(level), query_emb.shape[0], corpus_emb.shape[0], relevant,
                                     chunk_size=chunk_size, **cutoffs)
    return out


def evaluate_precisions(
    embedded: Mapping[str, tuple[torch.Tensor, torch.Tensor]], ir_sets: Sequence[IRSet], dims: Sequence[int],
    precisions: Sequence[str], rescore: int | None = None, float_results: Mapping | None = None,
    int8_quantile: float = 0.0,
) -> dict[str, dict[int, dict[str, dict[str, float]]]]:
    """{level: {dim: {IR set name: {metric: value}}}} from `evaluation.embed_sets`' embeddings ({} without IR
    sets); float32 is taken from `float_results` ({dim: {set: metrics}}, as `score_sets` returns) when given."""
    wanted = result_levels(precisions, rescore)
    if not ir_sets:
        return {}
    out: dict[str, dict[int, dict[str, dict[str, float]]]] = {level: {d: {} for d in dims} for level in wanted}
    for s in ir_sets:
        queries, corpus = embedded[s.name]  # (Q, D), (N, D)
        for d in dims:
            todo = [lv for lv in wanted if not (lv == "float32" and float_results is not None)]
            for level, metrics in quantized_ir_metrics(queries[:, :d], corpus[:, :d], s.relevant, todo,
                                                       rescore=rescore, int8_quantile=int8_quantile).items():
                out[level][d][s.name] = metrics
            if "float32" in wanted and float_results is not None:
                out["float32"][d][s.name] = dict(float_results[d][s.name])
    return out
