"""The evaluation modules: bertino/metrics.py (IR/STS metrics against hand-computed values and a naive reference, the
exact chunked top k), eval-file loading (plumbing/eval_data.py), bertino/evaluation.py (a model on eval sets) and
the metric table of bertino/eval_tables.py."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest
import torch

from bertino import evaluation
from bertino import metrics as ev
from bertino.errors import BertinoError, ConfigError, DataError
from bertino.eval_sets import IRSet, STSSet
from bertino.eval_tables import format_table
from bertino.evaluation import evaluate
from bertino.metrics import average_ranks, ir_metrics, sts_metrics, top_k_cosine
from bertino.plumbing.eval_data import load_eval_sets, load_ir_file, load_sts_file


def unit_2d(cosines: list[float]) -> torch.Tensor:
    """Rows (c, sqrt(1 - c²)): against the query (1, 0) their cosine is exactly c."""
    return torch.tensor([[c, math.sqrt(1 - c * c)] for c in cosines], dtype=torch.float64)


QUERY = torch.tensor([[1.0, 0.0]])


# ================================================================================================ naive reference
def naive_ir(query_emb, corpus_emb, relevant, k_acc=(1, 3, 5, 10), k_pr=(10,), k_mrr=(10,), k_ndcg=(10,),
             k_map=(100,)) -> dict[str, float]:
    """One query at a time, the whole ranking, Python loops: the formulas of the module docstring, literally."""
    q = query_emb.double().numpy()
    c = corpus_emb.double().numpy()
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    c_norm = np.maximum(np.linalg.norm(c, axis=1), 1e-12)  # a zero row scores 0, as with F.normalize
    out: dict[str, list[float]] = {}
    for qi, rel in enumerate(relevant):
        scores = [float(np.float32(q[qi] @ c[j] / c_norm[j])) for j in range(len(c))]  # float32 like the code
        ranking = sorted(range(len(c)), key=lambda j: (-scores[j], j))
        hit = [1.0 if j in rel else 0.0 for j in ranking]

        def add(name, value):
            out.setdefault(name, []).append(value)

        for k in k_acc:
            add(f"accuracy@{k}", 1.0 if sum(hit[:k]) > 0 else 0.0)
        for k in k_pr:
            add(f"precision@{k}", sum(hit[:k]) / k)
            add(f"recall@{k}", sum(hit[:k]) / len(rel))
        for k in k_mrr:
            first = next((i for i in range(min(k, len(hit))) if hit[i]), None)
            add(f"mrr@{k}", 0.0 if first is None else 1.0 / (first + 1))
        for k in k_ndcg:
            dcg = sum(hit[i] / math.log2(i + 2) for i in range(min(k, len(hit))))
            idcg = sum(1.0 / math.log2(i + 2) for i in range(min(k, len(rel))))
            add(f"ndcg@{k}", dcg / idcg)
        for k in k_map:
            num_hits, total = 0, 0.0
            for i in range(min(k, len(hit))):
                if hit[i]:
                    num_hits += 1
                    total += num_hits / (i + 1)
            add(f"map@{k}", total / min(k, len(rel)))
    return {name: sum(v) / len(v) for name, v in out.items()}


def assert_metrics_close(got: dict, want: dict, tol: float = 1e-12) -> None:
    assert set(got) == set(want)
    for name in want:
        assert got[name] == pytest.approx(want[name], abs=tol), name


# ================================================================================================ IR: hand-computed
def test_several_relevant_docs_and_k_larger_than_corpus():
    # cosines by id: 0:.1 1:.9 2:.5 3:.7 4:.3 5:.8 → ranking 1, 5, 3, 2, 4, 0; relevant {5, 2, 0} at ranks 2, 4, 6.
    corpus = unit_2d([0.1, 0.9, 0.5, 0.7, 0.3, 0.8])
    got = ir_metrics(QUERY, corpus, [{5, 2, 0}])
    dcg = 1 / math.log2(3) + 1 / math.log2(5) + 1 / math.log2(7)
    idcg = 1 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    assert list(got) == list(ev.IR_METRICS)  # the contract's names (docs/contract.md), in its order
    assert_metrics_close(got, {
        "accuracy@1": 0.0, "accuracy@3": 1.0, "accuracy@5": 1.0, "accuracy@10": 1.0,
        "precision@10": 3 / 10,  # divided by k even though the corpus has only 6 texts
        "recall@10": 1.0, "mrr@10": 1 / 2, "ndcg@10": dcg / idcg,
        "map@100": (1 / 2 + 2 / 4 + 3 / 6) / 3,
    })


def test_ties_at_the_cutoff_go_to_the_smaller_corpus_id():
    # Corpus 1, 2, 3 tie at cosine 1: the ranking is 1, 2, 3, then 0, 4 (tied at 0).
    corpus = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    scores, ids = top_k_cosine(QUERY, corpus, k=4, chunk_size=2)
    assert ids.tolist() == [[1, 2, 3, 0]]
    assert scores.tolist() == [[1.0, 1.0, 1.0, 0.0]]
    for chunk_size in (1, 2, 3, 5):
        first = ir_metrics(QUERY, corpus, [{1}], chunk_size=chunk_size)  # wins the tie
        last = ir_metrics(QUERY, corpus, [{3}], chunk_size=chunk_size)  # loses it twice
        assert first["accuracy@1"] == 1.0 and first["mrr@10"] == 1.0
        assert last["accuracy@1"] == 0.0 and last["accuracy@3"] == 1.0
        assert last["mrr@10"] == pytest.approx(1 / 3) and last["ndcg@10"] == pytest.approx(0.5)
        tail = ir_metrics(QUERY, corpus, [{4}], chunk_size=chunk_size, accuracy_at_k=(4,))
        assert tail["accuracy@4"] == 0.0  # id 0 takes the last place of the top 4, not id 4


@pytest.mark.parametrize("chunk_size", [7, 100, 1000])
def test_a_wide_tie_keeps_the_smallest_ids(chunk_size):
    # torch.topk returns an arbitrary subset of tied values (on 100 equal values it picks ids like 65..69).
    corpus = torch.ones(100, 4)
    scores, ids = top_k_cosine(torch.ones(1, 4), corpus, k=10, chunk_size=chunk_size)
    assert ids.tolist() == [list(range(10))]
    assert ir_metrics(torch.ones(1, 4), corpus, [{0}], chunk_size=chunk_size)["accuracy@1"] == 1.0
    assert ir_metrics(torch.ones(1, 4), corpus, [{10}], chunk_size=chunk_size)["accuracy@10"] == 0.0


def test_relevant_doc_never_retrieved_scores_zero():
    # 150 texts; the relevant one is the least similar (rank 150), outside every cut-off including MAP@100.
    cosines = np.linspace(0.99, -0.99, 150).tolist()
    corpus = unit_2d(cosines)
    queries = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    got = ir_metrics(queries, corpus, [{149}, {0}])
    for name, value in got.items():  # query 0 contributes 0 everywhere, query 1 (rank 1) is perfect
        assert value == pytest.approx(0.1 / 2 if name == "precision@10" else 0.5), name


def test_matches_naive_reference_on_random_data():
    g = torch.Generator().manual_seed(0)
    Q, N, D = 40, 230, 16
    queries, corpus = torch.randn(Q, D, generator=g), torch.randn(N, D, generator=g)
    relevant = [set(torch.randint(0, N, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist())
                for _ in range(Q)]
    got = ir_metrics(queries, corpus, relevant, chunk_size=37)
    assert_metrics_close(got, naive_ir(queries, corpus, relevant))


def test_matches_naive_reference_with_many_exact_ties():
    # Entries in {-1, 0, 1}: many corpus rows are duplicates or share a cosine, so the id tie-break decides ranks.
    g = torch.Generator().manual_seed(1)
    Q, N, D = 25, 120, 3
    queries = torch.randint(-1, 2, (Q, D), generator=g).double() + torch.tensor([3.0, 0, 0])  # no zero query
    corpus = torch.randint(-1, 2, (N, D), generator=g).double()
    relevant = [set(torch.randint(0, N, (3,), generator=g).tolist()) for _ in range(Q)]
    cutoffs = dict(accuracy_at_k=(1, 2, 7, 200), precision_recall_at_k=(3, 10), mrr_at_k=(5,), ndcg_at_k=(4, 50),
                   map_at_k=(20, 100))
    got = ir_metrics(queries, corpus, relevant, chunk_size=11, **cutoffs)
    want = naive_ir(queries, corpus, relevant, k_acc=(1, 2, 7, 200), k_pr=(3, 10), k_mrr=(5,), k_ndcg=(4, 50),
                    k_map=(20, 100))
    assert_metrics_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_results_do_not_depend_on_chunking(monkeypatch, dtype):
    g = torch.Generator().manual_seed(2)
    Q, N, D = 12, 40, 24
    queries = torch.randn(Q, D, generator=g).to(dtype)
    corpus = torch.randn(N, D, generator=g).to(dtype)
    corpus[5:10] = corpus[30:35]  # exact duplicates in different chunks: ties across a chunk border
    relevant = [{(3 * q) % N, 30 + q % 5} for q in range(Q)]
    reference = ir_metrics(queries, corpus, relevant, chunk_size=N)
    _, reference_ids = top_k_cosine(queries, corpus, N, chunk_size=N)
    for chunk_size in (1, 3, 7, N, 10 * N):
        assert ir_metrics(queries, corpus, relevant, chunk_size=chunk_size) == reference  # bitwise equal
        assert torch.equal(top_k_cosine(queries, corpus, N, chunk_size=chunk_size)[1], reference_ids)
    # Small query chunks and matmul slices too: every block shape gives the same float32 scores.
    monkeypatch.setattr(ev, "SCORE_BLOCK_ELEMENTS", 12)
    monkeypatch.setattr(ev, "MATMUL_ROWS", 5)
    for chunk_size in (1, 4, N):
        assert ir_metrics(queries, corpus, relevant, chunk_size=chunk_size) == reference


def test_accepts_non_contiguous_truncated_views_and_numpy():
    g = torch.Generator().manual_seed(3)
    queries, corpus = torch.randn(5, 8, generator=g), torch.randn(20, 8, generator=g)
    relevant = [{q} for q in range(5)]
    sliced = ir_metrics(queries[:, :4], corpus[:, :4], relevant)
    assert sliced == ir_metrics(queries[:, :4].clone(), corpus[:, :4].clone(), relevant)
    assert sliced == ir_metrics(queries[:, :4].numpy(), corpus[:, :4].numpy(), relevant)


@pytest.mark.parametrize("args, match", [
    ((torch.zeros(2, 3), torch.zeros(4, 2), [{0}, {1}]), r"\(Q, D\)"),
    ((torch.ones(2, 3), torch.ones(4, 3), [{0}]), "1 sets for 2 queries"),
    ((torch.ones(2, 3), torch.ones(4, 3), [{0}, set()]), "query 1 has no relevant"),
    ((torch.ones(2, 3), torch.ones(4, 3), [{0}, {4}]), r"outside 0\.\.3"),
    ((torch.ones(2, 3), torch.full((4, 3), float("nan")), [{0}, {1}]), "NaN"),
    ((torch.ones(0, 3), torch.ones(4, 3), []), "at least one query"),
])
def test_ir_metrics_rejects_bad_input(args, match):
    with pytest.raises(DataError, match=match):
        ir_metrics(*args)


# ================================================================================================ STS
def test_average_ranks_share_ties():
    assert average_ranks(np.array([10, 20, 20, 30])).tolist() == [1, 2.5, 2.5, 4]
    assert average_ranks(np.array([3.0, 1.0, 3.0, 3.0, 0.0])).tolist() == [4, 2, 4, 4, 1]


def pearson_by_hand(x, y) -> float:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


def test_sts_metrics_with_ties_match_the_formulas():
    cosines = [0.5, 0.5, 0.2, 0.9, -0.1]
    gold = [3.0, 1.0, 1.0, 5.0, 0.0]
    e1 = torch.tensor([[2.0, 0.0]] * 5)  # lengths do not matter: cosine
    e2 = unit_2d(cosines).float() * 3
    got = sts_metrics(e1, e2, gold)
    assert got["pearson_cosine"] == pytest.approx(pearson_by_hand(cosines, gold), abs=1e-6)
    # average ranks by hand: cosines → [3.5, 3.5, 2, 5, 1], gold → [4, 2.5, 2.5, 5, 1]
    assert got["spearman_cosine"] == pytest.approx(pearson_by_hand([3.5, 3.5, 2, 5, 1], [4, 2.5, 2.5, 5, 1]),
                                                   abs=1e-12)
    assert list(got) == list(ev.STS_METRICS)


def test_sts_metrics_match_scipy_on_random_data():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    e1, e2 = rng.normal(size=(50, 6)), rng.normal(size=(50, 6))
    gold = rng.integers(0, 6, size=50).astype(float)  # many tied gold scores
    cos = (e1 * e2).sum(1) / np.linalg.norm(e1, axis=1) / np.linalg.norm(e2, axis=1)
    got = sts_metrics(e1, e2, gold)
    assert got["spearman_cosine"] == pytest.approx(stats.spearmanr(cos, gold).statistic, abs=1e-12)
    assert got["pearson_cosine"] == pytest.approx(stats.pearsonr(cos, gold).statistic, abs=1e-12)


def test_sts_metrics_rejects_constant_gold_and_gives_nan_for_constant_cosines():
    e = np.ones((3, 2))
    with pytest.raises(DataError, match="different gold scores"):
        sts_metrics(e, e, [1.0, 1.0, 1.0])
    got = sts_metrics(e, e, [1.0, 2.0, 3.0])
    assert math.isnan(got["pearson_cosine"]) and math.isnan(got["spearman_cosine"])


# ================================================================================================ eval files
def write_jsonl(path, rows, raw_lines=()):
    lines = [json.dumps(r) for r in rows] + list(raw_lines)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def test_load_ir_file_builds_corpus_and_relevant_sets(tmp_path):
    path = write_jsonl(tmp_path / "dev_ir.jsonl.gz", [
        {"query": "q1", "positive": "p1", "negative_1": "n1", "negative_2": "p2"},
        {"query": "q2", "positive": ["p2", "p3"]},
        {"query": "q1", "positive": "p4", "negative": "n1"},  # q1 again: its positives add up; n1 is not new
    ])
    loaded = load_ir_file(path)
    assert isinstance(loaded, IRSet)
    name, queries, corpus, relevant = loaded
    assert name == "dev_ir"
    assert queries == ["q1", "q2"]
    assert corpus == ["p1", "n1", "p2", "p3", "p4"]  # first appearance
    assert relevant == [{0, 4}, {2, 3}]  # p2 is q1's negative but q2's positive


def test_load_sts_file(tmp_path):
    path = write_jsonl(tmp_path / "sts-dev.jsonl", [
        {"sentence1": "a", "sentence2": "b", "score": 4.5},
        {"sentence1": "c", "sentence2": "d", "score": 0},
    ], raw_lines=[""])  # a blank line is skipped
    loaded = load_sts_file(path)
    assert isinstance(loaded, STSSet)
    assert tuple(loaded) == ("sts-dev", ["a", "c"], ["b", "d"], [4.5, 0.0])


@pytest.mark.parametrize("content, match", [
    (None, r"dev\.jsonl: no such file"),
    ("", "has no rows"),
    ("\n  \n", "has no rows"),
    ('{"query": "q", "positive": "p"}\n\n{"query": "q2", "positive": \n',
     r"dev\.jsonl:3: invalid JSON: Expecting value \(column 29\)"),  # just past the line's last character
    ('{"query": "q", "positive": "p"}\n{"query" "q2"}\n', r"dev\.jsonl:2: invalid JSON: Expecting ':' delimiter "
                                                         r"\(column 10\)"),
    ('{"query": "q", "positive": "p"}\n["q", "p"]\n', r"dev\.jsonl:2: expected a JSON object"),
    ('{"query": "q", "pos": "p"}\n', r"dev\.jsonl:1: missing key 'positive'"),
    ('{"query": 7, "positive": "p"}\n', r"dev\.jsonl:1: key 'query' must be a string, found int"),
    ('{"query": "q", "positive": []}\n', r"dev\.jsonl:1: key 'positive' must be a non-empty string or a non-empty list of non-empty strings, found \[\]"),
    ('{"query": "q", "positive": "p", "negative_1": null}\n', r"key 'negative_1' must be a string"),
])
def test_load_ir_file_errors_name_file_line_and_key(tmp_path, content, match):
    path = tmp_path / "dev.jsonl"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=match):
        load_ir_file(path)


@pytest.mark.parametrize("row, match", [
    ({"sentence1": "a", "sentence2": "b", "score": "3.5"}, r"sts\.jsonl:2: key 'score' must be a finite number"),
    ({"sentence1": "a", "sentence2": "b", "score": float("nan")}, "must be a finite number, found nan"),
    ({"sentence1": "a", "sentence2": "b", "score": True}, "must be a finite number"),
    ({"sentence1": "a", "sentence2": "b"}, r"sts\.jsonl:2: missing key 'score'"),
    ({"sentence1": "a", "score": 1.0}, r"sts\.jsonl:2: missing key 'sentence2'"),
])
def test_load_sts_file_errors(tmp_path, row, match):
    path = write_jsonl(tmp_path / "sts.jsonl", [{"sentence1": "x", "sentence2": "y", "score": 1}, row])
    with pytest.raises(DataError, match=match):
        load_sts_file(path)


def test_load_sts_file_needs_varying_scores(tmp_path):
    path = write_jsonl(tmp_path / "sts.jsonl", [{"sentence1": "x", "sentence2": "y", "score": 1}] * 3)
    with pytest.raises(DataError, match="different scores"):
        load_sts_file(path)


def test_eval_file_names_must_be_jsonl_and_unique(tmp_path):
    (tmp_path / "a").mkdir()
    one = write_jsonl(tmp_path / "dev.jsonl", [{"query": "q", "positive": "p"}])
    two = write_jsonl(tmp_path / "a" / "dev.jsonl.gz", [{"query": "q", "positive": "p"}])
    with pytest.raises(DataError, match="share the set name 'dev'"):
        load_eval_sets([one, two])
    with pytest.raises(DataError, match=r"expected a \.jsonl or \.jsonl\.gz"):
        load_ir_file(tmp_path / "dev.csv")
    bad_gzip = tmp_path / "bad.jsonl.gz"
    bad_gzip.write_text("not gzip")
    with pytest.raises(DataError, match=r"bad\.jsonl\.gz: cannot read: "):
        load_ir_file(bad_gzip)


# ================================================================================================ evaluate
class FakeEncoder:
    """Deterministic text → vector lookup that records what it was asked to encode."""

    dim = 6

    def __init__(self):
        self.calls: list[list[str]] = []

    def vector(self, text: str) -> np.ndarray:
        rng = np.random.default_rng(sum(map(ord, text)) * 7919 + len(text))
        return rng.normal(size=self.dim).astype(np.float32)

    def encode(self, texts, batch_size=32, show_progress_bar=None, **kw):
        self.calls.append(list(texts))
        return np.stack([self.vector(t) for t in texts])


def test_evaluate_encodes_each_text_once_and_truncates_per_dim(tmp_path):
    ir = write_jsonl(tmp_path / "ir.jsonl", [
        {"query": "chi ha dipinto", "positive": "leonardo", "negative_1": "roma"},
        {"query": "dove", "positive": "roma", "negative_1": "leonardo"},
        {"query": "acqua", "positive": ["mare", "sole"]},
    ])
    sts = write_jsonl(tmp_path / "sts.jsonl", [
        {"sentence1": "leonardo", "sentence2": "gioconda", "score": 5},
        {"sentence1": "mare", "sentence2": "casa", "score": 1},
        {"sentence1": "sole", "sentence2": "acqua", "score": 2},
    ])
    enc = FakeEncoder()
    results = evaluate(enc, [ir], [sts], dims=[6, 2], batch_size=4, show_progress_bar=False)
    assert len(enc.calls) == 1 and len(enc.calls[0]) == len(set(enc.calls[0])) == 9  # every distinct text, once
    assert list(results) == [6, 2] and list(results[6]) == ["ir", "sts"]
    assert list(results[2]["ir"]) == list(ev.IR_METRICS) and list(results[2]["sts"]) == list(ev.STS_METRICS)

    _, queries, corpus, relevant = load_ir_file(ir)
    q = torch.tensor(np.stack([enc.vector(t) for t in queries]))
    c = torch.tensor(np.stack([enc.vector(t) for t in corpus]))
    assert results[2]["ir"] == ir_metrics(q[:, :2], c[:, :2], relevant)  # slice, then cosine (= re-normalise)
    assert results[6]["ir"] == ir_metrics(q, c, relevant)
    a = np.stack([enc.vector(t) for t in ["leonardo", "mare", "sole"]])[:, :2]
    b = np.stack([enc.vector(t) for t in ["gioconda", "casa", "acqua"]])[:, :2]
    assert results[2]["sts"] == pytest.approx(sts_metrics(a, b, [5, 1, 2]))


@pytest.mark.parametrize("dims, match", [([7], r"expected 1\.\.6"), ([0], "not an embedding dim"),
                                         ([], "empty"), ([4, 4], "twice"), (["4"], "not an embedding dim")])
def test_evaluate_rejects_bad_dims(tmp_path, dims, match):
    ir = write_jsonl(tmp_path / "ir.jsonl", [{"query": "q", "positive": "p"}])
    with pytest.raises(ConfigError, match=match):
        evaluate(FakeEncoder(), [ir], [], dims=dims)
    assert issubclass(ConfigError, BertinoError)


def test_evaluate_needs_a_file():
    with pytest.raises(DataError, match="nothing to evaluate"):
        evaluate(FakeEncoder(), [], [], dims=None)


def test_format_table_one_row_per_metric_one_column_per_dim():
    results = {768: {"dev": {"map@100": 0.83981, "accuracy@1": 0.7617}, "sts": {"spearman_cosine": 0.85493}},
               128: {"dev": {"map@100": 0.80649, "accuracy@1": 0.72333}, "sts": {"spearman_cosine": 0.851}}}
    table = format_table(results)
    assert "### dev\n\n| metric | 768d | 128d |\n|---|---:|---:|\n" in table
    assert "| MAP@100 | 0.8398 | 0.8065 |" in table
    assert "| Accuracy@1 | 0.7617 | 0.7233 |" in table
    assert "| Spearman Cosine | 0.8549 | 0.8510 |" in table


def test_names_that_moved_out_of_evaluation_stay_importable_from_it():
    """evaluation.py was split along its jobs (the metric engine, the tables, the sets); code that imported from it
    keeps working, with the very same objects."""
    from bertino import eval_tables, metrics

    for name in ("ir_metrics", "ranking_metrics", "top_k", "top_k_cosine", "sort_by_score_then_id", "sts_metrics",
                 "average_ranks", "check_ir_embeddings", "IR_METRICS", "STS_METRICS", "SCORE_BLOCK_ELEMENTS"):
        assert getattr(evaluation, name) is getattr(metrics, name), name
    for name in ("format_table", "comparison_table", "relative_change", "relative_changes", "metric_label"):
        assert getattr(evaluation, name) is getattr(eval_tables, name), name
    assert evaluation.IRSet is IRSet and evaluation.STSSet is STSSet
