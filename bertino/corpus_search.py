"""The exact top k of a large corpus by cosine, in bounded memory: chunked, on any device, FAISS where installed.

Shapes: R queries in a block, N corpus rows, C corpus rows per chunk, D dims, K results per query, K' = K + slack.

    corpus_top_k(queries (R, D), corpus (N, D), K, C, search, device) → scores (R, K) float32, ids (R, K) int64

The order is `evaluation.top_k_cosine`'s: by (−cos, corpus id), cos accumulated in float64 and rounded to float32,
so results depend neither on C nor on the method. The corpus may be a tensor over a memory-mapped file: only C
rows at a time are read (and moved to `device`). Two methods:

* "exact": evaluation.top_k_cosine per corpus chunk, the chunks' top K merged (the top K of a union is the top K
  of the chunks' top Ks). Working memory: an (R, C) float32 score block plus (C, D) on the device.
* "faiss" (`pip install 'bertino[faiss]'`): `faiss.knn` finds the top K' candidates per query by float32 inner
  product per chunk (multi-threaded BLAS, about twice the float64 speed); the candidates are re-scored exactly
  and sorted, and a query's result is accepted only when it provably equals the exact one: every corpus row FAISS
  did not return has a float32 score ≤ f_cut (its K'-th), so an exact score ≤ f_cut + δ (δ bounds float32
  rounding of a D-term dot product of unit vectors: D·2⁻²³ + 10⁻⁶); if the exact K-th best score is above that,
  nothing left out can enter the top K. The rare query that fails the test is searched by "exact".
* "auto": "faiss" when faiss is installed and the device is a CPU, else "exact".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .metrics import cosine_of_pairs, sort_by_score_then_id, top_k_cosine

SEARCH = ("auto", "exact", "faiss")
FAISS_SLACK = 32  # candidates beyond K per query that FAISS returns, so that its float32 order rarely matters


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def corpus_top_k(query_emb: torch.Tensor, corpus_emb: torch.Tensor, k: int, chunk_size: int, search: str = "exact",
                 device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, k) float32 scores and int64 corpus ids, best first by (−cos, id); k ≤ N. Results on the CPU."""
    device = torch.device(device or "cpu")
    if search == "auto":
        search = "faiss" if device.type == "cpu" and faiss_available() else "exact"
    if search == "faiss":
        return _faiss_top_k(query_emb, corpus_emb, k, chunk_size)
    return exact_top_k(query_emb, corpus_emb, k, chunk_size, device)


def exact_top_k(query_emb: torch.Tensor, corpus_emb: torch.Tensor, k: int, chunk_size: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """top_k_cosine over the corpus C rows at a time (each chunk moved to `device`), the chunks' results merged."""
    if device.type == "cpu":  # top_k_cosine itself reads the corpus C rows at a time
        return top_k_cosine(query_emb, corpus_emb, k, chunk_size)
    q = query_emb.to(device)
    best_scores = torch.empty(q.shape[0], 0)
    best_ids = torch.empty(q.shape[0], 0, dtype=torch.int64)
    for c0 in range(0, corpus_emb.shape[0], chunk_size):
        chunk = corpus_emb[c0:c0 + chunk_size].to(device)  # (C, D): the only corpus rows in working memory
        scores, ids = top_k_cosine(q, chunk, min(k, chunk.shape[0]), chunk_size)  # (R, k')
        best_scores = torch.cat([best_scores, scores.cpu()], dim=1)
        best_ids = torch.cat([best_ids, ids.cpu() + c0], dim=1)
        best_scores, best_ids = sort_by_score_then_id(best_scores, best_ids)
        best_scores, best_ids = best_scores[:, :k], best_ids[:, :k]  # (R, k)
    return best_scores, best_ids


def _faiss_top_k(query_emb: torch.Tensor, corpus_emb: torch.Tensor, k: int,
                 chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    import faiss
    import numpy as np

    R, N, D = query_emb.shape[0], corpus_emb.shape[0], query_emb.shape[1]
    kk = min(k + FAISS_SLACK, N)
    xq = np.ascontiguousarray(F.normalize(query_emb.float(), dim=-1).numpy())  # (R, D) float32 unit rows
    cand_f = np.full((R, 0), -np.inf, dtype=np.float32)  # running top K' FAISS scores
    cand_i = np.zeros((R, 0), dtype=np.int64)
    for c0 in range(0, N, chunk_size):
        xb = np.ascontiguousarray(F.normalize(corpus_emb[c0:c0 + chunk_size].float(), dim=-1).numpy())  # (C, D)
        f, i = faiss.knn(xq, xb, min(kk, xb.shape[0]), metric=faiss.METRIC_INNER_PRODUCT)  # (R, k') each
        cand_f, cand_i = np.concatenate([cand_f, f], 1), np.concatenate([cand_i, i + c0], 1)
        top = np.argsort(-cand_f, axis=1, kind="stable")[:, :kk]
        cand_f, cand_i = np.take_along_axis(cand_f, top, 1), np.take_along_axis(cand_i, top, 1)  # (R, K')
    # exact scores of the candidates, exactly as top_k_cosine computes them
    q = F.normalize(query_emb.double(), dim=-1)  # (R, D)
    ids = torch.from_numpy(cand_i)  # (R, K')
    exact = cosine_of_pairs(q, corpus_emb[ids.flatten()].view(R, kk, D))  # (R, K')
    scores, ids = sort_by_score_then_id(exact, ids)
    scores, ids = scores[:, :k], ids[:, :k]  # (R, k)
    if kk == N:  # FAISS returned the whole corpus: nothing was left out
        return scores, ids
    delta = D * 2.0 ** -23 + 1e-6
    cut = torch.from_numpy(cand_f[:, -1]).double()  # (R,) the K'-th FAISS score
    unproven = torch.nonzero(~(scores[:, -1].double() > cut + delta)).flatten()  # (u,)
    if len(unproven):
        s, i = exact_top_k(query_emb[unproven], corpus_emb, k, chunk_size, torch.device("cpu"))
        scores[unproven], ids[unproven] = s, i
    return scores, ids
