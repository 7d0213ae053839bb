"""Texts per second of `SentenceEncoder.encode` on the demo's passages and queries (and sentence-transformers').

    python benchmarks/encode.py                                  # bertino alone
    /work/stvenv/bin/python benchmarks/encode.py --compare-st    # + SentenceTransformer.encode, same process

The texts: the distinct passages and queries of `data/demo/train.jsonl.gz` (first `--limit` of each), encoded with
the model's own max_seq_length (256 for all-MiniLM-L6-v2), batch size `--batch-size`, float32 output. Timings are
medians over `--reps` runs after one warm-up; with `--compare-st` the two implementations alternate run by run and
the script checks that their embeddings agree.

What `encode` does (bertino/encoder.py): tokenize once (in chunks, into one flat int32 array: `PackedTokenIds` in
bertino/batching.py), sort by token count, batch with `length_sorted_batches(lengths, batch_size, grow=True)`
(batch_size texts, plus any more of exactly the batch's longest length that fit in batch_size × the longest text's
tokens: short texts run in large batches with little or no padding), pad each batch to its own longest text, eval
mode, SDPA's fused CPU kernel (no attention mask for a batch without padding), rows put back in input order.
sentence-transformers sorts by character count and pads fixed batches: on the demo texts it pads 14.7% (passages)
and 23.2% (queries) of its tokens, bertino 3.2% and 3.2%.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_step import MODEL, load_pairs, machine, write_results  # noqa: E402

from bertino import SentenceEncoder  # noqa: E402
from bertino.plumbing.sources import resolve_model_path  # noqa: E402


def demo_texts(limit: int) -> dict[str, list[str]]:
    pairs = load_pairs()
    return {"passages": list(dict.fromkeys(p for _, p in pairs))[:limit],
            "queries": list(dict.fromkeys(q for q, _ in pairs))[:limit]}


def time_encoders(runners: dict, texts: list[str], reps: int) -> dict:
    """runners: name → fn(texts) → (N, D) array. Alternating runs; texts/s from the median of `reps` runs."""
    outputs = {name: fn(texts) for name, fn in runners.items()}  # warm-up, and the outputs to compare
    seconds = {name: [] for name in runners}
    names = list(runners)
    for rep in range(reps):
        for name in (names if rep % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            runners[name](texts)
            seconds[name].append(time.perf_counter() - start)
    rate = {name: len(texts) / statistics.median(xs) for name, xs in seconds.items()}
    out = {"n": len(texts), "texts_per_s": rate, "all_s": seconds}
    if len(outputs) == 2:
        a, b = outputs.values()
        out["max_abs_diff"] = float(np.abs(a - b).max())
    return out


def compare(model: str, batch_size: int, limit: int, reps: int, compare_st: bool, device: str = "cpu") -> dict:
    folder = resolve_model_path(model)
    ours = SentenceEncoder.from_pretrained(folder).to(device)
    runners = {"bertino": lambda texts: ours.encode(texts, batch_size=batch_size)}
    if compare_st:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(folder), device=device)
        assert st.max_seq_length == ours.max_seq_length, (st.max_seq_length, ours.max_seq_length)
        runners["sentence-transformers"] = lambda texts: st.encode(texts, batch_size=batch_size,
                                                                   convert_to_numpy=True, show_progress_bar=False)
    results = {"max_seq_length": ours.max_seq_length, "batch_size": batch_size}
    for name, texts in demo_texts(limit).items():
        r = time_encoders(runners, texts, reps)
        line = f"encode {r['n']} {name}: " + ", ".join(f"{k} {v:.1f} texts/s" for k, v in r["texts_per_s"].items())
        if compare_st:
            r["ratio_bertino_over_st"] = r["texts_per_s"]["bertino"] / r["texts_per_s"]["sentence-transformers"]
            line += f" → {r['ratio_bertino_over_st']:.2f}×, max |Δ| {r['max_abs_diff']:.1e}"
        print(line, flush=True)
        results[name] = r
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=MODEL)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, default=1000, help="texts of each kind")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--compare-st", action="store_true", help="also time sentence-transformers (must be installed)")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "encode.json")
    args = p.parse_args()
    results = {"machine": machine(), "config": {k: str(v) for k, v in vars(args).items()},
               "load_before": os.getloadavg()}
    if args.compare_st:
        import sentence_transformers

        results["machine"]["sentence_transformers"] = sentence_transformers.__version__
    torch.manual_seed(0)
    results["encode"] = compare(args.model, args.batch_size, args.limit, args.reps, args.compare_st, args.device)
    write_results(args.json, results)


if __name__ == "__main__":
    main()
