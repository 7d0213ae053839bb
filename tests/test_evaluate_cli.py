"""evaluate.py: the table, the --json file, default dims, and one-line errors (exit 2, no traceback)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bertino.evaluation import IR_METRICS, STS_METRICS, relative_change

ROOT = Path(__file__).resolve().parents[1]


def load_cli():
    spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CLI = load_cli()


def run_subprocess(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("eval_files")
    ir = [{"query": "chi ha dipinto la gioconda", "positive": "leonardo ha dipinto la gioconda",
           "negative_1": "roma è una città"},
          {"query": "dove è il louvre", "positive": "il louvre", "negative_1": "il mare e il sole"},
          {"query": "il gatto", "positive": ["il gatto e il cane", "un gatto"]}]
    sts = [{"sentence1": "il gatto", "sentence2": "un gatto", "score": 4.5},
           {"sentence1": "la casa", "sentence2": "il mare", "score": 0.5},
           {"sentence1": "il sole", "sentence2": "la luna", "score": 2}]
    files = {"ir": d / "dev_ir.jsonl", "sts": d / "sts_dev.jsonl", "bad": d / "broken.jsonl"}
    files["ir"].write_text("\n".join(json.dumps(r) for r in ir) + "\n", encoding="utf-8")
    files["sts"].write_text("\n".join(json.dumps(r) for r in sts) + "\n", encoding="utf-8")
    files["bad"].write_text(json.dumps(ir[0]) + "\n{not json\n", encoding="utf-8")
    return files


def test_prints_table_and_writes_json(tiny_model_dir, eval_files, tmp_path):
    out = tmp_path / "results.json"
    proc = run_subprocess("--model", str(tiny_model_dir), "--ir", str(eval_files["ir"]),
                          "--sts", str(eval_files["sts"]), "--dims", "32,16", "--batch-size", "2", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "### dev_ir\n\n| metric | 32d | 16d |\n|---|---:|---:|\n| MAP@100 |" in proc.stdout
    assert "### sts_dev" in proc.stdout and "| Spearman Cosine |" in proc.stdout
    assert "Encoding" in proc.stderr  # the progress bar
    results = json.loads(out.read_text())  # strict JSON: NaN would have been written as null
    assert list(results) == ["32", "16"]
    for dim in results:
        assert list(results[dim]) == ["dev_ir", "sts_dev"]
        assert list(results[dim]["dev_ir"]) == list(IR_METRICS)
        assert list(results[dim]["sts_dev"]) == list(STS_METRICS)
        assert all(0.0 <= v <= 1.0 for v in results[dim]["dev_ir"].values())
        assert all(v is None or -1.0 <= v <= 1.0 for v in results[dim]["sts_dev"].values())


def test_default_dims_are_the_recorded_matryoshka_dims(tiny_model_dir, eval_files, tmp_path, capsys):
    from bertino import SentenceEncoder

    saved = tmp_path / "st_model"
    SentenceEncoder.from_pretrained(tiny_model_dir).save_pretrained(saved, matryoshka_dims=[32, 8])
    assert CLI.run(["--model", str(saved), "--ir", str(eval_files["ir"])]) == 0
    assert "| metric | 32d | 8d |" in capsys.readouterr().out
    assert CLI.run(["--model", str(tiny_model_dir), "--ir", str(eval_files["ir"])]) == 0  # nothing recorded
    assert "| metric | 32d |\n" in capsys.readouterr().out


def test_bad_input_is_one_line_and_exit_2_without_traceback(tiny_model_dir, eval_files):
    proc = run_subprocess("--model", str(tiny_model_dir), "--ir", str(eval_files["ir"]), "--dims", "64")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [f"error: --model {tiny_model_dir}: dims [64]: 64 is not an embedding dim of "
                                        f"this model (expected 1..32) (--dims)"]
    assert proc.stdout == ""


@pytest.mark.parametrize("make_args, message", [
    (lambda m, f: ["--model", m, "--ir", f["ir"], "--dims", "32,abc"], "argument --dims: expected comma-separated"),
    (lambda m, f: ["--model", m, "--ir", f["ir"], "--dims", "0"], "0 is not an embedding dim"),
    (lambda m, f: ["--model", m, "--ir", f["ir"], "--dims", "16,16"], "lists a dim twice"),
    (lambda m, f: ["--model", m], "nothing to evaluate"),
    (lambda m, f: ["--ir", f["ir"]], "required: --model"),
    (lambda m, f: ["--model", m, "--ir", f["ir"], "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (lambda m, f: ["--model", m, "--ir", f["ir"], "--batch-size", "0"], "--batch-size must be >= 1"),
    (lambda m, f: ["--model", m, "--ir", str(Path(f["ir"]).with_name("missing.jsonl"))], "missing.jsonl: no such file"),
    (lambda m, f: ["--model", m, "--ir", f["bad"]],
     "broken.jsonl:2: invalid JSON: Expecting property name enclosed in double quotes (column 2)"),
    (lambda m, f: ["--model", m, "--ir", f["sts"]], "sts_dev.jsonl:1: missing key 'query'"),
    (lambda m, f: ["--model", m + "-nope", "--ir", f["ir"]], "nope"),
    (lambda m, f: ["--model", m, "--ir", f["ir"], "--json", "/no/such/dir/out.json"], "does not exist"),
    (lambda m, f: ["--model", m, "--ir", f["ir"], "--precision", "int8,int4"],
     "--precision: expected distinct names from float32, int8, binary, found int8,int4"),
    (lambda m, f: ["--model", m, "--ir", f["ir"], "--rescore", "5"], "--rescore 5: rescoring re-ranks the binary"),
    (lambda m, f: ["--model", m, "--ir", f["ir"], "--precision", "int8", "--rescore", "5"], "add binary to --precision"),
    (lambda m, f: ["--model", m, "--ir", f["ir"], "--precision", "binary", "--rescore", "0"],
     "--rescore: expected a number of candidates >= 1, found 0"),
    (lambda m, f: ["--model", m, "--ir", f["ir"], "--index", "flat,ivf-pq"],
     "--index: expected distinct names from flat, sq8, binary-flat, hnsw, hnsw-sq8, found flat,ivf-pq"),
    (lambda m, f: ["--model", m, "--model", m, "--ir", f["ir"], "--index", "flat"], "--index evaluates one model"),
    (lambda m, f: ["--model", m, "--ir", f["ir"], "--precision", "int8", "--int8-quantile", "0.5"],
     "--int8-quantile must be in [0, 0.5), got 0.5"),
    (lambda m, f: ["--model", m, "--ir", f["ir"], "--plot", "x.png"], "--plot draws the storage-vs-quality"),
    (lambda m, f: ["--model", m, "--ir", f["ir"], "--index", "flat", "--plot", "/no/such/dir/x.png"],
     "does not exist"),
])
def test_each_user_error_is_one_line(tiny_model_dir, eval_files, capsys, make_args, message):
    files = {k: str(v) for k, v in eval_files.items()}
    assert CLI.run(make_args(str(tiny_model_dir), files)) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], captured.err
    assert captured.out == ""


def test_help_still_works():
    proc = run_subprocess("--help")
    assert proc.returncode == 0 and "--model" in proc.stdout and "--json OUT" in proc.stdout


def test_precision_tables_and_json(tiny_model_dir, eval_files, tmp_path, capsys):
    """--precision: a dim × precision table per retrieval set, STS unchanged, and the JSON file gains the precision
    level, whose float32 part is exactly the plain run's file (the float32 rows are today's numbers)."""
    common = ["--model", str(tiny_model_dir), "--ir", str(eval_files["ir"]), "--sts", str(eval_files["sts"]),
              "--dims", "32,16"]
    assert CLI.run([*common, "--json", str(tmp_path / "plain.json")]) == 0
    plain_out = capsys.readouterr().out
    assert CLI.run([*common, "--precision", "float32,int8,binary", "--rescore", "2",
                    "--json", str(tmp_path / "levels.json")]) == 0
    out = capsys.readouterr().out
    plain, levels = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("plain", "levels"))
    assert list(levels) == ["float32", "int8", "binary", "binary+rescore-bits", "binary+rescore-int8"]
    assert levels["float32"] == plain
    for level in list(levels)[1:]:
        assert list(levels[level]) == ["32", "16"]
        assert all(list(levels[level][d]) == ["dev_ir"] and list(levels[level][d]["dev_ir"]) == list(IR_METRICS)
                   for d in ("32", "16"))  # the STS set is scored on float32 vectors only
    assert out.startswith("### dev_ir: storage vs quality\n\n| dim | precision | bytes/vector | storage | MAP@100 |")
    rows = {tuple(line.split(" | ")[:2]): line for line in out.splitlines() if line.startswith("| 32 |")
            or line.startswith("| 16 |")}
    assert [k[1] for k in rows if k[0] == "| 16"] == list(levels)
    assert rows[("| 16", "binary+rescore-int8")].startswith("| 16 | binary+rescore-int8 | 18 | 14.1% |")
    float_row = " | ".join(f"{plain['32']['dev_ir'][m]:.4f}" for m in IR_METRICS)
    assert rows[("| 32", "float32")] == f"| 32 | float32 | 128 | 100.0% | {float_row} |"
    assert "### sts_dev\n\n| metric | 32d | 16d |" in out and out.split("### sts_dev")[1] == \
        plain_out.split("### sts_dev")[1]


def test_index_tables_json_and_plot(tiny_model_dir, eval_files, tmp_path, capsys):
    """--index: the FAISS indexes join the storage table at their own bytes per vector, a second table gives what
    each costs and finds, each is one more level of the JSON file; flat's metrics are the float32 rows exactly, and
    --plot draws NDCG@10 against bytes per vector."""
    pytest.importorskip("faiss", reason="the faiss extra is not installed")
    pytest.importorskip("matplotlib", reason="the plots extra is not installed")
    out, png = tmp_path / "levels.json", tmp_path / "storage.png"
    assert CLI.run(["--model", str(tiny_model_dir), "--ir", str(eval_files["ir"]), "--sts", str(eval_files["sts"]),
                    "--dims", "32,16", "--precision", "float32,int8", "--index", "flat,sq8,hnsw",
                    "--json", str(out), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    levels = json.loads(out.read_text())
    assert list(levels) == ["float32", "int8", "flat", "sq8", "hnsw"]
    for d in ("32", "16"):
        flat = levels["flat"][d]["dev_ir"]
        assert {m: flat[m] for m in IR_METRICS} == levels["float32"][d]["dev_ir"]
        assert flat["recall_vs_exact@10"] == 1.0 and flat["bytes_per_vector"] == 4 * int(d)
        assert levels["sq8"][d]["dev_ir"]["bytes_per_vector"] == int(d)
        assert levels["hnsw"][d]["dev_ir"]["bytes_per_vector"] > 4 * int(d)  # the graph
        assert set(levels["hnsw"][d]["dev_ir"]) == set(IR_METRICS) | {"recall_vs_exact@10", "bytes_per_vector",
                                                                      "build_seconds", "query_ms", "query_ms_batched"}
    assert "sts_dev" in levels["float32"]["32"] and "sts_dev" not in levels["flat"]["32"]
    assert "| 32 | sq8 | 32 | 25.0% |" in printed and "| 16 | flat | 64 | 50.0% |" in printed
    assert "### dev_ir: vector indexes (FAISS)\n\n| dim | index | bytes/vector | build s |" in printed
    hnsw = levels["hnsw"]["16"]["dev_ir"]
    assert f"| 16 | hnsw | {hnsw['bytes_per_vector']:.0f} | {hnsw['build_seconds']:.3f} |" in printed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # --index alone: the float32 row (the reference) and the indexes
    assert CLI.run(["--model", str(tiny_model_dir), "--ir", str(eval_files["ir"]), "--dims", "16",
                    "--index", "binary-flat", "--json", str(out)]) == 0
    assert list(json.loads(out.read_text())) == ["float32", "binary-flat"]


# ──────────────────────────────────────────────────────────────────────── several models: the card's comparison
def test_relative_change_is_the_card_s_formula():
    # the card's "Comparison with V4" at 128d: NDCG@10 0.8332 → 0.8372 is +0.48%, Accuracy@1 0.7145 → 0.7233 +1.23%
    # (its MAP@100 "+0.63%" is the absolute difference 0.8065 − 0.8002; the relative change is +0.79%)
    assert f"{relative_change(0.8372, 0.8332):+.2f}" == "+0.48"
    assert f"{relative_change(0.7233, 0.7145):+.2f}" == "+1.23"
    assert f"{relative_change(0.8065, 0.8002):+.2f}" == "+0.79"
    assert relative_change(0.5, 0.0) is None and relative_change(float("nan"), 0.5) is None


def test_two_models_print_the_relative_change_of_every_metric(tiny_model_dir, eval_files, tmp_path):
    from conftest import make_distilbert

    other = make_distilbert(tmp_path / "other", seed=5)
    out = tmp_path / "both.json"
    proc = run_subprocess("--model", str(tiny_model_dir), "--model", str(other), "--ir", str(eval_files["ir"]),
                          "--sts", str(eval_files["sts"]), "--dims", "32,16", "--batch-size", "2", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    a, b = str(tiny_model_dir), str(other)
    assert data["models"] == [a, b] and list(data["relative_change_percent"]) == [b]
    header = f"| metric | {a} (32d) | {b} (32d) | {a} (16d) | {b} (16d) |"
    assert f"### dev_ir\n\n{header}\n|---|---:|---:|---:|---:|\n" in proc.stdout
    checked = 0
    for dim in ("32", "16"):
        for name, metrics in data["results"][a][dim].items():
            for metric, v1 in metrics.items():
                v2 = data["results"][b][dim][name][metric]
                change = data["relative_change_percent"][b][dim][name][metric]
                if v1 in (None, 0.0) or v2 is None:
                    assert change is None
                    continue
                want = 100.0 * (v2 - v1) / v1  # by hand
                assert change == pytest.approx(want, rel=1e-12)
                assert f"{v2:.4f} ({want:+.2f}%)" in proc.stdout
                checked += 1
    assert checked >= 10
    # each model's own numbers are those of a one-model run
    alone = tmp_path / "alone.json"
    assert run_subprocess("--model", b, "--ir", str(eval_files["ir"]), "--sts", str(eval_files["sts"]), "--dims",
                          "32,16", "--batch-size", "2", "--json", str(alone)).returncode == 0
    assert json.loads(alone.read_text()) == data["results"][b]


# ──────────────────────────────────────────────────────────────────────── dims and outputs, checked before the work
def test_models_that_share_no_dim_fail_before_encoding(tiny_model_dir, eval_files, tmp_path, capsys):
    """A 32-dim and a 16-dim model, no --dims: each would be evaluated at its own full dim, and the comparison has no
    column (it was an IndexError after all the encoding, and --json was never written)."""
    from conftest import make_distilbert

    small = make_distilbert(tmp_path / "small", dim=16)
    capsys.readouterr()
    args = ["--model", str(tiny_model_dir), "--model", str(small), "--ir", str(eval_files["ir"])]
    assert CLI.run([*args, "--json", str(tmp_path / "out.json")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"error: the models share no dim to compare them at ({tiny_model_dir} at [32]; "
                                f"{small} at [16]); give --dims with dims every model has"]  # nothing encoded
    assert CLI.run([*args, "--dims", "32,16"]) == 2  # names the model that lacks the dim
    assert capsys.readouterr().err.splitlines() == [
        f"error: --model {small}: dims [32, 16]: 32 is not an embedding dim of this model (expected 1..16) (--dims)"]
    assert CLI.run([*args, "--dims", "16,8", "--json", str(tmp_path / "out.json")]) == 0
    assert list(json.loads((tmp_path / "out.json").read_text())["results"][str(small)]) == ["16", "8"]


def test_an_unwritable_json_target_fails_before_encoding(tiny_model_dir, eval_files, tmp_path, capsys, monkeypatch):
    args = ["--model", str(tiny_model_dir), "--ir", str(eval_files["ir"])]
    (tmp_path / "a-folder").mkdir()
    assert CLI.run([*args, "--json", str(tmp_path / "a-folder")]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: --json {tmp_path / 'a-folder'}: is a folder; give a "
                                                    f"file name"]  # one line: nothing was encoded

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(CLI.tempfile, "mkstemp", denied)  # what a read-only folder answers (root ignores chmod)
    assert CLI.run([*args, "--json", str(tmp_path / "out.json")]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: --json {tmp_path / 'out.json'}: cannot write into "
                                                    f"{str(tmp_path)!r} (Permission denied)"]


# ──────────────────────────────────────────────────────────────────────── --config: the run's own hold-out and dims
@pytest.fixture(scope="module")
def holdout_run(tiny_model_dir, tmp_path_factory):
    """A run with overrides that change its hold-out (tasks.retrieval.holdout=0.25 train.seed=11; the file says
    seed 7 and no hold-out) → (its config file, its folder)."""
    sys.path.insert(0, str(ROOT))
    import train
    from helpers import train_config, write_config

    tmp = tmp_path_factory.mktemp("holdout_run")
    config = write_config(tmp, train_config(tmp, tiny_model_dir, max_steps=2))
    train.main(["--config", str(config), "tasks.retrieval.holdout=0.25", "train.seed=11"])
    return config, tmp / "run"


def test_config_evaluates_the_run_s_own_holdout(holdout_run, tmp_path, capsys):
    """The run folder (its resolved config.json), or the config file with the run's overrides: the same rows the
    run held out, so the same numbers as its own final evaluation; the file alone would redraw other rows."""
    config, run = holdout_run
    want = json.loads((run / "final" / "eval_results.json").read_text())
    model = str(run / "final")
    for how in (["--config", str(run)], ["--config", str(config), "tasks.retrieval.holdout=0.25", "train.seed=11"]):
        assert CLI.run(["--model", model, *how, "--json", str(tmp_path / "out.json")]) == 0
        got = json.loads((tmp_path / "out.json").read_text())
        for dim in want:
            assert got[dim]["retrieval_holdout"] == pytest.approx(want[dim]["retrieval_holdout"], abs=1e-6), how
        err = capsys.readouterr().err
        assert ("bertino: retrieval_holdout: the 6 rows of tasks.retrieval a run with tasks.retrieval.holdout=0.25 "
                "and train.seed=11 leaves out") in err
    assert CLI.run(["--model", model, "--config", str(config), "tasks.retrieval.holdout=0.25",
                    "--json", str(tmp_path / "out.json")]) == 0  # train.seed left at the file's: other rows
    other = json.loads((tmp_path / "out.json").read_text())
    assert other["32"]["retrieval_holdout"] != want["32"]["retrieval_holdout"]
    assert "train.seed=11" not in capsys.readouterr().err
    assert CLI.run(["--model", model, "--ir", str(config), "train.seed=11"]) == 2
    assert "overrides apply to --config" in capsys.readouterr().err


def test_dims_default_to_the_config_s_when_the_model_records_none(holdout_run, tiny_model_dir, tmp_path, capsys):
    """A model folder that records no Matryoshka dims (a hub model, e.g. the published V4), with --config: the
    config's dims (matryoshka [32, 16] here), not the model's full dim alone."""
    _, run = holdout_run
    assert CLI.run(["--model", str(tiny_model_dir), "--config", str(run)]) == 0
    assert "| metric | 32d | 16d |" in capsys.readouterr().out
