"""The `README.md` model card of a saved model, laid out like multi-sentence-BERTino V5's card.

    YAML front matter (library_name, pipeline_tag, base_model, tags) → title and description → usage with bertino
    and with sentence-transformers → evaluation tables (rows: metrics, columns: dims) → storage vs quality
    (retrieval at dims × precisions and FAISS indexes: NDCG@10 and bytes/vector; the indexes' recall, build and
    query time; its plot, when drawn) → training curves (when drawn) → training details (losses, Matryoshka
    dims/weights, hyperparameters) → citations.

`results` has the shape `bertino.evaluation.evaluate` returns, {dim: {set name: {metric: value}}}; the dim keys may
also be strings, as in the `--json` file of `evaluate.py`. A set holding "map@100" is a retrieval set, one holding
"spearman_cosine" an STS set. `precision_results` is {precision or index: results} (`evaluation.storage_vs_quality`,
or `evaluate.py --precision ... --index ... --json`).
"""

from __future__ import annotations

import json
import math
from typing import Mapping, Sequence

from ..errors import ConfigError
from ..eval_names import INDEXES
from ..eval_tables import comparison_table, metric_label, relative_changes, stored_bytes
from ..losses import LOSSES

IR_CARD_METRICS = ("map@100", "ndcg@10", "accuracy@1", "accuracy@10")  # the card's retrieval rows
STS_CARD_METRICS = ("spearman_cosine", "pearson_cosine")
EXAMPLE_SENTENCES = ["Chi ha dipinto la Gioconda?",
                     "Leonardo da Vinci è l'autore della Gioconda, opera conservata al Louvre."]

CITATIONS = {  # name → (when to cite: words, one of which a loss description holds; None: always, BibTeX)
    "Sentence-BERT": (None, """@inproceedings{reimers-2019-sentence-bert,
    title = "Sentence-BERT: Sentence Embeddings using Siamese BERT-Networks",
    author = "Reimers, Nils and Gurevych, Iryna",
    booktitle = "Proceedings of the 2019 Conference on Empirical Methods in Natural Language Processing",
    year = "2019",
    publisher = "Association for Computational Linguistics",
    url = "https://arxiv.org/abs/1908.10084",
}"""),
    "MatryoshkaLoss": (("matryoshka",), """@misc{kusupati2024matryoshka,
    title={Matryoshka Representation Learning},
    author={Aditya Kusupati and Gantavya Bhatt and Aniket Rege and Matthew Wallingford and Aditya Sinha and Vivek Ramanujan and William Howard-Snyder and Kaifeng Chen and Sham Kakade and Prateek Jain and Ali Farhadi},
    year={2024},
    eprint={2205.13147},
    archivePrefix={arXiv},
    primaryClass={cs.LG}
}"""),
    "MultipleNegativesRankingLoss": (("multiplenegatives", "mnrl"), """@misc{henderson2017efficient,
    title={Efficient Natural Language Response Suggestion for Smart Reply},
    author={Matthew Henderson and Rami Al-Rfou and Brian Strope and Yun-hsuan Sung and Laszlo Lukacs and Ruiqi Guo and Sanjiv Kumar and Balint Miklos and Ray Kurzweil},
    year={2017},
    eprint={1705.00652},
    archivePrefix={arXiv},
    primaryClass={cs.CL}
}"""),
    "CachedMultipleNegativesRankingLoss": (("cached", "gradcache"), """@misc{gao2021scaling,
    title={Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup},
    author={Luyu Gao and Yunyi Zhang and Jiawei Han and Jamie Callan},
    year={2021},
    eprint={2101.06983},
    archivePrefix={arXiv},
    primaryClass={cs.LG}
}"""),
    "CoSENTLoss": (("cosent",), """@misc{su2022cosent,
    title={CoSENT: A More Efficient Sentence Vector Training Method Than Sentence-BERT},
    author={Jianlin Su},
    year={2022},
    howpublished={\\url{https://kexue.fm/archives/8847}}
}"""),
}


def render_model_card(
    *,
    base_model: str,
    dim: int,
    max_seq_length: int,
    matryoshka_dims: Sequence[int] | None,
    matryoshka_weights: Sequence[float] | None,
    losses: Mapping[str, str],
    hyperparameters: Mapping[str, object],
    results: Mapping | None,
    model_name: str = "bertino sentence encoder",
    model_id: str = "path/to/model",
    language: str | None = None,
    datasets: Mapping[str, str] | None = None,
    precision_results: Mapping | None = None,
    rescore: int | None = None,
    base_results: Mapping | None = None,
    int8_quantile: float = 0.0,
) -> str:
    """The model card as markdown. `losses`: task name → loss description or config key ("cached_mnrl", ...);
    `model_id`: the path or hub id the usage examples load; `rescore`: the K of the binary+rescore rows;
    `base_results`: the base model on the same sets, for a "Comparison with the base model" table."""
    losses = {task: LOSSES[loss].card_name if loss in LOSSES else loss for task, loss in losses.items()}
    dims = [int(d) for d in matryoshka_dims or []]
    weights = [float(w) for w in matryoshka_weights or []]
    if len(dims) != len(weights) or any(not 0 < d <= dim for d in dims):
        raise ConfigError(f"model card: matryoshka dims {dims} and weights {weights} must pair up, "
                          f"each dim in 1..{dim}")
    small = min(dims) if dims and min(dims) < dim else None  # the truncation the usage examples show

    parts = [_front_matter(base_model, language, bool(dims), losses), f"# {model_name}", _description(
        base_model, dim, dims, small), _details(base_model, dim, max_seq_length), _usage(model_id, dim, small)]
    if results:
        parts.append(_evaluation(results, dim))
    if results and base_results:
        parts.append(_comparison(base_model, base_results, results))
    if precision_results:
        parts.append(_storage(precision_results, dim, rescore, int8_quantile))
    parts.append(_training(losses, dims, weights, hyperparameters, datasets))
    parts.append(_citations(losses, bool(dims)))
    return "\n\n".join(parts) + "\n"


def _front_matter(base_model: str, language: str | None, matryoshka: bool, losses: Mapping[str, str]) -> str:
    tags = ["sentence-transformers", "sentence-similarity", "feature-extraction", "bertino"]
    tags += ["matryoshka"] * matryoshka
    tags += [name for name in CITATIONS if name != "Sentence-BERT" and _cites(name, losses, matryoshka)]
    lines = ["---", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity",
             f"base_model: {json.dumps(base_model)}"]  # a JSON string is a valid YAML scalar
    if language:
        lines.append(f"language: {json.dumps(language)}")
    lines += ["tags:"] + [f"- {json.dumps(t)}" for t in tags] + ["---"]
    return "\n".join(lines)


def _description(base_model: str, dim: int, dims: list[int], small: int | None) -> str:
    text = (f"A sentence-embedding model fine-tuned from `{base_model}` with bertino. It maps sentences and "
            f"paragraphs to a {dim}-dimensional dense vector space (compare with cosine similarity) for semantic "
            f"search, retrieval-augmented generation and semantic textual similarity.")
    if dims:
        text += ("\n\nIt was trained with Matryoshka Representation Learning at dimensions "
                 f"{', '.join(map(str, dims))}: the first d coordinates of an embedding are themselves a good "
                 f"embedding, so vectors can be truncated to any of these sizes.")
        if small:
            text += f" Truncating to {small} dimensions saves {1 - small / dim:.0%} of vector storage."
    return text


def _details(base_model: str, dim: int, max_seq_length: int) -> str:
    return "## Model details\n\n" + _table(["Property", "Value"], [
        ["Base model", f"`{base_model}`"], ["Output dimension", str(dim)],
        ["Maximum sequence length", f"{max_seq_length} tokens"], ["Similarity function", "cosine"]])


def _usage(model_id: str, dim: int, small: int | None) -> str:
    sentences = "sentences = [\n" + "".join(f"    {json.dumps(s, ensure_ascii=False)},\n" for s in EXAMPLE_SENTENCES)
    sentences += "]"
    bertino = [
        "from bertino import SentenceEncoder", "",
        f"model = SentenceEncoder.from_pretrained({json.dumps(model_id)})", sentences,
        "embeddings = model.encode(sentences)", "print(embeddings.shape)", f"# ({len(EXAMPLE_SENTENCES)}, {dim})"]
    if small:
        bertino += ["", f"embeddings = model.encode(sentences, truncate_dim={small})  # the first {small} dims",
                    "print(embeddings.shape)", f"# ({len(EXAMPLE_SENTENCES)}, {small})"]
    st = ["from sentence_transformers import SentenceTransformer", "",
          f"model = SentenceTransformer({json.dumps(model_id)})", sentences,
          "embeddings = model.encode(sentences)", "print(embeddings.shape)", f"# ({len(EXAMPLE_SENTENCES)}, {dim})"]
    text = ("## Usage\n\n### With bertino\n\n```python\n" + "\n".join(bertino) + "\n```\n\n"
            "### With Sentence Transformers\n\nThe folder is a standard sentence-transformers model:\n\n"
            "```bash\npip install -U sentence-transformers\n```\n\n```python\n" + "\n".join(st) + "\n```")
    if small:
        text += (f"\n\nTruncated to {small} dimensions:\n\n```python\n"
                 f"model = SentenceTransformer({json.dumps(model_id)}, truncate_dim={small})\n"
                 f"embeddings = model.encode(sentences)\nprint(embeddings.shape)\n"
                 f"# ({len(EXAMPLE_SENTENCES)}, {small})\n```")
    return text


def _evaluation(results: Mapping, dim: int) -> str:
    results = {int(d): sets for d, sets in results.items()}  # "768" (from a --json file) → 768
    dims = list(results)
    columns = ["Metric"] + [f"{d}d (Full)" if d == dim else f"{d}d (Truncated)" for d in dims]
    blocks = ["## Evaluation\n\nCosine similarity; the Truncated columns use the first d dimensions, "
              "re-normalised. Reproduce with `python evaluate.py --model <this folder> --ir FILE --sts FILE`."]
    for name, metrics in results[dims[0]].items():
        if "map@100" in metrics:
            title, rows = f"### Information Retrieval: {name}", IR_CARD_METRICS
        elif "spearman_cosine" in metrics:
            title, rows = f"### Semantic Textual Similarity: {name}", STS_CARD_METRICS
        else:
            title, rows = f"### {name}", tuple(metrics)
        body = [[metric_label(m)] + [_number(results[d].get(name, {}).get(m)) for d in dims] for m in rows]
        blocks.append(f"{title}\n\n" + _table(columns, body, numeric=True))
    return "\n\n".join(blocks)


def _comparison(base_model: str, base_results: Mapping, results: Mapping) -> str:
    """`eval.compare_base`: the base model the run started from, then this one with its relative change. It is the
    published card's "Comparison with V4" only for a run that started from V4 (the README's two-stage recipe), so
    it is labelled as what it is: the base model, by name."""
    per_model = {f"base model {base_model}": {int(d): r for d, r in base_results.items()},
                 "this model": {int(d): r for d, r in results.items()}}
    return (f"## Comparison with the base model\n\nThe base model this run started from (`{base_model}`, the "
            f"config's `model.name_or_path`) and this model, on the same sets at the same dims; after each value of "
            f"this model its relative change against the base model, 100 · (v − v_base) / v_base.\n\n"
            + comparison_table(per_model, relative_changes(per_model)).rstrip("\n"))


def _storage(precision_results: Mapping, dim: int, rescore: int | None, int8_quantile: float = 0.0) -> str:
    """Per retrieval set: one row per dim × level (precision, or FAISS index) with bytes/vector, the share of the
    full float32 vector and NDCG@10; then, when indexes were evaluated, what each costs and finds."""
    levels = list(precision_results)
    by_level = {lv: {int(d): sets for d, sets in precision_results[lv].items()} for lv in levels}
    dims = list(dict.fromkeys(d for lv in levels for d in by_level[lv]))
    names = list(dict.fromkeys(n for lv in levels for sets in by_level[lv].values() for n in sets))
    indexes = [lv for lv in levels if lv in INDEXES]
    statistic = "min/max" if not int8_quantile else f"{int8_quantile:g} and {1 - int8_quantile:g} quantiles"
    command = (f"`python evaluate.py --model <this folder> --ir FILE --precision {','.join(_base_levels(levels))}"
               + (f" --rescore {rescore}" if rescore else "") + (f" --int8-quantile {int8_quantile:g}"
                                                                 if int8_quantile else "")
               + (f" --index {','.join(indexes)}" if indexes else "") + "`")
    text = (f"## Storage vs quality\n\nRetrieval with the vectors stored as a vector database stores them: "
            f"**int8** (codes over each dimension's {statistic} on the corpus; the float query scored against the "
            f"decoded codes, as FAISS's scalar quantizer and Qdrant do), **binary** (sign bits, scored by Hamming "
            f"distance)"
            + (f", and binary with its top {rescore} re-ranked by the float query against the ±1 bits "
               f"(**binary+rescore-bits**) or against int8 documents stored as well (**binary+rescore-int8**)"
               if rescore else "")
            + (f"; and through FAISS indexes ({', '.join(f'**{i}**' for i in indexes)}), their bytes per vector "
               f"as they store them (the HNSW graph included)" if indexes else "")
            + f". Storage is relative to the full {dim}-dim float32 vector ({4 * dim} bytes). Reproduce with "
            f"{command}.")
    blocks = [text]
    for name in names:
        rows = []
        for d in dims:
            for lv in levels:
                values = by_level[lv].get(d, {}).get(name)
                if values is not None:
                    size = stored_bytes(lv, d, values)
                    rows.append([str(d), lv, f"{size:.0f}", f"{size / (4 * dim):.1%}", _number(values.get("ndcg@10"))])
        blocks.append(f"### {name}\n\n" + _table(["Dim", "Precision", "Bytes/vector", "Storage", "NDCG@10"], rows,
                                                  numeric=True))
        if indexes:
            rows = [[str(d), lv, _number(values.get("recall_vs_exact@10")), f"{values['build_seconds']:.3f}",
                     f"{values['query_ms']:.3f}", f"{values['query_ms_batched']:.3f}"]
                    for d in dims for lv in indexes
                    for values in [by_level[lv].get(d, {}).get(name)] if values is not None]
            blocks.append(f"#### {name}: FAISS indexes\n\nRecall@10 against the exact float32 search; build "
                          f"seconds and milliseconds per query (one query per call, and all in one call) on one "
                          f"thread of the machine that wrote this card.\n\n"
                          + _table(["Dim", "Index", "Recall vs exact@10", "Build s", "Query ms (1 at a time)",
                                    "Query ms (batched)"], rows, numeric=True))
    return "\n\n".join(blocks)


def _base_levels(levels: list[str]) -> list[str]:
    return [lv for lv in levels if "+" not in lv and lv not in INDEXES]


STORAGE_PLOT_TITLE = "### NDCG@10 against bytes per vector"


def with_storage_plot(card: str, image: str = "storage_vs_quality.png") -> str:
    """The card with a link to the storage-vs-quality plot (`python -m bertino.plot`) at the end of its "Storage vs
    quality" section; a card without that section, or that already links it, is returned unchanged."""
    if STORAGE_PLOT_TITLE in card or "## Storage vs quality" not in card:
        return card
    start = card.index("## Storage vs quality")
    end = card.find("\n## ", start + 1)
    end = len(card.rstrip("\n")) if end < 0 else end
    section = (f"\n\n{STORAGE_PLOT_TITLE}\n\n![NDCG@10 against bytes per vector, one line per dim]({image})\n\n"
               f"Each line is one dim; its points are the precisions and indexes above, at the bytes they store per "
               f"vector. Drawn by `python -m bertino.plot RUN_DIR`.")
    return card[:end].rstrip("\n") + section + "\n" + card[end:]


CURVES_TITLE = "## Training curves"


def with_curves(card: str, image: str = "curves.png") -> str:
    """The card with a link to the run's curves (`python -m bertino.plot`), before the training details; a card
    that already links them is returned unchanged."""
    if CURVES_TITLE in card:
        return card
    section = (f"{CURVES_TITLE}\n\n![Training curves: loss per task, learning rate, evaluation metrics per dim]"
               f"({image})\n\nDrawn from the run's `metrics.jsonl` by `python -m bertino.plot RUN_DIR`.\n\n")
    at = card.find("## Training details")
    return card + "\n" + section.rstrip() + "\n" if at < 0 else card[:at] + section + card[at:]


def _training(losses: Mapping[str, str], dims: list[int], weights: list[float],
              hyperparameters: Mapping[str, object], datasets: Mapping[str, str] | None) -> str:
    text = "## Training details\n\n### Loss functions\n\n"
    text += "\n".join(f"{i}. **{task}**: {loss}" for i, (task, loss) in enumerate(losses.items(), start=1))
    if dims:
        text += (f"\n\nEach base loss is wrapped in MatryoshkaLoss targeting dimensions {dims} with weights "
                 f"{weights} (Σ_d w_d · L(e[:, :d]), the weights not renormalised); the embeddings are computed "
                 f"once per step and truncated per dimension.")
    else:
        text += "\n\nTrained without Matryoshka loss: use the full dimension."
    if datasets:
        text += "\n\n### Training datasets\n\n" + "\n".join(f"- **{task}**: {d}" for task, d in datasets.items())
    text += "\n\n### Hyperparameters\n\n" + _table(["Parameter", "Value"],
                                                   [[str(k), _value(v)] for k, v in hyperparameters.items()])
    return text


def _citations(losses: Mapping[str, str], matryoshka: bool) -> str:
    blocks = [f"#### {name}\n\n```bibtex\n{bibtex}\n```" for name, (_, bibtex) in CITATIONS.items()
              if _cites(name, losses, matryoshka)]
    return "## Citation\n\n" + "\n\n".join(blocks)


def _cites(name: str, losses: Mapping[str, str], matryoshka: bool) -> bool:
    words = CITATIONS[name][0]
    if words is None:
        return True
    if words == ("matryoshka",):
        return matryoshka
    return any(w in loss.lower().replace(" ", "").replace("_", "") for loss in losses.values() for w in words)


def _table(header: list[str], rows: list[list[str]], numeric: bool = False) -> str:
    """A markdown table; `numeric` right-aligns every column but the first."""
    lines = ["| " + " | ".join(header) + " |", "|---" + ("|---:" if numeric else "|---") * (len(header) - 1) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _number(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.4f}"


def _value(value) -> str:
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)
