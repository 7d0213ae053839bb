"""python -m bertino.plot: a valid PNG from a real run folder, the plotted series equal metrics.jsonl, the model
cards link the image, and mistakes are one `error:` line."""

from __future__ import annotations

import json
import math
import struct
import sys

import pytest
from conftest import make_distilbert
from helpers import ROOT, read_metrics, retrieval_rows, train_config, write_config, write_jsonl

pytest.importorskip("matplotlib", reason="the plots extra is not installed (pip install 'bertino[plots]')")
pytest.importorskip("faiss", reason="the faiss extra is not installed (pip install 'bertino[faiss]')")
sys.path.insert(0, str(ROOT))
import train  # noqa: E402

from bertino import plot  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real 6-step run: one retrieval task with Matryoshka [32, 16], evaluated at steps 3 and 6, its cards with
    the storage-vs-quality table of every precision, binary rescoring and two FAISS indexes."""
    tmp = tmp_path_factory.mktemp("plot_run")
    cfg = train_config(tmp, make_distilbert(tmp / "model", seed=8), max_steps=6, eval_steps=3, save_steps=0)
    dev = [{"query": r["query"], "positive": r["positive"]} for r in retrieval_rows(24)[:10]]
    cfg["eval"] = {"ir": [str(write_jsonl(tmp / "dev.jsonl", dev))], "rescore": 4, "index": ["flat", "hnsw-sq8"]}
    train.main(["--config", str(write_config(tmp, cfg))])
    return tmp / "run"


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"  # the signature, then the header chunk
    return struct.unpack(">II", data[16:24])


def test_plot_writes_a_png_and_links_it_in_the_model_card(run_dir, capsys):
    assert plot.run([str(run_dir)]) == 0
    png = run_dir / "curves.png"
    width, height = png_size(png)
    assert width >= 600 and height >= 600 and png.stat().st_size > 20_000  # a 2×2 grid of drawn panels
    card = (run_dir / "final" / "README.md").read_text()
    assert "## Training curves\n\n![Training curves" in card and "](curves.png)" in card
    assert card.index("## Training curves") < card.index("## Training details")
    assert (run_dir / "final" / "curves.png").read_bytes() == png.read_bytes()
    assert plot.run([str(run_dir)]) == 0  # again: the card still links it once
    assert (run_dir / "final" / "README.md").read_text().count("## Training curves") == 1
    assert "linked it in" in capsys.readouterr().err


def test_the_card_s_storage_table_and_plot(run_dir):
    """final/README.md holds the storage-vs-quality table from eval.precision and eval.index (the same numbers as
    final/eval_results_by_precision.json), and `python -m bertino.plot` draws NDCG@10 against bytes per vector —
    one line per dim through every precision and index — into final/ and links it under the table."""
    by_level = json.loads((run_dir / "final" / "eval_results_by_precision.json").read_text())
    assert list(by_level) == ["float32", "int8", "binary", "binary+rescore-bits", "binary+rescore-int8", "flat",
                              "hnsw-sq8"]
    card = (run_dir / "final" / "README.md").read_text()
    for level, d in (("int8", 16), ("flat", 32), ("hnsw-sq8", 16)):
        values = by_level[level][str(d)]["dev"]
        size = values.get("bytes_per_vector", d)
        assert f"| {d} | {level} | {size:.0f} | {size / 128:.1%} | {values['ndcg@10']:.4f} |" in card
    assert "#### dev: FAISS indexes" in card and "| 32 | flat | 1.0000 |" in card

    assert plot.run([str(run_dir)]) == 0
    card = (run_dir / "final" / "README.md").read_text()
    storage = card.split("## Storage vs quality")[1].split("\n## ")[0]
    assert "![NDCG@10 against bytes per vector, one line per dim](storage_vs_quality.png)" in storage
    width, height = png_size(run_dir / "final" / "storage_vs_quality.png")
    assert width >= 600 and height >= 400
    series = plot.storage_series(by_level)
    assert list(series) == ["dev"] and list(series["dev"]) == ["32d", "16d"]
    points = series["dev"]["16d"]
    levels = [level for _, _, level in points]  # by bytes: 2, 2, 16, ...
    assert set(levels[:2]) == {"binary", "binary+rescore-bits"} and levels[2] == "int8"
    assert (64.0, by_level["float32"]["16"]["dev"]["ndcg@10"], "float32") in points
    assert len(points) == 7 and [x for x, _, _ in points] == sorted(x for x, _, _ in points)


def test_the_plotted_series_are_the_jsonl_values(run_dir):
    records = read_metrics(run_dir)
    logged = [r for r in records if "lr" in r]
    evals = [r for r in records if "eval" in r]
    steps = [r["step"] for r in logged]
    want = {
        "loss": {"retrieval": (steps, [r["loss/retrieval"] for r in logged])},
        "loss/retrieval per dim": {f"{d}d": (steps, [r[f"loss/retrieval/{d}d"] for r in logged]) for d in (32, 16)},
        "lr": {"lr": (steps, [r["lr"] for r in logged])},
        "eval: dev ndcg@10": {f"{d}d": ([r["step"] for r in evals], [r["eval"][str(d)]["dev"]["ndcg@10"]
                                                                      for r in evals]) for d in (32, 16)},
    }
    series = plot.curve_series(records)
    assert series == want
    assert steps == [1, 2, 3, 4, 5, 6] and [r["step"] for r in evals] == [3, 6]
    fig = plot.figure(series, "run")  # and the figure draws exactly these
    drawn = {ax.get_title(): {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines}
             for ax in fig.axes if ax.lines}
    assert drawn == want


def test_nulls_become_gaps_and_a_cut_last_line_is_left_out(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "lr": 0.1, "loss/a": null}\n{"step": 2, "event": "resumed"}\n'
        '{"step": 2, "lr": 0.2, "loss/a": 1.5}\n{"step": 3, "lr"')
    series = plot.curve_series(plot.read_records(tmp_path / "metrics.jsonl"))
    steps, values = series["loss"]["a"]
    assert steps == [1, 2] and math.isnan(values[0]) and values[1] == 1.5


@pytest.mark.parametrize("content, message", [
    (None, "metrics.jsonl: no such file"),
    ('{"step": 1, "event": "resumed"}\n', "holds no logged step or evaluation yet"),
    ('{"step": 1, "lr": 0.1}\n{oops\n{"step": 2, "lr": 0.1}\n', "metrics.jsonl:2: invalid JSON"),
])
def test_mistakes_are_one_error_line(tmp_path, capsys, content, message):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    assert plot.run([str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "curves.png").exists()


def test_output_is_written_in_the_format_its_suffix_names(run_dir, tmp_path, capsys):
    """--output c.pdf is a PDF (it was PNG bytes in a .pdf), c.svg an SVG; a suffix matplotlib cannot write, or
    none, is one error line before anything is read."""
    assert plot.run([str(run_dir), "--output", str(tmp_path / "c.pdf")]) == 0
    assert (tmp_path / "c.pdf").read_bytes()[:5] == b"%PDF-"
    assert plot.run([str(run_dir), "--output", str(tmp_path / "c.SVG")]) == 0
    assert b"<svg" in (tmp_path / "c.SVG").read_bytes()[:1000]
    capsys.readouterr()
    for name, message in [("c.xyz", ".xyz is not an image format matplotlib writes"),
                          ("curves", "no suffix names the format")]:
        assert plot.run([str(run_dir), "--output", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and message in err[0] and ".pdf, " in err[0] and not (tmp_path / name).exists()
