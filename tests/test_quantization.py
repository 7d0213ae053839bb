"""bertino.quantization: int8, binary and rescored search against a naive numpy reference (quantize with numpy,
brute-force every score, rank with the same tie rule), chunk independence, the storage figures and the table."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from bertino import quantization as qz
from bertino.errors import ConfigError, DataError
from bertino.eval_sets import IRSet
from bertino.eval_tables import format_precision_table
from bertino.evaluation import embed_sets, score_sets
from bertino.metrics import ir_metrics

LEVELS = ["float32", "int8", "binary", "binary+rescore-bits", "binary+rescore-int8"]


# ================================================================================================ naive reference
def naive_rankings(queries: np.ndarray, corpus: np.ndarray, level: str, rescore: int | None = None,
                   quantile: float = 0.0) -> list[list[int]]:
    """Each query's whole ranking of the corpus, best first, ties by corpus id: numpy, one query at a time."""
    q, c = queries.astype(np.float64), corpus.astype(np.float64)
    qu = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    cu = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    n, d = c.shape
    lo, hi = np.quantile(cu, quantile, axis=0), np.quantile(cu, 1 - quantile, axis=0)  # quantile 0: min and max
    step = np.where(hi > lo, (hi - lo) / 255, 1.0)

    def int8(x):
        return (np.clip(np.round((x - lo) / step), 0, 255) - 128).astype(np.int8)

    def ranked(key) -> list[int]:
        return sorted(range(n), key=key)

    out = []
    for i in range(len(q)):
        if level == "float32":
            s = [float(np.float32(qu[i] @ cu[j])) for j in range(n)]
            out.append(ranked(lambda j: (-s[j], j)))
        elif level == "int8":  # the float query against the decoded documents, as FAISS SQ8 scores
            decoded = lo + (int8(cu).astype(np.float64) + 128) * step  # (N, d)
            s = [float(np.float32(qu[i] @ decoded[j])) for j in range(n)]
            out.append(ranked(lambda j: (-s[j], j)))
        else:
            qb, cb = np.packbits(q[i : i + 1] > 0, axis=1), np.packbits(c > 0, axis=1)
            hamming = np.bitwise_count(np.bitwise_xor(qb, cb)).sum(axis=1)  # (N,) popcount of the XOR
            ranking = ranked(lambda j: (hamming[j], j))
            if level != "binary":
                k = min(rescore, n)
                if level == "binary+rescore-bits":
                    docs = np.unpackbits(cb, axis=1)[:, :d].astype(np.float64) * 2 - 1
                else:
                    docs = lo + (int8(cu).astype(np.float64) + 128) * step
                s = {j: float(np.float32(qu[i] @ docs[j])) for j in ranking[:k]}
                ranking = sorted(ranking[:k], key=lambda j: (-s[j], j)) + ranking[k:]
            out.append(ranking)
    return out


def naive_metrics(rankings: list[list[int]], relevant) -> dict[str, float]:
    """The module docstring's formulas on whole rankings, literally."""
    out: dict[str, list[float]] = {}
    for ranking, rel in zip(rankings, relevant):
        hit = [1.0 if j in rel else 0.0 for j in ranking]

        def add(name, value):
            out.setdefault(name, []).append(value)

        for k in (1, 3, 5, 10):
            add(f"accuracy@{k}", float(sum(hit[:k]) > 0))
        add("precision@10", sum(hit[:10]) / 10)
        add("recall@10", sum(hit[:10]) / len(rel))
        add("mrr@10", next((1 / (i + 1) for i in range(min(10, len(hit))) if hit[i]), 0.0))
        dcg = sum(hit[i] / math.log2(i + 2) for i in range(min(10, len(hit))))
        add("ndcg@10", dcg / sum(1 / math.log2(i + 2) for i in range(min(10, len(rel)))))
        found, total = 0, 0.0
        for i in range(min(100, len(hit))):
            if hit[i]:
                found += 1
                total += found / (i + 1)
        add("map@100", total / min(100, len(rel)))
    return {name: sum(v) / len(v) for name, v in out.items()}


def assert_close(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name in want:
        assert got[name] == pytest.approx(want[name], abs=1e-12), name


def random_case(seed: int, n_queries: int = 23, n_corpus: int = 157, dim: int = 24):
    """Gaussian vectors; queries near a relevant document; 12 duplicated corpus rows, so every level has ties."""
    g = np.random.default_rng(seed)
    corpus = g.normal(size=(n_corpus, dim)).astype(np.float32)
    corpus[-12:] = corpus[:12]  # the same vector under two ids: ties broken by id
    relevant = [set(int(j) for j in g.choice(n_corpus, size=g.integers(1, 4), replace=False))
                for _ in range(n_queries)]
    queries = np.stack([corpus[min(r)] + 0.9 * g.normal(size=dim) for r in relevant]).astype(np.float32)
    return queries, corpus, relevant


# ================================================================================================ the reference
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("d", [24, 13, 5])  # 13 and 5: bits that do not fill the last byte
def test_every_level_equals_the_naive_reference_on_random_data(seed, d):
    queries, corpus, relevant = random_case(seed)
    q, c = queries[:, :d], corpus[:, :d]
    for rescore in (1, 7, 40):
        got = qz.quantized_ir_metrics(torch.from_numpy(q), torch.from_numpy(c), relevant, LEVELS, rescore=rescore)
        for level in LEVELS:
            assert_close(got[level], naive_metrics(naive_rankings(q, c, level, rescore), relevant))


def test_the_reference_is_not_vacuous():
    """On this data the levels rank differently, and rescoring changes the binary ranking."""
    queries, corpus, _ = random_case(0)
    q, c = queries[:, :13], corpus[:, :13]
    rankings = {lv: naive_rankings(q, c, lv, rescore=7) for lv in LEVELS}
    for a in LEVELS:
        for b in LEVELS:
            if a < b:
                assert rankings[a] != rankings[b], (a, b)


def test_every_level_equals_the_naive_reference_on_a_tiny_model_s_embeddings(tiny_model_dir):
    from bertino import SentenceEncoder

    words = "il gatto cane casa libro tabella testo pagina documento formato cella roma milano acqua sole mare"
    words = words.split()
    corpus = [f"{words[i % 16]} {words[(i * 7) % 16]} {words[(i * 3 + 1) % 16]} {i}" for i in range(60)]
    queries = [f"{words[i % 16]} {words[(i * 7) % 16]} {i}" for i in range(0, 60, 3)]
    relevant = [{j} for j in range(0, 60, 3)]
    s = IRSet("tiny", queries, corpus, relevant)
    embedded = embed_sets(SentenceEncoder.from_pretrained(tiny_model_dir), [s], [], show_progress_bar=False)
    q, c = (x.numpy() for x in embedded["tiny"])
    for d in (32, 16, 8):
        got = qz.quantized_ir_metrics(torch.from_numpy(q[:, :d]), torch.from_numpy(c[:, :d]), relevant, LEVELS,
                                      rescore=10)
        for level in LEVELS:
            assert_close(got[level], naive_metrics(naive_rankings(q[:, :d], c[:, :d], level, 10), relevant))


def test_float32_is_the_float_path_bit_for_bit():
    queries, corpus, relevant = random_case(3)
    got = qz.quantized_ir_metrics(torch.from_numpy(queries), torch.from_numpy(corpus), relevant, ["float32"])
    assert got["float32"] == ir_metrics(torch.from_numpy(queries), torch.from_numpy(corpus), relevant)


# ================================================================================================ ties and chunks
@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_results_do_not_depend_on_the_chunk_size(chunk_size, monkeypatch):
    queries, corpus, relevant = random_case(2)
    q, c = torch.from_numpy(queries[:, :13]), torch.from_numpy(corpus[:, :13])
    whole = qz.quantized_ir_metrics(q, c, relevant, LEVELS, rescore=7, chunk_size=50_000)
    monkeypatch.setattr(qz, "MATMUL_ROWS", 5)  # decoded corpus slices of 5 rows
    monkeypatch.setattr(qz, "RESCORE_BLOCK_ELEMENTS", 200)  # rescoring slices of 200 // (7·13) = 2 queries
    assert qz.quantized_ir_metrics(q, c, relevant, LEVELS, rescore=7, chunk_size=chunk_size) == whole  # bitwise


def test_ties_go_to_the_smaller_corpus_id_at_every_level():
    # Documents 1, 2, 3 are the same vector (every score tied), the query's nearest; document 0 is far.
    corpus = torch.tensor([[-1.0, -1.0, 0.5], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [0.2, -0.9, 0.1]])
    query = torch.tensor([[1.0, 0.9, 1.1]])
    index = qz.QuantizedIndex(query, corpus, chunk_size=2, rescore=3)
    for level in LEVELS[1:]:
        assert index.top_ids(level)(0, 1, 3).tolist() == [[1, 2, 3]], level


def test_a_rescore_depth_at_or_beyond_the_corpus_size_rescores_every_document():
    """K ≥ N re-ranks the whole corpus (K is clamped to N, not N − 1): whole rankings equal the naive reference."""
    queries, corpus, _ = random_case(0)
    q, c = queries[:, :13], corpus[:, :13]
    n = c.shape[0]
    for rescore in (n - 1, n, n + 5):
        index = qz.QuantizedIndex(torch.from_numpy(q), torch.from_numpy(c), chunk_size=64, rescore=rescore)
        for level in qz.RESCORED:
            got = index.top_ids(level)(0, q.shape[0], n).tolist()  # (Q, N): every rank
            assert got == naive_rankings(q, c, level, rescore), (rescore, level)


def test_rescored_ties_go_to_the_smaller_id_not_to_the_hamming_order():
    """Documents whose rescored scores tie but whose Hamming distances differ: the tie goes to the smaller corpus
    id, as everywhere, not to the document the binary search ranked first."""
    # bits: q · (2b − 1) = (0.5 − 0.25 − 0.25)/|q| = 0 for documents 0 and 1 alike (exactly: halves of one number),
    # but document 1 differs from the query's bits in 1 place and document 0 in 2, so Hamming ranks 1 before 0.
    query = torch.tensor([[0.5, 0.25, 0.25]])
    corpus = torch.tensor([[0.9, -0.3, -0.3], [-0.9, 0.3, 0.3], [-0.5, -0.5, -0.5]])
    index = qz.QuantizedIndex(query, corpus, chunk_size=2, rescore=3)
    assert index.top_ids("binary")(0, 1, 3).tolist() == [[1, 0, 2]]  # the Hamming order
    assert index.top_ids("binary+rescore-bits")(0, 1, 3).tolist() == [[0, 1, 2]]
    assert naive_rankings(query.numpy(), corpus.numpy(), "binary+rescore-bits", 3) == [[0, 1, 2]]
    # int8: documents 0 and 1 differ only in the sign of a tiny coordinate — the same int8 codes (so the same
    # rescored score), different sign bits (document 1 agrees with the query's, so Hamming ranks it first).
    query = torch.tensor([[0.6, 0.1, 0.8]])
    corpus = torch.tensor([[0.6, -0.0005, 0.8], [0.6, 0.0005, 0.8], [0.6, 0.8, 0.0], [0.0, -1.0, 0.0]])
    index = qz.QuantizedIndex(query, corpus, chunk_size=3, rescore=4)
    assert torch.equal(index.corpus_int8[0], index.corpus_int8[1])  # the premise: one code, two bit patterns
    assert not torch.equal(index.corpus_bits[0], index.corpus_bits[1])
    assert index.top_ids("binary")(0, 1, 4).tolist() == [[1, 0, 2, 3]]
    for level in ("int8", "binary+rescore-int8"):
        assert index.top_ids(level)(0, 1, 4).tolist() == [[0, 1, 2, 3]], level
        assert naive_rankings(query.numpy(), corpus.numpy(), level, 4) == [[0, 1, 2, 3]], level


@pytest.mark.parametrize("quantile", [0.01, 0.2])
def test_int8_calibrated_on_quantiles_equals_the_naive_reference(quantile):
    """The p and 1 − p quantiles of each dimension (numpy.quantile's linear interpolation) instead of min/max:
    the range, and every ranking built on it, as numpy computes them; values beyond the range are clipped."""
    queries, corpus, relevant = random_case(4)
    q, c = queries[:, :13], corpus[:, :13]
    cu = c.astype(np.float64) / np.linalg.norm(c.astype(np.float64), axis=1, keepdims=True)
    cal = qz.calibrate_int8(torch.from_numpy(c), quantile)
    assert np.allclose(cal.lo.numpy(), np.quantile(cu, quantile, axis=0), rtol=0, atol=1e-15)
    assert np.allclose((cal.lo + 255 * cal.step).numpy(), np.quantile(cu, 1 - quantile, axis=0), rtol=0, atol=1e-14)
    codes = qz.int8_codes(torch.from_numpy(c), cal)
    assert (codes == -128).sum() > 1 and (codes == 127).sum() > 1  # some values are clipped at both ends
    levels = ["int8", "binary+rescore-int8"]
    got = qz.quantized_ir_metrics(torch.from_numpy(q), torch.from_numpy(c), relevant, levels, rescore=20,
                                  int8_quantile=quantile)
    for level in levels:
        assert_close(got[level], naive_metrics(naive_rankings(q, c, level, 20, quantile=quantile), relevant))
    with pytest.raises(ConfigError, match="quantile must be in"):
        qz.calibrate_int8(torch.from_numpy(c), 0.5)


def test_quantiles_are_computed_in_blocks_of_dimensions(monkeypatch):
    queries, corpus, _ = random_case(5)
    whole = qz.calibrate_int8(torch.from_numpy(corpus), 0.05)
    monkeypatch.setattr(qz, "QUANTILE_BLOCK_ELEMENTS", 3 * corpus.shape[0])  # 3 dimensions at a time
    monkeypatch.setattr(qz, "MATMUL_ROWS", 10)
    blocks = qz.calibrate_int8(torch.from_numpy(corpus), 0.05)
    assert torch.equal(whole.lo, blocks.lo) and torch.equal(whole.step, blocks.step)


# ================================================================================================ the codes
def test_codes_match_numpy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 21, generator=g)
    assert np.array_equal(qz.binary_codes(x).numpy(), np.packbits(x.numpy() > 0, axis=1))
    assert torch.equal(qz.signs(qz.binary_codes(x), 21), (x > 0).double() * 2 - 1)
    cal = qz.calibrate_int8(x)
    codes = qz.int8_codes(x, cal)
    assert codes.dtype == torch.int8 and int(codes.min()) == -128 and int(codes.max()) == 127  # the range is used
    assert (codes.min(dim=0).values == -128).all() and (codes.max(dim=0).values == 127).all()  # per dimension
    x_hat = qz.dequantize_int8(codes, cal)
    assert (x_hat - qz.unit(x)).abs().max() <= cal.step.max() / 2 + 1e-12  # half a step at most


def test_a_query_outside_the_corpus_range_is_clipped_and_a_constant_dimension_is_fine():
    corpus = torch.tensor([[0.6, 0.8], [0.6, -0.8], [0.6, 0.8]])  # dimension 0 constant at 0.6
    cal = qz.calibrate_int8(corpus)
    assert cal.step[0] == 1.0 and cal.lo[0] == pytest.approx(0.6)
    codes = qz.int8_codes(torch.tensor([[-1.0, 0.0], [0.0, 1.0]]), cal)
    assert codes[0, 0] == -128 and codes[1, 1] == 127  # below lo → the lowest code, above hi → the highest


def test_bytes_per_vector_and_levels():
    assert [qz.bytes_per_vector(lv, 384) for lv in LEVELS] == [1536, 384, 48, 48, 432]
    assert qz.bytes_per_vector("binary", 13) == 2
    assert qz.result_levels(["float32", "binary", "int8"], None) == ["float32", "binary", "int8"]
    assert qz.result_levels(["binary", "float32"], 40) == ["binary", *qz.RESCORED, "float32"]


@pytest.mark.parametrize("precisions, rescore, message", [
    (["float16"], None, "expected distinct names from float32, int8, binary, found float16"),
    (["int8", "int8"], None, "found int8,int8"),
    ([], None, "found nothing"),
    (["float32", "int8"], 10, "--rescore 10: rescoring re-ranks the binary search's candidates; add binary"),
    (["binary"], 0, "--rescore: expected a number of candidates >= 1, found 0"),
])
def test_bad_precisions(precisions, rescore, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        qz.check_precisions(precisions, rescore)


def test_nan_embeddings_are_a_data_error():
    corpus = torch.ones(4, 3)
    corpus[2, 1] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        qz.quantized_ir_metrics(torch.ones(1, 3), corpus, [{0}], ["int8"])


# ================================================================================================ sets and tables
def test_evaluate_precisions_and_the_table(tiny_model_dir):
    from bertino import SentenceEncoder

    encoder = SentenceEncoder.from_pretrained(tiny_model_dir)
    s = IRSet("dev", ["il gatto", "la casa", "roma"], ["un gatto", "una casa", "milano", "roma città"],
              [{0}, {1}, {3}])
    embedded = embed_sets(encoder, [s], [], show_progress_bar=False)
    floats = score_sets(embedded, [s], [], [32, 8])
    got = qz.evaluate_precisions(embedded, [s], [32, 8], ["float32", "int8", "binary"], rescore=2,
                                 float_results=floats)
    assert list(got) == LEVELS and all(list(got[lv]) == [32, 8] for lv in LEVELS)
    assert got["float32"] == {d: {"dev": floats[d]["dev"]} for d in (32, 8)}
    queries, corpus = embedded["dev"]
    assert got["int8"][8]["dev"] == qz.quantized_ir_metrics(queries[:, :8], corpus[:, :8], s.relevant,
                                                            ["int8"])["int8"]
    # without float_results the float32 level is computed, to the same bits
    assert qz.evaluate_precisions(embedded, [s], [32, 8], ["float32"])["float32"] == got["float32"]

    table = format_precision_table(got, full_dim=32, rescore=2)
    lines = table.splitlines()
    assert lines[0] == "### dev: storage vs quality"
    assert lines[2].startswith("| dim | precision | bytes/vector | storage | MAP@100 | NDCG@10 |")
    rows = [line.split(" | ")[:4] for line in lines[4:14]]
    assert rows == [["| 32", "float32", "128", "100.0%"], ["| 32", "int8", "32", "25.0%"],
                    ["| 32", "binary", "4", "3.1%"], ["| 32", "binary+rescore-bits", "4", "3.1%"],
                    ["| 32", "binary+rescore-int8", "36", "28.1%"], ["| 8", "float32", "32", "25.0%"],
                    ["| 8", "int8", "8", "6.2%"], ["| 8", "binary", "1", "0.8%"],
                    ["| 8", "binary+rescore-bits", "1", "0.8%"], ["| 8", "binary+rescore-int8", "9", "7.0%"]]
    assert f"| {got['int8'][8]['dev']['ndcg@10']:.4f} |" in lines[10]
    assert "per-dimension min/max, the float query scored against the decoded codes" in table
    assert "top 2 re-ranked" in table
