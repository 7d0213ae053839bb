"""Evaluate a sentence encoder on retrieval (IR) and similarity (STS) files, at one or more Matryoshka dims.

    python evaluate.py --model DIR [--model DIR2 ...] [--ir FILE]... [--sts FILE]... [--config FILE|RUN_DIR
                       [key.sub=value ...]] [--dims 768,128] [--batch-size N] [--json OUT]
                       [--precision float32,int8,binary [--rescore K]] [--int8-quantile P]
                       [--index flat,sq8,binary-flat,hnsw,hnsw-sq8] [--plot PNG]

Prints a markdown table per eval set (one row per metric, one column per dim) and, with `--json OUT`, writes
{"<dim>": {"<set name>": {"<metric>": value}}} (NaN as null); a set's name is its file's stem
(`dev_ir.jsonl.gz` → `dev_ir`). `--config FILE` adds a training config's eval sets: its `eval.ir` / `eval.sts`
and the hold-out of every task with `holdout` (the same rows training left out). The hold-out is drawn from the
config's `train.seed` and `holdout` fraction, so give the run's own: its folder (`--config runs/x`, which reads the
resolved `runs/x/config.json`, overrides included), or the config file and the same `key.sub=value` overrides the
run had. Each hold-out's seed, fraction and rows are printed.

Several `--model`s give the model card's "Comparison with V4" table: per eval set, a column per (model, dim), dims
first, and after every value of the second and later models its relative change against the first model at the
same dim, 100 · (v − v₁) / v₁ ("0.8372 (+0.48%)"). The `--json` file is then
{"models": [...], "results": {model: {dim: {set: {metric: value}}}},
 "relative_change_percent": {model: {dim: {set: {metric: value}}}}} (the first model has no relative change).

With `--precision` (one model), each retrieval set's table has one row per dim × precision instead (bytes per
vector, storage relative to the full float32 vector, every IR metric; bertino/quantization.py says how int8 and
binary vectors are made and scored; `--rescore K` adds binary's top K re-ranked by the float query), STS sets stay
float32, and the JSON file gains the precision level: {"<precision>": {"<dim>": {"<set name>": {"<metric>": value}}}}.
With `--index` (one model; the faiss extra) the retrieval sets also go through FAISS indexes
(bertino/vector_indexes.py): their rows join that table at the bytes per vector each index stores, a second table
gives recall@10 against the exact search, build seconds and query milliseconds, and each index is one more level of
the JSON file, its figures beside its metrics. `--plot PNG` draws NDCG@10 against bytes per vector, one line per dim.
`--dims` defaults to the Matryoshka dims the model folder records (`config_sentence_transformers.json`,
key `bertino.matryoshka_dims`, written by `SentenceEncoder.save_pretrained`), else those of `--config` (its
`eval.dims`, else `matryoshka.dims`), else the model's full dim. Every model's dims are checked before anything is
encoded (a dim a model lacks names the model; models that share no dim are an error), and so is the `--json` target.
A user's mistake (bad file, bad dims, unloadable model) prints one `error: ...` line and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

from bertino.errors import CheckpointError, ConfigError
from bertino.plumbing.cli import ArgumentParser, UsageError, run_cli
from bertino.plumbing.files import atomic_write, read_json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, action="append", metavar="MODEL",
                   help="model folder (or pypi:NAME==VERSION, or a hub id); repeat it to compare models")
    p.add_argument("--ir", action="append", default=[], metavar="FILE",
                   help='retrieval JSONL: {"query": ..., "positive": ...[, "negative_1": ...]} (repeatable)')
    p.add_argument("--sts", action="append", default=[], metavar="FILE",
                   help='similarity JSONL: {"sentence1": ..., "sentence2": ..., "score": ...} (repeatable)')
    p.add_argument("--config", type=Path, default=None, metavar="FILE|RUN_DIR",
                   help="a training config, or a run folder (its resolved config.json): evaluate on its eval sets "
                        "and its tasks' hold-outs")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="with --config: the run's overrides (e.g. train.seed=7), which decide its hold-out")
    p.add_argument("--dims", type=parse_dims, default=None,
                   help="comma-separated dims, e.g. 768,128 (default: the model's Matryoshka dims, else its dim)")
    p.add_argument("--batch-size", type=int, default=32, help="texts per encoding batch (default 32)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON here")
    p.add_argument("--precision", type=parse_names, default=None, metavar="P,P",
                   help="retrieval at these vector precisions too: float32, int8 (per-dimension min/max of the "
                        "corpus, int8 dot product), binary (sign bits, Hamming distance)")
    p.add_argument("--rescore", type=int, default=None, metavar="K",
                   help="with binary: also re-rank its top K by the float query, against the ±1 bits and against "
                        "the int8 documents")
    p.add_argument("--int8-quantile", type=float, default=0.0, metavar="P",
                   help="int8's range per dimension: the corpus' P and 1-P quantiles (default 0: min and max)")
    p.add_argument("--index", type=parse_names, default=None, metavar="I,I",
                   help="retrieval through these FAISS indexes too (needs pip install 'bertino[faiss]'): flat, "
                        "sq8, binary-flat, hnsw, hnsw-sq8; with recall@10 against the exact search, bytes per "
                        "vector, build seconds and query milliseconds")
    p.add_argument("--plot", type=Path, default=None, metavar="PNG",
                   help="with --precision or --index: draw NDCG@10 against bytes per vector, a line per dim, into "
                        "this PNG (needs pip install 'bertino[plots]')")
    args = p.parse_args(argv)
    if not args.ir and not args.sts and args.config is None:
        raise UsageError("nothing to evaluate: give at least one --ir FILE, --sts FILE or --config FILE")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.rescore is not None and args.precision is None:
        raise UsageError(f"--rescore {args.rescore}: rescoring re-ranks the binary search's candidates; add "
                         f"--precision ...,binary")
    if args.precision is not None and len(args.model) > 1:
        raise UsageError("--precision evaluates one model at a time; give one --model")
    if args.precision is not None:
        from bertino.eval_names import check_precisions

        check_precisions(args.precision, args.rescore)
    if args.overrides and args.config is None:
        raise UsageError(f"{args.overrides[0]}: overrides apply to --config; give --config FILE (or a run folder)")
    check_writable(args.json)  # checked now, not after an hour of encoding
    if args.index is not None:
        from bertino.eval_names import check_indexes
        from bertino.vector_indexes import require_faiss

        if len(args.model) > 1:
            raise UsageError("--index evaluates one model at a time; give one --model")
        check_indexes(args.index)
        require_faiss()  # now, not after the encoding
    if not 0.0 <= args.int8_quantile < 0.5:
        raise UsageError(f"--int8-quantile must be in [0, 0.5), got {args.int8_quantile}")
    if args.plot is not None:
        from bertino.plot import require_matplotlib

        if args.precision is None and args.index is None:
            raise UsageError("--plot draws the storage-vs-quality results: add --precision and/or --index")
        if not args.plot.parent.is_dir():
            raise UsageError(f"--plot {args.plot}: folder {str(args.plot.parent)!r} does not exist")
        require_matplotlib()
    return args


def check_writable(path: Path | None) -> None:
    """The --json target can be written: its folder exists and takes a new file, and it is not a folder."""
    if path is None:
        return
    if not path.parent.is_dir():
        raise UsageError(f"--json {path}: folder {str(path.parent)!r} does not exist")
    if path.is_dir():
        raise UsageError(f"--json {path}: is a folder; give a file name")
    try:  # the results are written atomically, through a temp file beside the target: try that now
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"--json {path}: cannot write into {str(path.parent)!r} ({e.strerror or e})") from None


def parse_dims(text: str) -> list[int]:
    try:
        return [int(d) for d in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 768,128, got {text!r}") from None


def parse_names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",")]


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


def load_run_config(path: Path, overrides: list[str]):
    """`--config`: a config file, or a run folder (its resolved `config.json`; a checkpoint's `run_config.json`),
    with the overrides applied."""
    from bertino.plumbing.config import load_config

    if path.is_dir():
        found = [path / name for name in ("config.json", "run_config.json") if (path / name).is_file()]
        if not found:
            raise ConfigError(f"--config {path}: a folder, but not a run folder (no config.json) nor a checkpoint "
                              f"(no run_config.json)")
        path = found[0]
    return load_config(path, overrides)


def load_sets(args: argparse.Namespace, cfg=None):
    """The eval sets of the command line, plus those of `--config` (its eval section and its tasks' hold-outs)."""
    from bertino.plumbing.eval_data import load_eval_sets

    ir, sts, holdouts = list(args.ir), list(args.sts), None
    if cfg is not None:
        from bertino.plumbing.data import load_run_data

        ir, sts = ir + list(cfg.eval.ir), sts + list(cfg.eval.sts)
        holdouts = load_run_data(cfg, base_dir=None).holdouts
        for task, held in holdouts.items():  # which rows: the run's seed and fraction decide them
            print(f"bertino: {task}_holdout: the {len(held)} rows of tasks.{task} a run with "
                  f"tasks.{task}.holdout={cfg.tasks[task].holdout} and train.seed={cfg.train.seed} leaves out "
                  f"(from {args.config})", file=sys.stderr)
    return load_eval_sets(ir, sts, holdouts)


def model_dim(model_dir: Path) -> int:
    """A model's embedding dim, from its config.json (before its weights are loaded)."""
    from bertino.model import EncoderConfig
    from bertino.plumbing.model_folder import read_layout

    path = read_layout(model_dir).transformer / "config.json"
    try:
        return EncoderConfig.from_hf_dict(read_json(path)).dim
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: missing or invalid key {e}") from None


def eval_dims(name: str, model_dir: Path, dims: list[int] | None, cfg) -> list[int]:
    """The dims to evaluate `name` at (the module docstring's order), checked against its dim."""
    from bertino.evaluation import check_dims

    source = "--dims"
    if dims is None:
        dims, source = recorded_matryoshka_dims(model_dir), "the Matryoshka dims its folder records"
    if dims is None and cfg is not None:
        dims = list(cfg.eval.dims or (cfg.matryoshka.dims if cfg.matryoshka else ())) or None
        source = "the Matryoshka dims of --config"
    try:
        return check_dims(dims, model_dim(model_dir))
    except ConfigError as e:
        raise ConfigError(f"--model {name}: {e} ({source})") from None


def shared_dims(per_model: dict[str, list[int]]) -> None:
    """Several models are compared at the dims they all have: there must be one."""
    if len(per_model) > 1 and not set.intersection(*(set(d) for d in per_model.values())):
        listed = "; ".join(f"{name} at {dims}" for name, dims in per_model.items())
        raise ConfigError(f"the models share no dim to compare them at ({listed}); give --dims with dims every "
                          f"model has")


def main(argv: list[str] | None = None) -> dict:
    from bertino import SentenceEncoder
    from bertino.evaluation import comparison_table, embed_sets, format_table, relative_changes, score_sets
    from bertino.plumbing.sources import resolve_model_path

    args = parse_args(argv)
    cfg = load_run_config(args.config, args.overrides) if args.config is not None else None
    # Files first: a typo in an eval file should fail in a second, not after loading the model.
    ir_sets, sts_sets = load_sets(args, cfg)
    model_dirs = {name: resolve_model_path(name) for name in args.model}
    dims_of = {name: eval_dims(name, model_dir, args.dims, cfg) for name, model_dir in model_dirs.items()}
    shared_dims(dims_of)  # every dim checked before anything is encoded
    per_model = {}
    for name, model_dir in model_dirs.items():
        encoder = SentenceEncoder.from_pretrained(model_dir)
        dims = dims_of[name]
        embedded = embed_sets(encoder, ir_sets, sts_sets, batch_size=args.batch_size, show_progress_bar=True)
        per_model[name] = score_sets(embedded, ir_sets, sts_sets, dims)  # every text encoded once, at the full dim
    if len(per_model) > 1:
        changes = relative_changes(per_model)
        print(comparison_table(per_model, changes), end="")
        write_results(args.json, {"models": list(per_model), "results": per_model,
                                  "relative_change_percent": changes})
        return per_model

    results = per_model[args.model[0]]
    if args.precision is None and args.index is None:
        print(format_table(results), end="")
        write_results(args.json, results)
        return results

    from bertino.eval_tables import format_index_table, format_precision_table
    from bertino.evaluation import storage_vs_quality

    # --index alone still prints the float32 row: the reference the indexes are measured against
    by_level = storage_vs_quality(embedded, ir_sets, dims, args.precision or ["float32"], rescore=args.rescore,
                                  int8_quantile=args.int8_quantile, indexes=args.index or (), float_results=results)
    q = args.int8_quantile
    statistic = f"{q:g} and {1 - q:g} quantiles" if q else "min/max"
    print(format_precision_table(by_level, encoder.dim, rescore=args.rescore, int8_range=statistic), end="")
    if args.index:
        print("\n" + format_index_table(by_level), end="")
    if args.plot is not None and by_level:
        from bertino.plot import draw_storage

        draw_storage(by_level, args.plot, title=f"{args.model[0]}: storage vs quality")
        print(f"bertino: wrote {args.plot}", file=sys.stderr)
    if sts_sets:  # scored on float32 vectors only: today's table, and the float32 level of the JSON file
        sts = {d: {s.name: results[d][s.name] for s in sts_sets} for d in dims}
        print(("\n" if ir_sets else "") + format_table(sts), end="")
        for d in dims:
            by_level.setdefault("float32", {d: {} for d in dims})[d].update(sts[d])
    write_results(args.json, by_level)
    return by_level


def write_results(path: Path | None, results: dict) -> None:
    """The --json file: the keys as strings, NaN (and an undefined relative change) as null, written atomically."""
    if path is None:
        return

    def plain(value):  # NaN (an STS set on which a collapsed model gives one cosine for all pairs) is not JSON
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        return None if isinstance(value, float) and math.isnan(value) else value

    try:
        atomic_write(path, json.dumps(plain(results), indent=2) + "\n")
    except OSError as e:
        raise ConfigError(f"--json {path}: cannot write the results ({e.strerror})") from None


def run(argv: list[str] | None = None) -> int:
    """main() with a user's mistakes turned into one `error: ...` line on stderr and exit code 2."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(run())
