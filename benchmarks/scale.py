"""Training data and hard-negative mining at 100k, 1M and 10M rows: memory, time to the first step, steps/s.

    python benchmarks/scale.py train --rows 100000 1000000 10000000 [--code DIR] [--workdir /tmp/bertino-scale]
    python benchmarks/scale.py mine --rows 1000000 [--kill-after 3] [--search-rows 20000]

The rows are synthetic Italian-like retrieval rows, generated on the fly into a parquet file under `--workdir` and
deleted at the end (`--keep` keeps them): a query of ~60 characters, a positive and a `hard_negatives` list of 2
passages of ~700 characters each (nickprock/it-wiki-retrieval-synthetic-hn's layout and sizes; ~2.1 KB of text a
row), made of sentences drawn from a pool of Italian-like sentences, every text made unique by a numbered prefix.

`train`: `train.py` on a tiny random DistilBERT (2 layers, dim 32, so the step costs little and the data layer
shows), one cached-MNRL task reading the list column, B = 128, 30 steps, run as a subprocess and watched every
50 ms: peak **anonymous** RSS (RssAnon of /proc/PID/status: the process's own memory, not the page cache of the
memory-mapped files), the time from start to the first step's line in metrics.jsonl, steps/s over the other steps.
Each size runs twice — the first run prepares the data (conversion to Arrow, hashes, checks), the second reuses
it — and a 1,000-row run gives the RSS of the model, the optimizer and the libraries, which the targets exclude.
`--code DIR` runs another checkout's train.py on the same data (the code before the Arrow layer, for a comparison).

`mine`: `python -m bertino.mine` on the rows' (query, positive) columns with the same tiny encoder: the embedding
cache is filled `--encode-chunk` texts at a time; the run is killed (SIGKILL) once `--kill-after` chunks are on disk,
then run again: it must encode only the remaining chunks. Peak RssAnon and texts/s of each run are reported. The
search is O(queries × corpus): on a CPU, all 1M queries against 1M passages take hours, so `--search-rows N` (default
20,000) times the search for the first N rows' queries against the whole corpus and extrapolates.

Prints a markdown table and writes scale_train.json / scale_mine.json into benchmarks/results/ (machine, load
average, raw numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("il la lo le gli di che è un una del della dei per con non si da nel nella sono come anche più questo "
         "questa tabella cella documento testo pagina formato modifica inserire selezionare colonna riga foglio "
         "calcolo dati valore funzione finestra menu comando opzione stile carattere paragrafo immagine oggetto "
         "campo elenco numero data ora città acqua sole mare casa gatto cane libro storia parte anno tempo modo "
         "governo paese lavoro vita mondo giorno esempio sistema punto caso gruppo regione provincia comune fiume "
         "montagna chiesa castello secolo guerra re famiglia nome lingua popolazione territorio").split()


# ================================================================================================ the data
def sentence_pool(n: int, rng: np.random.Generator, words: tuple[int, int] = (6, 14)) -> list[str]:
    lengths = rng.integers(*words, n)
    words = rng.integers(0, len(WORDS), int(lengths.sum()))
    out, k = [], 0
    for length in lengths.tolist():
        s = " ".join(WORDS[i] for i in words[k:k + length])
        k += length
        out.append(s[0].upper() + s[1:] + ".")
    return out


def write_rows(path: Path, n_rows: int, seed: int = 0, batch: int = 100_000) -> None:
    """n_rows retrieval rows into a parquet file, `batch` at a time, with Arrow's string kernels (no Python loop
    over rows): ~20 s per million rows."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    pool = pa.array(sentence_pool(50_000, rng))
    questions = pa.array(sentence_pool(50_000, rng, words=(4, 9)))
    schema = pa.schema([("query", pa.string()), ("positive", pa.string()),
                        ("hard_negatives", pa.list_(pa.string()))])

    def texts(tag: str, start: int, n: int, sentences: int, source: pa.Array = pool) -> pa.Array:
        prefix = pc.binary_join_element_wise(pa.array([tag] * n), pa.array(np.arange(start, start + n)).cast(
            pa.string()), ":")
        parts = [source.take(pa.array(rng.integers(0, len(source), n))) for _ in range(sentences)]
        return pc.binary_join_element_wise(prefix, *parts, " ")

    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, n_rows, batch):
            n = min(batch, n_rows - start)
            negatives = [texts(f"Passaggio {j}", start, n, 10) for j in (1, 2)]
            interleaved = pa.concat_arrays(negatives).take(pa.array(np.stack([np.arange(n), np.arange(n) + n],
                                                                             1).ravel()))
            lists = pa.ListArray.from_arrays(pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32)), interleaved)
            writer.write_table(pa.table({"query": texts("Domanda", start, n, 1, questions),
                                         "positive": texts("Documento", start, n, 10),
                                         "hard_negatives": lists}, schema=schema))


def tiny_model(folder: Path) -> Path:
    if not (folder / "model.safetensors").is_file():
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import make_distilbert

        make_distilbert(folder)
    return folder


# ================================================================================================ watching a process
class Watch:
    """Run a command; every 50 ms read its RssAnon (and its children's) and note when `lines_of` gains lines."""

    def __init__(self, cmd: list[str], env: dict, cwd: Path, lines_of: Path | None = None, log: Path | None = None):
        self.start, self.start_wall = time.perf_counter(), time.time()
        self.log = open(log, "w") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=self.log, stderr=self.log, start_new_session=True)
        self.peak_anon, self.line_times, self.lines_of = 0, [], lines_of
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while self.proc.poll() is None:
            self.peak_anon = max(self.peak_anon, _rss_anon_tree(self.proc.pid))
            if self.lines_of is not None and self.lines_of.is_file():
                n = self.lines_of.read_text().count("\n")
                while len(self.line_times) < n:
                    self.line_times.append(time.perf_counter() - self.start)
            time.sleep(0.05)

    def wait(self, timeout: float | None = None) -> int:
        code = self.proc.wait(timeout)
        self.thread.join()
        self.seconds = time.perf_counter() - self.start
        return code

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.wait()


def _rss_anon_tree(pid: int) -> int:
    """Bytes of anonymous RSS of `pid` and its descendants (torchrun children, tokenizer threads share the pid)."""
    total, pids = 0, [pid]
    while pids:
        p = pids.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("RssAnon"))) * 1024
            pids += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except (OSError, StopIteration, ValueError):
            pass
    return total


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    return {"cpu": cpu, "cores": os.cpu_count(), "bf16": "avx512_bf16" in flags or "amx_bf16" in flags,
            "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version()}


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def env_for(code: Path, workdir: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
            "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_CACHE": str(workdir / "hf-datasets"),
            "HF_HUB_OFFLINE": "1"}


def gib(x: float) -> float:
    return round(x / 2**30, 3)


# ================================================================================================ train
def train_config(workdir: Path, data: Path, out: Path, model: Path, steps: int) -> Path:
    cfg = {"model": {"name_or_path": str(model), "max_seq_length": 32},
           "tasks": {"retrieval": {"dataset": str(data), "columns": ["query", "positive"],
                                   "negatives": {"column": "hard_negatives", "count": 2}, "loss": "cached_mnrl"}},
           "matryoshka": {"dims": [32, 16], "weights": [1.0, 0.4]},
           "train": {"per_device_train_batch_size": 128, "mini_batch_size": 64, "max_steps": steps,
                     "learning_rate": 1e-4, "logging_steps": 1, "save_steps": 0, "output_dir": str(out)}}
    path = workdir / f"{out.name}.json"
    path.write_text(json.dumps(cfg))
    return path


def run_train(code: Path, workdir: Path, data: Path, name: str, model: Path, steps: int) -> dict:
    out = workdir / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    config = train_config(workdir, data, out, model, steps)
    before = load()
    w = Watch([sys.executable, str(code / "train.py"), "--config", str(config)], env_for(code, workdir), code,
              lines_of=out / "metrics.jsonl", log=workdir / f"{name}.log")
    code_ = w.wait()
    first = w.line_times[0] if w.line_times else None
    rate = (len(w.line_times) - 1) / (w.line_times[-1] - w.line_times[0]) if len(w.line_times) > 2 else None
    result = {"name": name, "exit": code_, "peak_rss_anon_gib": gib(w.peak_anon), "first_step_s": first,
              "steps_per_s": rate, "wall_s": round(w.seconds, 1), "load_before": before, "load_after": load()}
    print(json.dumps(result), flush=True)
    shutil.rmtree(out, ignore_errors=True)
    return result


def train_main(args) -> None:
    workdir = args.workdir
    model = tiny_model(workdir / "tiny-model")
    results = {"machine": machine(), "code": str(args.code), "runs": []}
    small = workdir / "rows-1000.parquet"
    write_rows(small, 1000)
    results["runs"].append({"rows": 1000, **run_train(args.code, workdir, small, "baseline-1000", model, 10)})
    for n in args.rows:
        data = workdir / f"rows-{n}.parquet"
        t = time.perf_counter()
        write_rows(data, n)
        print(f"generated {n:,} rows in {time.perf_counter() - t:.0f} s ({data.stat().st_size / 2**30:.2f} GiB)",
              flush=True)
        for attempt in ("first", "second"):
            r = run_train(args.code, workdir, data, f"{n}-{attempt}", model, args.steps)
            results["runs"].append({"rows": n, "run": attempt, **r})
        prepared = workdir / "hf-datasets"
        size = sum(p.stat().st_size for p in prepared.rglob("*") if p.is_file()) if prepared.exists() else 0
        results["runs"][-1]["prepared_gib"] = gib(size)
        if not args.keep:
            data.unlink()
            shutil.rmtree(prepared, ignore_errors=True)
    small.unlink()
    _write(results, args.json or ROOT / "benchmarks" / "results" / "scale_train.json")
    base = results["runs"][0]["peak_rss_anon_gib"]
    print("\n| rows | run | peak RssAnon (GiB) | beyond the 1k-row run | first step (s) | steps/s | load |")
    print("|---:|---|---:|---:|---:|---:|---|")
    for r in results["runs"][1:]:
        print(f"| {r['rows']:,} | {r['run']} | {r['peak_rss_anon_gib']:.2f} | {r['peak_rss_anon_gib'] - base:.2f} | "
              f"{r['first_step_s'] or float('nan'):.1f} | {r['steps_per_s'] or float('nan'):.1f} | "
              f"{r['load_before']} |")


# ================================================================================================ mine
def mine_main(args) -> None:
    workdir = args.workdir
    model = tiny_model(workdir / "tiny-model")
    n = args.rows[0]
    data = workdir / f"rows-{n}.parquet"
    write_rows(data, n)
    cache = workdir / "mine-cache"
    shutil.rmtree(cache, ignore_errors=True)
    out = workdir / "mined.parquet"
    cmd = [sys.executable, "-m", "bertino.mine", "--model", str(model), "--input", str(data), "--output", str(out),
           "--encode-chunk", str(args.encode_chunk), "--cache-dir", str(cache), "--max-seq-length", "32",
           "--batch-size", "256", "--no-progress"]
    env = env_for(args.code, workdir)
    results = {"machine": machine(), "rows": n, "encode_chunk": args.encode_chunk, "runs": []}

    def chunks() -> int:
        return len(list(cache.rglob("chunk-*.npy")))

    # 1) killed once `kill_after` chunks are on disk
    w = Watch(cmd, env, args.code, log=workdir / "mine-1.log")
    while chunks() < args.kill_after and w.proc.poll() is None:
        time.sleep(0.2)
    t_kill = time.perf_counter() - w.start
    done_at_kill = chunks()
    w.kill()
    results["runs"].append({"run": "killed", "peak_rss_anon_gib": gib(w.peak_anon), "seconds": round(t_kill, 1),
                            "chunks_on_disk": done_at_kill, "load": load()})
    # 2) resumed: encodes the rest only; the search on `search_rows` rows' queries is timed separately
    stamps = {p: p.stat().st_mtime_ns for p in cache.rglob("chunk-*.npy")}
    w = Watch(cmd + ["--search", "auto"], env, args.code, log=workdir / "mine-2.log")
    while w.proc.poll() is None:
        total = max(1, -(-_texts(n) // args.encode_chunk))
        if chunks() >= total:
            break
        time.sleep(0.2)
    t_encoded = time.perf_counter() - w.start
    w.kill()  # the full 1M × 1M search is hours on a CPU: timed below on a sample of queries
    untouched = all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # finished chunks not encoded again
    new_chunks = chunks() - done_at_kill
    # texts are encoded queries first (chunks of ~70-character queries), then passages: a rate for each, from the
    # times the chunk files of the resumed run were written
    done = sorted((p.stat().st_mtime, int(p.stem.split("-")[1])) for p in cache.rglob("chunk-*.npy")
                  if p not in stamps)
    times = np.diff([w.start_wall] + [t for t, _ in done])  # seconds per chunk of the resumed run
    passages = [dt for dt, (_, i) in zip(times, done) if i * args.encode_chunk >= n]
    queries = [dt for dt, (_, i) in zip(times, done) if (i + 1) * args.encode_chunk <= n]
    results["runs"].append({"run": "resumed (encoding)", "peak_rss_anon_gib": gib(w.peak_anon),
                            "seconds": round(t_encoded, 1), "new_chunks": new_chunks,
                            "earlier_chunks_untouched": untouched,
                            "queries_per_s": round(args.encode_chunk / np.median(queries)) if queries else None,
                            "passages_per_s": round(args.encode_chunk / np.median(passages)) if passages else None,
                            "load": load()})
    # 3) the search of the first `search_rows` rows, whole corpus, in a subprocess of its own
    search = Watch([sys.executable, str(Path(__file__).resolve()), "_search", "--cache", str(cache), "--data",
                    str(data), "--model", str(model), "--encode-chunk", str(args.encode_chunk), "--search-rows",
                    str(args.search_rows)], env, args.code, log=workdir / "mine-3.log")
    search.wait()
    timing = json.loads((workdir / "mine-3.log").read_text().strip().splitlines()[-1])
    results["runs"].append({"run": "search sample", "peak_rss_anon_gib": gib(search.peak_anon), **timing,
                            "load": load()})
    print(json.dumps(results, indent=1))
    if not args.keep:
        data.unlink()
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(workdir / "hf-datasets", ignore_errors=True)
    _write(results, args.json or ROOT / "benchmarks" / "results" / "scale_mine.json")


def _texts(n: int) -> int:
    return 2 * n  # every query and every positive is distinct in the synthetic rows


def search_sample(args) -> None:
    """(subprocess) select_negatives for the first rows' queries against the whole cached corpus."""
    import torch

    from bertino import SentenceEncoder
    from bertino.hard_negatives import select_negatives
    from bertino.mine import load_rows, plan_corpus
    from bertino.plumbing.embedding_cache import EmbeddingCache, cache_key, model_fingerprint

    rows = load_rows(args.data)
    plan = plan_corpus(rows, [])
    encoder = SentenceEncoder.from_pretrained(args.model, max_seq_length=32)
    key = cache_key(model_fingerprint(encoder), plan.text_hashes, args.encode_chunk, 256)
    cache = EmbeddingCache(args.cache / key, len(plan.text_hashes), args.encode_chunk)
    corpus = torch.from_numpy(cache.gather("corpus", plan.corpus_rows))
    m = args.search_rows
    queries = torch.from_numpy(cache.gather("queries", plan.query_rows[:m]))
    start = time.perf_counter()
    select_negatives(queries, corpus, torch.from_numpy(plan.row_query[:m]), torch.from_numpy(plan.row_positive[:m]),
                     torch.from_numpy(plan.excluded[plan.excluded < m * plan.n_corpus]),  # rows' queries: ids < m
                     search="auto")
    seconds = time.perf_counter() - start
    print(json.dumps({"search_queries": m, "corpus": plan.n_corpus, "seconds": round(seconds, 1),
                      "queries_per_s": round(m / seconds, 1),
                      "all_queries_estimate_h": round(plan.n_queries / (m / seconds) / 3600, 2)}))


def _write(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["train", "mine", "generate", "_search"])
    p.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bertino-scale"))
    p.add_argument("--code", type=Path, default=ROOT, help="the checkout whose train.py / bertino.mine runs")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--keep", action="store_true", help="keep the generated and prepared data")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--encode-chunk", type=int, default=100_000)
    p.add_argument("--kill-after", type=int, default=3, help="mine: SIGKILL once this many chunks are on disk")
    p.add_argument("--search-rows", type=int, default=20_000)
    p.add_argument("--cache", type=Path)
    p.add_argument("--data", type=Path)
    p.add_argument("--model", type=Path)
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.what == "train":
        train_main(args)
    elif args.what == "mine":
        mine_main(args)
    elif args.what == "_search":
        search_sample(args)
    else:
        for n in args.rows:
            write_rows(args.workdir / f"rows-{n}.parquet", n)


if __name__ == "__main__":
    main()
