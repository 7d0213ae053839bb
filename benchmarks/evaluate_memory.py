"""Peak memory of retrieval evaluation on a 100k-passage corpus: chunked scoring vs the full (Q, N) score matrix.

    python benchmarks/evaluate_memory.py                      # both variants, each in a fresh process
    python benchmarks/evaluate_memory.py --variant metrics    # random embeddings → ir_metrics only
    python benchmarks/evaluate_memory.py --variant end-to-end # tiny random model + synthetic JSONL → evaluate()
    python benchmarks/evaluate_memory.py --variant quantized  # random embeddings → int8, binary, rescored search

Peak RSS is `resource.getrusage(RUSAGE_SELF).ru_maxrss`, a high-water mark for the whole process, so each variant
runs in its own process and reports the rise of the peak over a baseline taken once its inputs are in memory.
The rise is the working memory of the evaluation (plus allocator fragmentation, see `main`); a dense (Q, N) float32
score matrix is shown for comparison. End to end, 1,000 queries × 100k passages with a tiny model: 296 MB (it was
543 MB when `encode` kept every text's token ids as Python lists; they are now one flat int32 array).
The quantized variant (bertino/quantization.py) also reports what its index holds: N·d int8 codes and N·d/8 bytes
of sign bits, the only memory that grows with N.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bertino.evaluation import ir_metrics  # noqa: E402

MB = 1024 * 1024
TOPICS = ["gatto", "cane", "casa", "libro", "tabella", "testo", "pagina", "documento", "formato", "cella", "roma",
          "milano", "acqua", "sole", "mare", "leonardo", "gioconda", "louvre"]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def report(name: str, n_queries: int, n_corpus: int, baseline: float, seconds: float, metrics: dict) -> None:
    rise = peak_rss_mb() - baseline
    dense = n_queries * n_corpus * 4 / MB
    print(f"[{name}] Q={n_queries} N={n_corpus}: peak RSS {peak_rss_mb():.0f} MB, rise during evaluation "
          f"{rise:.0f} MB (a dense (Q, N) float32 score matrix alone: {dense:.0f} MB); {seconds:.1f} s")
    print(f"[{name}] " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))


# ================================================================================================ variants
def random_retrieval(args):
    """Random embeddings, each query a noisy copy of its one relevant passage → queries (Q, D), corpus (N, D),
    relevant [{id}] (seeded: every variant sees the same data)."""
    g = torch.Generator().manual_seed(0)
    corpus = torch.randn(args.corpus, args.dim, generator=g)  # (N, D) float32
    relevant_ids = torch.randint(0, args.corpus, (args.queries,), generator=g)  # (Q,)
    queries = corpus[relevant_ids] + 8.0 * torch.randn(args.queries, args.dim, generator=g)  # (Q, D)
    return queries, corpus, [{int(i)} for i in relevant_ids]


def run_metrics(args) -> None:
    """`ir_metrics` on `random_retrieval`'s data."""
    queries, corpus, relevant = random_retrieval(args)
    baseline = peak_rss_mb()
    start = time.perf_counter()
    metrics = ir_metrics(queries, corpus, relevant, chunk_size=args.chunk_size)
    report(f"metrics, chunk_size={args.chunk_size}, D={args.dim}", args.queries, args.corpus, baseline,
           time.perf_counter() - start, metrics)


def run_quantized(args) -> None:
    """The metrics variant's data through every quantized level: the index (int8 codes, sign bits) is built once,
    then int8, binary, binary + rescore (bits and int8) are ranked and scored in turn; the peak is cumulative."""
    from bertino.evaluation import ranking_metrics
    from bertino.quantization import PRECISIONS, QuantizedIndex, result_levels

    queries, corpus, relevant = random_retrieval(args)
    baseline = peak_rss_mb()
    start = time.perf_counter()
    index = QuantizedIndex(queries, corpus, chunk_size=args.chunk_size, rescore=args.rescore)
    held = (index.corpus_int8.numel() + index.corpus_bits.numel()) / MB
    print(f"[quantized] the index: {held:.0f} MB of int8 codes and sign bits; peak rise {peak_rss_mb() - baseline:.0f} "
          f"MB; {time.perf_counter() - start:.1f} s")
    for level in [lv for lv in result_levels(PRECISIONS, args.rescore) if lv != "float32"]:
        start = time.perf_counter()
        metrics = ranking_metrics(index.top_ids(level), args.queries, args.corpus, relevant,
                                  chunk_size=args.chunk_size)
        report(f"quantized {level}, rescore={args.rescore}, chunk_size={args.chunk_size}, D={args.dim}",
               args.queries, args.corpus, baseline, time.perf_counter() - start, metrics)


def run_end_to_end(args) -> None:
    """A tiny random DistilBERT and a synthetic JSONL file, through the steps of `evaluate()`, peak after each.

    Row j of the file: a query, its one positive and enough `negative_*` passages that the corpus has N texts.
    """
    from bertino import SentenceEncoder
    from bertino.evaluation import evaluate_sets
    from bertino.plumbing.eval_data import load_eval_sets

    per_row = args.corpus // args.queries  # passages per row: 1 positive + per_row - 1 negatives
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_tiny_model(tmp / "model")
        ir_file = tmp / "synthetic_ir.jsonl"
        with ir_file.open("w", encoding="utf-8") as f:
            for j in range(args.queries):
                passages = [passage(j * per_row + n) for n in range(per_row)]
                row = {"query": f"{TOPICS[j % len(TOPICS)]} {j * per_row}", "positive": passages[0]}
                row.update({f"negative_{n}": text for n, text in enumerate(passages[1:], start=1)})
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        encoder = SentenceEncoder.from_pretrained(tmp / "model")
        baseline = peak_rss_mb()
        start = time.perf_counter()
        ir_sets, _ = load_eval_sets([ir_file])
        print(f"[end-to-end] after loading the file: peak rise {peak_rss_mb() - baseline:.0f} MB")
        results = evaluate_sets(encoder, ir_sets, [], dims=[encoder.dim, encoder.dim // 2], batch_size=256,
                                show_progress_bar=False)
        seconds = time.perf_counter() - start
    report(f"end-to-end, dims {list(results)}", len(ir_sets[0].queries), len(ir_sets[0].corpus), baseline,
           seconds, results[encoder.dim]["synthetic_ir"])


def passage(i: int) -> str:
    return f"il {TOPICS[i % len(TOPICS)]} {i} e la {TOPICS[(i * 7 + 3) % len(TOPICS)]} della pagina {i % 97}"


def make_tiny_model(folder: Path) -> None:
    """A random 2-layer, 32-dim DistilBertModel with a WordPiece tokenizer over the synthetic texts' words."""
    from transformers import BertTokenizerFast, DistilBertConfig, DistilBertModel

    folder.mkdir(parents=True)
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "il", "la", "e", "della", "pagina"] + TOPICS
    vocab += chars + ["##" + c for c in chars]
    vocab = list(dict.fromkeys(vocab))  # no duplicate lines ("e" is a word and a character): ids stay < len(vocab)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True, model_max_length=64)
    if len(tok) < len(vocab):  # transformers >= 5 ignores vocab_file= (and builds 5 specials); it takes vocab=
        tok = BertTokenizerFast(vocab=str(folder / "vocab.txt"), do_lower_case=True, model_max_length=64)
    tok.save_pretrained(str(folder))
    cfg = DistilBertConfig(vocab_size=len(tok), dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                           max_position_embeddings=64)
    torch.manual_seed(0)
    DistilBertModel(cfg).save_pretrained(str(folder))


# ================================================================================================ main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", choices=["all", "metrics", "end-to-end", "quantized"], default="all")
    p.add_argument("--corpus", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=1_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--chunk-size", type=int, default=50_000)
    p.add_argument("--rescore", type=int, default=100, help="the quantized variant's rescoring depth K")
    args = p.parse_args()
    if args.variant == "metrics":
        return run_metrics(args)
    if args.variant == "quantized":
        return run_quantized(args)
    if args.variant == "end-to-end":
        return run_end_to_end(args)
    common = ["--corpus", str(args.corpus), "--queries", str(args.queries), "--dim", str(args.dim)]
    metrics = ["--variant", "metrics", "--chunk-size", str(args.chunk_size)]
    # glibc keeps freed blocks below its (adaptive, up to 32 MB) mmap threshold in the heap, so the process peak
    # also counts fragmentation; with a fixed 1 MB threshold big blocks go back to the OS on free and the peak is
    # close to the live working memory.
    no_fragmentation = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    quantized = ["--variant", "quantized", "--chunk-size", str(args.chunk_size), "--rescore", str(args.rescore)]
    for extra, env, note in ((metrics, None, ""),
                             (metrics, no_fragmentation, " (MALLOC_MMAP_THRESHOLD_=1048576)"),
                             (quantized, None, ""),
                             (quantized, no_fragmentation, " (MALLOC_MMAP_THRESHOLD_=1048576)"),
                             (["--variant", "end-to-end"], None, "")):
        print(f"--- {' '.join(extra)}{note}", flush=True)
        subprocess.run([sys.executable, __file__, *common, *extra], env=env, check=True)  # a fresh peak for each


if __name__ == "__main__":
    main()
