"""Without the optional extras (tensorboard, matplotlib, faiss) training and evaluation work, and asking for
TensorBoard, plots or FAISS indexes is one `error:` line naming the extra to install.

The environment is real, not a patched import: a folder of links to every installed package but those three (and
matplotlib's mpl_toolkits, faiss-cpu's libraries), used by an interpreter started with -S (no site-packages of its
own).
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_distilbert
from helpers import ROOT, retrieval_rows, train_config, write_config, write_jsonl

EXTRAS = ("tensorboard", "matplotlib", "mpl_toolkits", "faiss")


@pytest.fixture(scope="module")
def without_extras(tmp_path_factory):
    """A function running `python -S ARGS...` where only the packages outside EXTRAS can be imported."""
    farm = tmp_path_factory.mktemp("site_without_extras")
    for folder in [*site.getsitepackages(), site.getusersitepackages()]:
        for entry in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else ():
            if not entry.name.lower().startswith(EXTRAS) and not (farm / entry.name).exists():
                (farm / entry.name).symlink_to(entry)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{farm}", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-S", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)

    probe = run("-c", "import importlib.util as u, bertino, torch, transformers; print([u.find_spec(m) is None "
                      "for m in ('tensorboard', 'matplotlib', 'faiss')], bertino.__file__)")
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split()[:3] == ["[True,", "True,", "True]"] and str(ROOT) in probe.stdout  # truly absent
    return run


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_training_evaluation_and_the_error_lines_without_the_extras(without_extras, tmp_path):
    cfg = train_config(tmp_path, make_distilbert(tmp_path / "model", seed=9), max_steps=2, save_steps=0)
    dev = [{"query": r["query"], "positive": r["positive"]} for r in retrieval_rows(24)[:8]]
    cfg["eval"] = {"ir": [str(write_jsonl(tmp_path / "dev.jsonl", dev))], "rescore": 3}
    config = write_config(tmp_path, cfg)
    run = tmp_path / "run"

    line = one_error_line(without_extras("train.py", "--config", str(config), 'train.report_to=["tensorboard"]'))
    assert "needs the tensorboard package" in line and "pip install 'bertino[tensorboard]'" in line
    assert not run.exists()  # refused before the run folder is touched
    line = one_error_line(without_extras("train.py", "--config", str(config), 'eval.index=["hnsw"]'))
    assert "needs the faiss package" in line and "pip install 'bertino[faiss]'" in line
    assert not run.exists()

    trained = without_extras("train.py", "--config", str(config))
    assert trained.returncode == 0, trained.stderr
    assert "## Storage vs quality" in (run / "final" / "README.md").read_text()  # int8/binary need no extra

    evaluated = without_extras("evaluate.py", "--model", str(run / "final"), "--ir", str(tmp_path / "dev.jsonl"),
                               "--precision", "float32,int8,binary", "--rescore", "3")
    assert evaluated.returncode == 0, evaluated.stderr
    assert "| 16 | binary+rescore-int8 | 18 | 14.1% |" in evaluated.stdout
    line = one_error_line(without_extras("evaluate.py", "--model", str(run / "final"), "--ir",
                                         str(tmp_path / "dev.jsonl"), "--index", "flat,sq8"))
    assert "--index" in line and "needs the faiss package" in line and "pip install 'bertino[faiss]'" in line

    line = one_error_line(without_extras("-m", "bertino.plot", str(run)))
    assert "needs matplotlib" in line and "pip install 'bertino[plots]'" in line
    assert not (run / "curves.png").exists()
