"""`python -m bertino.plot RUN_DIR`: a run's curves, drawn from its metrics.jsonl into RUN_DIR/curves.png.

    python -m bertino.plot runs/demo [--metrics ndcg@10,map@100] [--output FILE]

The panels, each against the optimizer step: the loss of every task (its weighted Matryoshka total), the
unweighted loss at each Matryoshka dim of every task that logs them, the learning rate, and for every eval set
each chosen metric (default: ndcg@10 for retrieval sets, spearman_cosine for STS sets) with one line per dim.
`curve_series` builds the series from the records (no drawing, so they can be checked against metrics.jsonl);
`figure` draws them, `draw` writes the image (PNG; `--output` in the format its suffix names: .pdf, .svg, ...).
The run's model folders (final/, best/) get a copy of the image and a link to it in their model card, and — where
they hold storage-vs-quality results (eval_results_by_precision.json) — a plot of NDCG@10 against bytes per vector,
one line per dim (`storage_series`, `draw_storage`; also `evaluate.py --plot`), linked under the card's "Storage vs
quality" table. matplotlib is an optional extra (`pip install 'bertino[plots]'`), imported only here.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

from .errors import ConfigError, DataError
from .eval_tables import metric_label
from .plumbing.cli import ArgumentParser, run_cli
from .plumbing.files import atomic_write, read_json
from .plumbing.model_card import with_curves, with_storage_plot
from .plumbing.run_folder import PRECISION_RESULTS

DEFAULT_METRICS = ("ndcg@10", "spearman_cosine")
STORAGE_PLOT = "storage_vs_quality.png"  # in final/ and best/: NDCG@10 against bytes per vector
INSTALL = "pip install 'bertino[plots]' (or pip install matplotlib)"

Series = dict[str, dict[str, tuple[list[int], list[float]]]]  # panel title → line label → (steps, values)


def read_records(path: Path) -> list[dict]:
    """metrics.jsonl's objects; a last line cut short (the run is still writing, or was killed) is left out."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file (is {path.parent} a bertino run folder?)") from None
    records = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):
                break
            raise DataError(f"{path}:{n}: invalid JSON: {e.msg} (column {e.colno})") from None
        if isinstance(record, dict):
            records.append(record)
    return records


def curve_series(records: list[dict], metrics: tuple[str, ...] = DEFAULT_METRICS) -> Series:
    """The plotted series, in panel order: "loss" (a line per task), "loss/TASK per dim" (a line per dim), "lr",
    and "eval: SET METRIC" (a line per dim) for each chosen metric an eval set reports. null values are NaN."""
    series: Series = {}

    def add(panel: str, label: str, step: int, value) -> None:
        steps, values = series.setdefault(panel, {}).setdefault(label, ([], []))
        steps.append(step)
        values.append(math.nan if value is None else float(value))

    logged = [r for r in records if "lr" in r]
    for r in logged:  # loss totals first, so the panels come in the order of the docstring
        for key, value in r.items():
            if key.startswith("loss/") and key.count("/") == 1:
                add("loss", key.split("/")[1], r["step"], value)
    for r in logged:
        for key, value in r.items():
            if key.startswith("loss/") and key.count("/") == 2:
                _, task, dim = key.split("/")
                add(f"loss/{task} per dim", dim, r["step"], value)
    for r in logged:
        add("lr", "lr", r["step"], r["lr"])
    for r in records:
        for dim, sets in r.get("eval", {}).items():
            for name, values in sets.items():
                for metric in metrics:
                    if metric in values:
                        add(f"eval: {name} {metric}", f"{dim}d", r["step"], values[metric])
    return series


def image_format(path: Path) -> str:
    """The image format `path`'s suffix names (png, pdf, svg, ...: what matplotlib writes), or one clear error."""
    require_matplotlib()
    from matplotlib.backend_bases import FigureCanvasBase

    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in formats:
        found = f".{suffix} is not an image format matplotlib writes" if suffix else "no suffix names the format"
        raise ConfigError(f"--output {path}: {found}; end the name with one of {', '.join('.' + f for f in formats)}")
    return suffix


def draw(series: Series, path: Path, title: str) -> None:
    """`figure(series)` written to `path` (atomically), in the format its suffix names (`curves.png`: PNG)."""
    plt = require_matplotlib()
    _save_image(plt, figure(series, title), path)


def _save_image(plt, fig, path: Path) -> None:
    """`fig` written to `path` atomically, in the format its suffix names."""
    fmt = image_format(path)
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        fig.savefig(tmp, format=fmt, dpi=100)
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)


def figure(series: Series, title: str):
    """One panel per series entry, in a grid of two columns; each line is one label's (steps, values)."""
    plt = require_matplotlib()
    if not series:
        raise DataError(f"{title}: metrics.jsonl holds no logged step or evaluation yet: nothing to draw")
    cols = 2 if len(series) > 1 else 1
    rows = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.6 * rows), squeeze=False)
    for ax, (panel, lines) in zip(axes.flat, series.items()):
        for label, (steps, values) in lines.items():
            ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, label=label)
        ax.set_title(panel)
        ax.set_xlabel("step")
        if panel == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        else:
            ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# ================================================================================================ storage vs quality
def storage_series(by_level: dict, metric: str = "ndcg@10") -> dict[str, dict[str, list[tuple[float, float, str]]]]:
    """{IR set: {"384d": [(bytes per vector, metric, level), ...] by bytes}} from storage-vs-quality results
    ({level: {dim: {set: metrics}}}, as `evaluate.py --precision/--index --json` and a model folder's
    eval_results_by_precision.json hold them): one line per dim, a point per precision or index."""
    from .eval_tables import stored_bytes

    out: dict[str, dict[str, list[tuple[float, float, str]]]] = {}
    for level, by_dim in by_level.items():
        for d, sets in by_dim.items():
            for name, values in sets.items():
                if values.get(metric) is not None and "map@100" in values:  # retrieval sets only
                    point = (float(stored_bytes(level, int(d), values)), float(values[metric]), level)
                    out.setdefault(name, {}).setdefault(f"{int(d)}d", []).append(point)
    for lines in out.values():
        for points in lines.values():
            points.sort()
    return out


def draw_storage(by_level: dict, path: Path, title: str, metric: str = "ndcg@10") -> None:
    """NDCG@10 against bytes per vector (log scale): one panel per IR set, one line (colour) per dim through its
    precisions and indexes by size, a marker shape per precision or index; written as a PNG to `path`."""
    plt = require_matplotlib()
    from matplotlib.lines import Line2D

    series = storage_series(by_level, metric)
    if not series:
        raise DataError(f"{title}: no retrieval results to draw")
    shapes = "os^vD<>pP*Xh"
    levels = list(dict.fromkeys(level for lines in series.values() for points in lines.values()
                                for _, _, level in points))
    marker = {level: shapes[i % len(shapes)] for i, level in enumerate(levels)}
    fig, axes = plt.subplots(1, len(series), figsize=(8 * len(series), 5.5), squeeze=False)
    for ax, (name, lines) in zip(axes.flat, series.items()):
        for label, points in lines.items():
            xs, ys, _ = zip(*points)
            (line,) = ax.plot(xs, ys, linewidth=1.2, label=label)
            for x, y, level in points:
                ax.plot([x], [y], marker=marker[level], color=line.get_color(), markersize=6, fillstyle="none")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bytes per vector")
        ax.set_ylabel(metric_label(metric))
        ax.set_title(name)
        dims_legend = ax.legend(fontsize="small", title="dim", loc="lower right")
        ax.add_artist(dims_legend)
        ax.legend(handles=[Line2D([], [], color="gray", marker=marker[lv], linestyle="", fillstyle="none", label=lv)
                           for lv in levels], fontsize="x-small", title="precision / index", loc="upper left")
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(title)
    fig.tight_layout()
    _save_image(plt, fig, path)


def require_matplotlib():
    """matplotlib.pyplot on the file-only Agg backend, or one clear error naming the extra to install."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError(f"python -m bertino.plot needs matplotlib, which is not installed: {INSTALL}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def link_in_model_folders(run_dir: Path, image: Path) -> list[Path]:
    """Copy the image into the run's final/ and best/ and link it from their model cards; and where a folder holds
    storage-vs-quality results, draw their plot (STORAGE_PLOT) into it and link it too. The folders updated."""
    updated = []
    for folder in (run_dir / "final", run_dir / "best"):
        card = folder / "README.md"
        if card.is_file():
            shutil.copyfile(image, folder / "curves.png")
            text = with_curves(card.read_text(encoding="utf-8"), "curves.png")
            by_level = folder / PRECISION_RESULTS
            if by_level.is_file() and storage_series(read_json(by_level, DataError)):
                draw_storage(read_json(by_level, DataError), folder / STORAGE_PLOT,
                             title=f"{folder}: storage vs quality")
                text = with_storage_plot(text, STORAGE_PLOT)
            atomic_write(card, text)
            updated.append(folder)
    return updated


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m bertino.plot", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder (train.output_dir)")
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS), metavar="M,M",
                   help=f"eval metrics to draw (default {','.join(DEFAULT_METRICS)})")
    p.add_argument("--output", type=Path, default=None, metavar="FILE", help="default: RUN_DIR/curves.png")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    require_matplotlib()  # before any reading: a missing extra is the first thing to know
    output = args.output or args.run_dir / "curves.png"
    image_format(output)  # --output c.pdf writes a PDF; an unknown suffix is an error, before any reading
    series = curve_series(read_records(args.run_dir / "metrics.jsonl"), tuple(args.metrics.split(",")))
    draw(series, output, title=str(args.run_dir))
    print(f"bertino: wrote {output}", file=sys.stderr)
    if args.output is None:
        for folder in link_in_model_folders(args.run_dir, output):
            print(f"bertino: linked it in {folder / 'README.md'}", file=sys.stderr)
    return output


def run(argv: list[str] | None = None) -> int:
    """main() with a user's mistakes turned into one `error: ...` line on stderr and exit code 2."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(run())
