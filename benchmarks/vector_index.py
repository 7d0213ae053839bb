"""Exact search, SQ8 and HNSW over 1M × 768 vectors: build time, peak memory, query latency and recall@10.

    python benchmarks/vector_index.py                          # every variant, each in a fresh process
    python benchmarks/vector_index.py --variant hnsw           # one of them
    python benchmarks/vector_index.py --corpus 20000 --queries 200   # a quick run

The corpus: N synthetic embedding-like vectors (rank-64 structure plus isotropic noise, L2-normalised; seeded),
written once into DATA_DIR as a .npy file (3 GB at 1M × 768) and read back by every variant; the queries: noisy
copies of Q random corpus vectors. Variants, each in its own process (so each peak is its own):

    exact      bertino's exact path, `metrics.top_k_cosine` in (query chunk × corpus chunk) blocks as the evaluation
               scores them (float64 sums; the reference)
    flat       FAISS IndexFlatIP (exhaustive float32)
    sq8        FAISS IndexScalarQuantizer 8-bit, built by `vector_indexes.build_index`
    hnsw       FAISS IndexHNSWFlat (M = 32, efConstruction 40, efSearch 128), the same
    hnsw-sq8   FAISS IndexHNSWSQ, the same

Reported per variant: build seconds (with `--threads` OpenMP threads); the index's bytes per vector
(`vector_indexes.stored_bytes`) and in all; peak memory — VmHWM − VmRSS with the corpus loaded, the peak counter
reset just before the build (`/proc/self/clear_refs`), under MALLOC_MMAP_THRESHOLD_=1 MiB so freed blocks go back
to the OS: what building and searching the index needs beside the float32 corpus the evaluation already holds;
query milliseconds, one query per call on one thread (a serving process answers one query per thread) and all
queries in one call on `--threads` threads, at depth 10; recall@10 against the exact top 10 (the `exact` variant
writes it first) and the share of queries whose source vector is in the top 10. The results go to
benchmarks/results/vector_index.json and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("exact", "flat", "sq8", "hnsw", "hnsw-sq8")
MB = 1 << 20
GENERATE_ROWS = 1 << 16


def proc_status_kib(key: str) -> int:
    m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(m.group(1))


def reset_peak() -> int:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; the current RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return proc_status_kib("VmRSS") * 1024


def machine() -> dict:
    cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vpopcntdq")
    import faiss

    return {"cpu": cpu.group(1) if cpu else "", "cores": os.cpu_count(),
            "flags": [f for f in wanted if flags and f in flags.group(1).split()],
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "faiss": faiss.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


# ================================================================================================ data
def data_files(args) -> tuple[Path, Path]:
    stem = f"corpus_{args.corpus}x{args.dim}_seed{args.seed}"
    return Path(args.data_dir) / f"{stem}.npy", Path(args.data_dir) / f"{stem}_q{args.queries}.npz"


def generate(args) -> None:
    """The corpus (N, D) float32, unit rows, written GENERATE_ROWS at a time into a .npy; the queries and their
    source ids into an .npz. Seeded: every run and variant sees the same vectors."""
    corpus_file, query_file = data_files(args)
    if corpus_file.exists() and query_file.exists():
        return
    Path(args.data_dir).mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(args.seed)
    basis = g.normal(size=(64, args.dim)).astype(np.float32) / 8  # (64, D): the shared structure
    out = np.lib.format.open_memmap(corpus_file.with_suffix(".tmp.npy"), mode="w+", dtype=np.float32,
                                    shape=(args.corpus, args.dim))
    for s in range(0, args.corpus, GENERATE_ROWS):
        n = min(GENERATE_ROWS, args.corpus - s)
        x = g.normal(size=(n, 64)).astype(np.float32) @ basis  # (n, D) rank 64
        x += 0.6 * g.normal(size=(n, args.dim)).astype(np.float32)  # isotropic noise
        out[s : s + n] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
    del out
    corpus_file.with_suffix(".tmp.npy").replace(corpus_file)
    corpus = np.load(corpus_file, mmap_mode="r")
    source = g.choice(args.corpus, size=args.queries, replace=False)  # (Q,)
    noise = 0.6 * g.normal(size=(args.queries, args.dim)).astype(np.float32) / np.sqrt(args.dim)  # |noise| ≈ 0.6
    queries = corpus[np.sort(source)] + noise
    np.savez(query_file, queries=queries.astype(np.float32), source=np.sort(source))


# ================================================================================================ variants
def run_variant(args) -> dict:
    from bertino import vector_indexes as vi
    from bertino.metrics import top_k_cosine
    from bertino.vector_indexes import exact_top_ids

    corpus_file, query_file = data_files(args)
    corpus = torch.from_numpy(np.load(corpus_file))  # (N, D) float32 in memory, as the evaluation holds it
    stored = np.load(query_file)
    queries, source = torch.from_numpy(stored["queries"]), stored["source"]
    exact_file = corpus_file.with_name(corpus_file.stem + f"_q{args.queries}_exact_top10.npy")
    vi.HNSW_EF_CONSTRUCTION = args.ef_construction
    vi.HNSW_EF_SEARCH = args.ef_search
    out = {"variant": args.variant, "n": args.corpus, "d": args.dim, "queries": args.queries,
           "threads": args.threads, "load_before": os.getloadavg()}
    before = reset_peak()
    if args.variant == "exact":
        out["build_seconds"], out["bytes_per_vector"] = 0.0, 4 * args.dim
        torch.set_num_threads(args.threads)
        start = time.perf_counter()
        ids = exact_top_ids(queries, corpus, 10, 50_000).numpy()  # (Q, 10) in the evaluation's (R, C) blocks
        out["query_ms_batched"] = 1000 * (time.perf_counter() - start) / args.queries
        np.save(exact_file, ids)
        torch.set_num_threads(1)
        start = time.perf_counter()
        for i in range(args.single_exhaustive):
            top_k_cosine(queries[i : i + 1], corpus, 10)
        out["query_ms"] = 1000 * (time.perf_counter() - start) / args.single_exhaustive
    else:
        with vi.faiss_threads(args.threads):
            if args.variant == "flat":
                import faiss

                start = time.perf_counter()
                index = faiss.IndexFlatIP(args.dim)
                for s in range(0, args.corpus, vi.ADD_ROWS):
                    index.add(corpus[s : s + vi.ADD_ROWS].numpy())  # already unit rows
                out["build_seconds"] = time.perf_counter() - start
            else:
                index, out["build_seconds"] = vi.build_index(args.variant, corpus, threads=args.threads)
            out["after_build_rise_mb"] = (proc_status_kib("VmHWM") * 1024 - before) / MB
            q = vi.unit_float32(queries)
            start = time.perf_counter()
            _, ids = index.search(q, 10)
            out["query_ms_batched"] = 1000 * (time.perf_counter() - start) / args.queries
        single = args.single_exhaustive if args.variant in ("flat", "sq8") else min(args.queries, 200)
        with vi.faiss_threads(1):
            start = time.perf_counter()
            for i in range(single):
                index.search(q[i : i + 1], 10)
            out["query_ms"] = 1000 * (time.perf_counter() - start) / single
        out["bytes_per_vector"] = vi.stored_bytes(index)
    out["peak_rise_mb"] = (proc_status_kib("VmHWM") * 1024 - before) / MB
    out["index_mb"] = out["bytes_per_vector"] * args.corpus / MB
    exact = np.load(exact_file)
    out["recall_vs_exact@10"] = float(np.mean([len(set(a) & set(b)) / 10
                                               for a, b in zip(ids.tolist(), exact.tolist())]))
    out["source_in_top10"] = float(np.mean([s in row for s, row in zip(source.tolist(), ids.tolist())]))
    out["load_after"] = os.getloadavg()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", choices=("all", *VARIANTS), default="all")
    p.add_argument("--corpus", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--queries", type=int, default=1_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--ef-construction", type=int, default=40)
    p.add_argument("--ef-search", type=int, default=128)
    p.add_argument("--single-exhaustive", type=int, default=20,
                   help="queries timed one per call by the exhaustive variants (the HNSW ones: 200)")
    p.add_argument("--data-dir", default="/tmp/bertino-vector-index-bench")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "vector_index.json")
    args = p.parse_args()
    generate(args)  # once: the later runs read the same files
    if args.variant != "all":
        if args.variant != "exact" and not data_files(args)[0].with_name(
                data_files(args)[0].stem + f"_q{args.queries}_exact_top10.npy").exists():
            p.error(f"--variant {args.variant} compares with the exact top 10: run --variant exact first")
        print(json.dumps(run_variant(args)), flush=True)
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    results = {"machine": machine(), "command": " ".join(sys.argv), "variants": []}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant, "--corpus", str(args.corpus), "--dim", str(args.dim),
               "--queries", str(args.queries), "--seed", str(args.seed), "--threads", str(args.threads),
               "--ef-construction", str(args.ef_construction), "--ef-search", str(args.ef_search),
               "--single-exhaustive", str(args.single_exhaustive), "--data-dir", args.data_dir]
        print(f"--- {variant}", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True)
        results["variants"].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(results["variants"][-1]), file=sys.stderr, flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)


def print_table(results: dict) -> None:
    m = results["machine"]
    print(f"\n{m['cpu']} ({m['cores']} cores, {', '.join(m['flags'])}), faiss {m['faiss']}, torch {m['torch']}")
    print("\n| variant | build s | bytes/vector | index MB | peak rise MB | query ms (1 per call, 1 thread) | "
          "query ms (batched) | recall@10 vs exact | source in top 10 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results["variants"]:
        print(f"| {r['variant']} | {r['build_seconds']:.1f} | {r['bytes_per_vector']:.0f} | {r['index_mb']:.0f} | "
              f"{r['peak_rise_mb']:.0f} | {r['query_ms']:.2f} | {r['query_ms_batched']:.3f} | "
              f"{r['recall_vs_exact@10']:.4f} | {r['source_in_top10']:.4f} |")


if __name__ == "__main__":
    main()
