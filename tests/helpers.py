"""Small data files and config runs for the training tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["gatto", "cane", "casa", "libro", "tabella", "testo", "pagina", "documento", "formato", "cella", "roma",
          "milano", "acqua", "sole", "mare", "leonardo", "gioconda", "louvre"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def retrieval_rows(n: int, seed: int = 0) -> list[dict]:
    """A learnable retrieval task: the query names a topic and a number; the positive repeats both."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        t = TOPICS[i % len(TOPICS)]
        other = TOPICS[(i + 1 + int(rng.integers(len(TOPICS) - 1))) % len(TOPICS)]
        rows.append({"query": f"{t} {i}",
                     "positive": f"il {t} {i} della pagina",
                     "negative_1": f"il {other} {i + 1000} della pagina",
                     "negative_2": f"la {t} {i + 2000} di {other}"})
    return rows


def sts_rows(n: int, seed: int = 0, score_key: str = "score", max_score: float = 5.0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        a, b = TOPICS[i % len(TOPICS)], TOPICS[int(rng.integers(len(TOPICS)))]
        rows.append({"sentence1": f"il {a} {i}", "sentence2": f"il {b} {i}",
                     score_key: float(max_score if a == b else rng.uniform(0, max_score * 0.6))})
    return rows


def train_config(tmp: Path, model_dir: Path, **train) -> dict:
    """A small retrieval-only config for the tiny model (dim 32)."""
    data = write_jsonl(tmp / "retrieval.jsonl", retrieval_rows(24))
    return {
        "model": {"name_or_path": str(model_dir), "max_seq_length": 32},
        "tasks": {"retrieval": {"dataset": str(data), "columns": ["query", "positive", "negative_1", "negative_2"],
                                "loss": "cached_mnrl"}},
        "matryoshka": {"dims": [32, 16], "weights": [1.0, 0.4]},
        "train": {"per_device_train_batch_size": 6, "mini_batch_size": 3, "max_steps": 3, "learning_rate": 1e-3,
                  "lr_scheduler_type": "constant", "warmup_ratio": 0.0, "weight_decay": 0.01, "seed": 7,
                  "output_dir": str(tmp / "run"), "logging_steps": 1, "save_steps": 0, **train},
    }


def write_config(tmp: Path, cfg: dict, name: str = "config.json") -> Path:
    path = tmp / name
    path.write_text(json.dumps(cfg))
    return path


def run_train(config_path: Path, *overrides: str, nproc: int = 1, check: bool = True,
              timeout: int = 300) -> subprocess.CompletedProcess:
    """train.py in a subprocess (torchrun when nproc > 1), from the repo root."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "train.py", "--config", str(config_path), *overrides]
    else:
        cmd = [sys.executable, "train.py", "--config", str(config_path), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def rel_update_diff(w0: dict, w1: dict, w2: dict) -> float:
    """‖Δw₁ − Δw₂‖ / ‖Δw₂‖ over all parameters, Δw = w − w0."""
    num = sum(((w1[k] - w0[k]) - (w2[k] - w0[k])).double().norm() ** 2 for k in w0)
    den = sum((w2[k] - w0[k]).double().norm() ** 2 for k in w0)
    return float(torch.sqrt(num / den))


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
