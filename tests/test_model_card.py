"""bertino.plumbing.model_card: front matter, usage snippets and the evaluation tables of the generated README.md."""

from __future__ import annotations

import json

import pytest

from bertino.errors import ConfigError
from bertino.plumbing.model_card import render_model_card, with_curves, with_storage_plot

V5_RESULTS = {  # the seed card's numbers, in the shape evaluate() returns
    768: {"dev_ir": {"map@100": 0.83981, "ndcg@10": 0.86801, "mrr@10": 0.8, "accuracy@1": 0.76172,
                     "accuracy@3": 0.9, "accuracy@5": 0.92, "accuracy@10": 0.95838, "recall@10": 0.95838,
                     "precision@10": 0.0958},
          "sts_dev": {"spearman_cosine": 0.85493, "pearson_cosine": 0.85741}},
    128: {"dev_ir": {"map@100": 0.80649, "ndcg@10": 0.83721, "mrr@10": 0.78, "accuracy@1": 0.72333,
                     "accuracy@3": 0.88, "accuracy@5": 0.9, "accuracy@10": 0.93841, "recall@10": 0.93841,
                     "precision@10": 0.0938},
          "sts_dev": {"spearman_cosine": 0.851, "pearson_cosine": 0.8533}},
}


def card(**overrides) -> str:
    kwargs = dict(
        base_model="indigo-ai/BERTino", dim=768, max_seq_length=256,
        matryoshka_dims=[768, 512, 256, 128], matryoshka_weights=[1.0, 0.4, 0.2, 0.2],
        losses={"task_retrieval": "CachedMultipleNegativesRankingLoss (mini_batch_size=16, batch_size=128)",
                "task_sts": "CoSENTLoss"},
        hyperparameters={"per_device_train_batch_size": 128, "learning_rate": 1e-05, "lr_scheduler_type": "cosine",
                         "fp16": True, "batch_sampler": "no_duplicates"},
        results=V5_RESULTS, model_name="multi-sentence-BERTino (V5)", model_id="out/final", language="it")
    kwargs.update(overrides)
    return render_model_card(**kwargs)


def test_front_matter_and_title():
    text = card()
    front, body = text.split("---\n")[1], text.split("---\n", 2)[2]
    assert "library_name: sentence-transformers\n" in front
    assert "pipeline_tag: sentence-similarity\n" in front
    assert 'base_model: "indigo-ai/BERTino"\n' in front and 'language: "it"\n' in front
    for tag in ("sentence-transformers", "matryoshka", "CachedMultipleNegativesRankingLoss", "CoSENTLoss"):
        assert f'- "{tag}"\n' in front
    assert body.lstrip().startswith("# multi-sentence-BERTino (V5)\n")
    assert "768-dimensional" in body and "saves 83% of vector storage" in body


def test_usage_with_bertino_and_sentence_transformers():
    text = card()
    assert 'model = SentenceEncoder.from_pretrained("out/final")' in text
    assert "model.encode(sentences, truncate_dim=128)" in text
    assert 'SentenceTransformer("out/final")' in text
    assert 'SentenceTransformer("out/final", truncate_dim=128)' in text
    assert "# (2, 768)" in text and "# (2, 128)" in text


def test_evaluation_tables_render_the_numbers():
    text = card()
    ir = text.split("### Information Retrieval: dev_ir\n\n")[1].split("\n\n")[0]
    assert ir.splitlines() == [
        "| Metric | 768d (Full) | 128d (Truncated) |",
        "|---|---:|---:|",
        "| MAP@100 | 0.8398 | 0.8065 |",
        "| NDCG@10 | 0.8680 | 0.8372 |",
        "| Accuracy@1 | 0.7617 | 0.7233 |",
        "| Accuracy@10 | 0.9584 | 0.9384 |",
    ]
    sts = text.split("### Semantic Textual Similarity: sts_dev\n\n")[1].split("\n\n")[0]
    assert sts.splitlines()[2:] == ["| Spearman Cosine | 0.8549 | 0.8510 |", "| Pearson Cosine | 0.8574 | 0.8533 |"]


def test_results_from_a_json_file_with_string_dims():
    from_json = json.loads(json.dumps(V5_RESULTS))  # keys "768", "128" as evaluate.py --json writes them
    assert card(results=from_json) == card()


def test_training_details_and_citations():
    text = card()
    assert "1. **task_retrieval**: CachedMultipleNegativesRankingLoss (mini_batch_size=16" in text
    assert "2. **task_sts**: CoSENTLoss" in text
    assert "dimensions [768, 512, 256, 128] with weights [1.0, 0.4, 0.2, 0.2]" in text
    assert "| learning_rate | 1e-05 |" in text and "| fp16 | True |" in text
    for key in ("kusupati2024matryoshka", "gao2021scaling", "su2022cosent", "reimers-2019-sentence-bert"):
        assert key in text


def test_without_results_or_matryoshka():
    text = card(results=None, matryoshka_dims=None, matryoshka_weights=None,
                losses={"retrieval": "MultipleNegativesRankingLoss"})
    assert "## Evaluation" not in text
    assert "truncate_dim" not in text and '- "matryoshka"' not in text and "MatryoshkaLoss" not in text
    assert "Trained without Matryoshka loss" in text
    assert "henderson2017efficient" in text and "gao2021scaling" not in text and "kusupati" not in text


def test_missing_metric_shows_a_dash():
    results = {768: {"dev": {"map@100": 0.5}}, 128: {"dev": {"map@100": float("nan")}}}
    assert "| MAP@100 | 0.5000 | – |" in card(results=results)
    assert "| NDCG@10 | – | – |" in card(results=results)


@pytest.mark.parametrize("dims, weights", [([768, 128], [1.0]), ([1024], [1.0])])
def test_bad_matryoshka_settings(dims, weights):
    with pytest.raises(ConfigError, match="must pair up"):
        card(matryoshka_dims=dims, matryoshka_weights=weights)


def test_config_loss_keys_become_class_names():
    text = card(losses={"retrieval": "cached_mnrl", "sts": "cosent"})
    assert "1. **retrieval**: CachedMultipleNegativesRankingLoss (GradCache)" in text
    assert "2. **sts**: CoSENTLoss" in text
    assert "gao2021scaling" in text and "su2022cosent" in text


def test_storage_vs_quality_table():
    by_precision = {level: {dim: {"dev_ir": {"ndcg@10": value - (0.1 if dim == 128 else 0.0)}}
                            for dim in (768, 128)}
                    for level, value in (("float32", 0.868), ("int8", 0.861), ("binary", 0.79),
                                         ("binary+rescore-bits", 0.84), ("binary+rescore-int8", 0.86))}
    text = card(precision_results=json.loads(json.dumps(by_precision)), rescore=40)  # string dims, as in the file
    section = text.split("## Storage vs quality\n\n")[1].split("\n## ")[0]
    assert "its top 40 re-ranked by the float query" in section and "768-dim float32 vector (3072 bytes)" in section
    assert "--precision float32,int8,binary --rescore 40`" in section
    table = section.split("### dev_ir\n\n")[1].strip().splitlines()
    assert table[:2] == ["| Dim | Precision | Bytes/vector | Storage | NDCG@10 |", "|---|---:|---:|---:|---:|"]
    assert table[2:] == ["| 768 | float32 | 3072 | 100.0% | 0.8680 |", "| 768 | int8 | 768 | 25.0% | 0.8610 |",
                         "| 768 | binary | 96 | 3.1% | 0.7900 |", "| 768 | binary+rescore-bits | 96 | 3.1% | 0.8400 |",
                         "| 768 | binary+rescore-int8 | 864 | 28.1% | 0.8600 |",
                         "| 128 | float32 | 512 | 16.7% | 0.7680 |", "| 128 | int8 | 128 | 4.2% | 0.7610 |",
                         "| 128 | binary | 16 | 0.5% | 0.6900 |", "| 128 | binary+rescore-bits | 16 | 0.5% | 0.7400 |",
                         "| 128 | binary+rescore-int8 | 144 | 4.7% | 0.7600 |"]
    assert text.index("## Evaluation") < text.index("## Storage vs quality") < text.index("## Training details")
    assert "## Storage vs quality" not in card() and "## Storage vs quality" not in card(precision_results={})


def test_storage_vs_quality_with_faiss_indexes_and_its_plot():
    """eval.index: the indexes join the table at the bytes they measured (HNSW: its graph too), and a second table
    gives recall against the exact search, build seconds and query milliseconds; the plot's link goes at the end of
    the section, once."""
    figures = {"recall_vs_exact@10": 0.98, "build_seconds": 0.0123, "query_ms": 0.0456, "query_ms_batched": 0.0078}
    by_level = {"float32": {128: {"dev_ir": {"ndcg@10": 0.77}}}, "int8": {128: {"dev_ir": {"ndcg@10": 0.769}}},
                "sq8": {128: {"dev_ir": {"ndcg@10": 0.768, "bytes_per_vector": 128.0, **figures}}},
                "hnsw": {128: {"dev_ir": {"ndcg@10": 0.765, "bytes_per_vector": 783.4, **figures}}}}
    text = card(precision_results=json.loads(json.dumps(by_level)), int8_quantile=0.001)
    section = text.split("## Storage vs quality\n\n")[1].split("\n## ")[0]
    assert "--precision float32,int8 --int8-quantile 0.001 --index sq8,hnsw`" in section
    assert "each dimension's 0.001 and 0.999 quantiles on the corpus" in section and "**sq8**, **hnsw**" in section
    assert "| 128 | sq8 | 128 | 4.2% | 0.7680 |\n| 128 | hnsw | 783 | 25.5% | 0.7650 |" in section
    faiss_table = section.split("#### dev_ir: FAISS indexes\n\n")[1]
    assert "| Dim | Index | Recall vs exact@10 | Build s | Query ms (1 at a time) | Query ms (batched) |" in faiss_table
    assert "| 128 | hnsw | 0.9800 | 0.012 | 0.046 | 0.008 |" in faiss_table

    plotted = with_storage_plot(text)
    assert with_storage_plot(plotted) == plotted and plotted.count("storage_vs_quality.png") == 1
    section = plotted.split("## Storage vs quality\n\n")[1].split("\n## ")[0]
    assert section.rstrip().endswith("Drawn by `python -m bertino.plot RUN_DIR`.")
    assert "![NDCG@10 against bytes per vector, one line per dim](storage_vs_quality.png)" in section
    assert with_storage_plot(card()) == card()  # no storage section, nothing to link


def test_the_curves_link_goes_before_the_training_details_once():
    text = with_curves(card())
    assert text.count("## Training curves") == 1 and "![Training curves" in text and "](curves.png)" in text
    assert text.index("## Training curves") < text.index("## Training details")
    assert with_curves(text) == text
    assert with_curves("# a card\n").endswith("## Training curves\n\n![Training curves: loss per task, learning "
                                             "rate, evaluation metrics per dim](curves.png)\n\nDrawn from the run's "
                                             "`metrics.jsonl` by `python -m bertino.plot RUN_DIR`.\n")


def test_comparison_with_the_base_model():
    """eval.compare_base's table (the published card's "Comparison with V4" when the base is V4; here V4's numbers
    as the base): this model's values carry their relative change, 100 · (v − v_base) / v_base, and the base
    column says it is the base model, by name (configs/v5.json starts from indigo-ai/BERTino, not from V4)."""
    base = {d: {name: dict(metrics) for name, metrics in sets.items()} for d, sets in V5_RESULTS.items()}
    base[128]["dev_ir"].update({"ndcg@10": 0.8332, "accuracy@1": 0.7145})
    text = card(base_results=base)
    section = text[text.index("## Comparison with the base model"):]
    assert ("| metric | base model indigo-ai/BERTino (768d) | this model (768d) | base model indigo-ai/BERTino "
            "(128d) | this model (128d) |") in section
    assert "The base model this run started from (`indigo-ai/BERTino`" in section and "V4" not in text
    want = 100 * (0.83721 - 0.8332) / 0.8332  # by hand: +0.48%
    assert f"| NDCG@10 | 0.8680 | 0.8680 (+0.00%) | 0.8332 | 0.8372 ({want:+.2f}%) |" in section
    assert f"0.7233 ({100 * (0.72333 - 0.7145) / 0.7145:+.2f}%)" in section and "(+1.24%)" in section
    assert "## Comparison with the base model" not in card()  # only when asked for
