"""bertino.vector_indexes: FAISS indexes in the evaluation loop. flat is the exact float32 path bit for bit (ties,
near-ties and tie groups deeper than the first search included), binary-flat the exact binary level, sq8 scores
the float query against FAISS's decoded codes as a numpy reference does (within 1e-6), HNSW reports its recall and
is the same on every run, and the bytes per vector are what the index holds. Small random data: milliseconds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

faiss = pytest.importorskip("faiss", reason="the faiss extra is not installed (pip install 'bertino[faiss]')")

from bertino import quantization as qz  # noqa: E402
from bertino import vector_indexes as vi  # noqa: E402
from bertino.errors import ConfigError  # noqa: E402
from bertino.metrics import IR_METRICS, ir_metrics, top_k_cosine  # noqa: E402

ALL = ["flat", "sq8", "binary-flat", "hnsw", "hnsw-sq8"]


def random_case(seed: int, n_queries: int = 23, n_corpus: int = 157, dim: int = 24):
    """Gaussian vectors, queries near a relevant document, 12 duplicated corpus rows (ties at every level)."""
    g = np.random.default_rng(seed)
    corpus = g.normal(size=(n_corpus, dim)).astype(np.float32)
    corpus[-12:] = corpus[:12]
    relevant = [set(int(j) for j in g.choice(n_corpus, size=g.integers(1, 4), replace=False))
                for _ in range(n_queries)]
    queries = np.stack([corpus[min(r)] + 0.9 * g.normal(size=dim) for r in relevant]).astype(np.float32)
    return torch.from_numpy(queries), torch.from_numpy(corpus), relevant


def count_searches(search: vi.IndexSearch) -> list[int]:
    """Record the depth of every FAISS search the IndexSearch makes."""
    depths, original = [], search.faiss_search
    search.faiss_search = lambda queries, k: (depths.append(k), original(queries, k))[1]
    return depths


# ================================================================================================ exact indexes
@pytest.mark.parametrize("d", [24, 13])
def test_flat_is_the_exact_float32_path_bit_for_bit(d):
    queries, corpus, relevant = random_case(0)
    q, c = queries[:, :d], corpus[:, :d]
    got = vi.index_ir_metrics(q, c, relevant, ["flat"])["flat"]
    assert {m: got[m] for m in IR_METRICS} == ir_metrics(q, c, relevant)  # every metric, to the bit
    assert got["recall_vs_exact@10"] == 1.0
    search = vi.IndexSearch("flat", q, c)
    for k in (10, c.shape[0]):
        scores, ids = search.ranked(k)
        want_scores, want_ids = top_k_cosine(q, c, k)
        assert torch.equal(ids, want_ids) and torch.equal(scores, want_scores)


def test_binary_flat_is_the_exact_binary_level():
    queries, corpus, relevant = random_case(1, dim=21)  # 21 bits: FAISS stores 3 bytes, the last one padded
    got = vi.index_ir_metrics(queries, corpus, relevant, ["binary-flat"])["binary-flat"]
    assert {m: got[m] for m in IR_METRICS} == qz.quantized_ir_metrics(queries, corpus, relevant, ["binary"])["binary"]
    index = qz.QuantizedIndex(queries, corpus)
    n = corpus.shape[0]
    assert torch.equal(vi.IndexSearch("binary-flat", queries, corpus).ranked(n)[1],
                       index.top_ids("binary")(0, queries.shape[0], n))


@pytest.mark.parametrize("name", ["flat", "sq8", "binary-flat"])
def test_a_tie_group_deeper_than_the_first_search_is_searched_to_its_end(name):
    """250 copies of one vector, the queries' best match: the top 100 are the 100 smallest of their ids, while the
    first search (depth 200) returns 200 of the 250 in FAISS's own order; the search goes deeper until it is sure."""
    g = np.random.default_rng(2)
    corpus = g.normal(size=(300, 16)).astype(np.float32)
    corpus[20:270] = corpus[5]
    queries = torch.from_numpy((corpus[[5, 5, 5]] + 0.01 * g.normal(size=(3, 16))).astype(np.float32))
    corpus = torch.from_numpy(corpus)
    search = vi.IndexSearch(name, queries, corpus)
    depths = count_searches(search)
    ids = search.ranked(100)[1]
    assert depths == [200, 300]
    tied = [5] + list(range(20, 270))
    assert ids.tolist() == [tied[:100]] * 3


def test_flat_searches_deeper_when_faiss_s_float32_sums_could_have_missed_a_document():
    """Documents whose cosines to the query differ by ~1e-8, less than FAISS's float32 sums can tell apart: its top
    200 need not hold the exact top 100, so the K-th exact score must beat the 200th FAISS score by the error
    bound before the search stops (with no margin, this data gives wrong rankings)."""
    for seed in range(3):
        g = np.random.default_rng(seed)
        d, n = 768, 400
        base = g.normal(size=d)
        base /= np.linalg.norm(base)
        noise = g.normal(size=(n, d))
        noise -= (noise @ base)[:, None] * base
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        corpus = base + np.sqrt(2 * g.uniform(0, 3e-8, size=n))[:, None] * noise  # cos(base, c) = 1 − U(0, 3e-8)
        query = torch.from_numpy((base + 1e-3 * g.normal(size=d)).astype(np.float32)[None])
        corpus = torch.from_numpy(corpus.astype(np.float32))
        search = vi.IndexSearch("flat", query, corpus)
        depths = count_searches(search)
        assert torch.equal(search.ranked(100)[1], top_k_cosine(query, corpus, 100)[1]), seed
        assert depths == [200, 400]


def test_sq8_scores_the_float_query_against_faiss_s_decoded_codes():
    """A numpy reference of FAISS's SQ8 with the corpus' min/max: code = ⌊255·clip((x − min)/(max − min))⌋ in
    float32, x̂ = min + (code + ½)/255 · (max − min), score = q · x̂ in float64. FAISS's returned scores equal it
    within 1e-6, and what it returns is the reference top k (up to scores within 1e-6 of the cut)."""
    queries, corpus, _ = random_case(3, n_queries=30, n_corpus=200, dim=20)
    q = vi.unit_float32(queries).astype(np.float64)  # (Q, d)
    c = vi.unit_float32(corpus)  # (N, d) float32, as FAISS receives it
    lo, span = c.min(axis=0), c.max(axis=0) - c.min(axis=0)
    codes = np.floor(np.float32(255) * np.clip((c - lo) / span, 0, 1)).astype(np.int64)  # float32 arithmetic
    decoded = lo.astype(np.float64) + (codes + 0.5) / 255 * span.astype(np.float64)  # (N, d)
    reference = q @ decoded.T  # (Q, N)

    search = vi.IndexSearch("sq8", queries, corpus)
    faiss_scores, faiss_ids = search.faiss_search(search.query_vectors, 10)
    np.testing.assert_allclose(faiss_scores, np.take_along_axis(reference, faiss_ids, axis=1), rtol=0, atol=1e-6)
    kth = np.sort(reference, axis=1)[:, -10]  # the reference's 10th best score per query
    assert (np.take_along_axis(reference, faiss_ids, axis=1) >= kth[:, None] - 1e-6).all()
    scores, ids = search.ranked(10)
    np.testing.assert_allclose(scores.numpy(), np.take_along_axis(reference, ids.numpy(), axis=1), atol=1e-6)
    assert (np.diff(scores.numpy(), axis=1) <= 0).all()  # best first

    trained = faiss.IndexScalarQuantizer(c.shape[1], faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    trained.train(c)  # FAISS's own RS_minmax training on the whole corpus
    trained.add(c)
    assert np.array_equal(faiss.vector_to_array(trained.sq.trained), faiss.vector_to_array(search.index.sq.trained))
    assert np.array_equal(faiss.vector_to_array(trained.codes), faiss.vector_to_array(search.index.codes))
    assert np.array_equal(faiss.vector_to_array(trained.codes).reshape(codes.shape), codes)


def test_the_exact_top_10_behind_recall_is_computed_in_bounded_blocks(monkeypatch):
    queries, corpus, _ = random_case(7)
    whole = top_k_cosine(queries, corpus, 10)[1]
    monkeypatch.setattr(vi, "SCORE_BLOCK_ELEMENTS", 5 * 40)  # 5 queries × chunks of 40 corpus rows
    assert torch.equal(vi.exact_top_ids(queries, corpus, 10, chunk_size=40), whole)


# ================================================================================================ approximate
def test_hnsw_reports_its_recall_and_is_the_same_on_every_run():
    queries, corpus, relevant = random_case(4, n_queries=40, n_corpus=600, dim=32)
    first = vi.index_ir_metrics(queries, corpus, relevant, ["hnsw", "hnsw-sq8"])
    again = vi.index_ir_metrics(queries, corpus, relevant, ["hnsw", "hnsw-sq8"])
    for name in ("hnsw", "hnsw-sq8"):
        assert 0.5 < first[name]["recall_vs_exact@10"] <= 1.0
        assert {m: first[name][m] for m in IR_METRICS} == {m: again[name][m] for m in IR_METRICS}  # one thread
        assert first[name]["build_seconds"] > 0 and first[name]["query_ms"] > 0 and first[name]["query_ms_batched"] > 0


def test_a_result_an_approximate_index_did_not_find_is_never_relevant(monkeypatch):
    """HNSW may return fewer than k ids (−1): those ranks count as misses, never as some document."""
    queries, corpus, relevant = random_case(5)
    relevant = [r | {corpus.shape[0] - 1} for r in relevant]  # the last id relevant everywhere: a −1 must not hit it
    original = vi.IndexSearch.faiss_search

    def half_found(self, q, k):
        scores, ids = original(self, q, k)
        ids[:, 1::2] = -1  # every second result missing
        return scores, ids

    monkeypatch.setattr(vi.IndexSearch, "faiss_search", half_found)
    got = vi.index_ir_metrics(queries, corpus, relevant, ["hnsw"])["hnsw"]
    search = vi.IndexSearch("hnsw", queries, corpus)
    ids = search.ranked(100)[1]
    assert (ids[:, 50:] == -1).all() and (ids[:, :50] >= 0).all()  # the found ones first, by (−score, id)
    hits = [[j >= 0 and j in rel for j in row] for row, rel in zip(ids.tolist(), relevant)]  # (Q, 100)
    recall = [sum(h[:10]) / len(r) for h, r in zip(hits, relevant)]
    average_precision = [sum(sum(h[: i + 1]) / (i + 1) for i in range(100) if h[i]) / min(100, len(r))
                         for h, r in zip(hits, relevant)]
    assert got["recall@10"] == pytest.approx(np.mean(recall), abs=1e-12)
    assert got["map@100"] == pytest.approx(np.mean(average_precision), abs=1e-12)  # ranks 51..100 found nothing


# ================================================================================================ bytes and errors
def test_bytes_per_vector_are_what_the_index_holds():
    queries, corpus, _ = random_case(6, n_corpus=300, dim=20)
    sizes = {name: vi.stored_bytes(vi.build_index(name, corpus)[0]) for name in ALL}
    assert sizes["flat"] == 80 and sizes["sq8"] == 20 and sizes["binary-flat"] == 3
    for name in ("hnsw", "hnsw-sq8"):
        index = vi.build_index(name, corpus)[0]
        serialized = len(faiss.serialize_index(index))  # everything FAISS writes for it
        assert sizes[name] * 300 <= serialized <= sizes[name] * 300 + 1024  # the same, but for the file's header
        assert sizes[name] > sizes["flat" if name == "hnsw" else "sq8"] + 2 * vi.HNSW_M * 4 - 1  # the level-0 links


def test_unknown_index_names_and_missing_faiss_are_config_errors(monkeypatch):
    with pytest.raises(ConfigError, match="--index: expected distinct names from flat, sq8, binary-flat, hnsw, "
                                          "hnsw-sq8, found ivf"):
        vi.evaluate_indexes({}, [], [8], ["ivf"])
    import builtins

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "faiss" else real_import(name, *a, **k))
    with pytest.raises(ConfigError, match=r"needs the faiss package: pip install 'bertino\[faiss\]'"):
        vi.require_faiss()
