"""Small data files and config runs for the training tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
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


def listed_negatives(rows: list[dict]) -> list[dict]:
    """The same rows with their negatives in one list column, `hard_negatives` (the card's dataset's layout)."""
    return [{"query": r["query"], "positive": r["positive"], "hard_negatives": [r["negative_1"], r["negative_2"]]}
            for r in rows]


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


def assert_same_steps(run: Path, reference: Path, rel: float, keys: tuple[str, ...] | None = None) -> int:
    """Every logged step of `run` has the loss of each task and the gradient norm of `reference`'s, within `rel`
    (AdamW hides a uniform factor on the gradient in the weights; the norm shows it) → the number of steps."""
    a = [r for r in read_metrics(run) if "grad_norm" in r]
    b = [r for r in read_metrics(reference) if "grad_norm" in r]
    assert len(a) == len(b) > 0 and [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        names = keys or tuple(k for k in y if k == "grad_norm" or k.startswith("loss/"))
        assert set(names) <= set(x), (x, y)
        for key in names:
            assert x[key] == pytest.approx(y[key], rel=rel), (x["step"], key, x[key], y[key])
    return len(a)


# ──────────────────────────────────────────────────────────────────────────────────────────────── gradient checks
# The GradCache tests' batch: B = 7 rows; retrieval rows have 4 columns (query, positive, 2 hard negatives) → T = 28
# texts, cut into mini-batches of C = 5 (which does not divide 28). Matryoshka is on. The loss is multiplied by
# SCALE = 1024, as a GradScaler does.
B, C, SCALE = 7, 5, 1024.0
WORDS = "il gatto cane casa libro tabella testo pagina documento formato cella roma milano acqua sole mare".split()


def random_texts(n: int, seed: int) -> list[str]:
    """n distinct texts of 1–11 random words (then their index), so lengths and padding vary."""
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (int(torch.randint(1, 12, (1,), generator=g)),),
                                                          generator=g)) + f" {j}" for j in range(n)]


def retrieval_case():
    """(texts column after column: queries, positives, neg_1, neg_2; the Matryoshka MNRL loss of reps (T, D))."""
    from bertino.losses import LOSSES
    from bertino.objectives import Objective

    objective = Objective(LOSSES["cached_mnrl"], dims=[32, 16, 8], weights=[1.0, 0.4, 0.2])
    return random_texts(4 * B, seed=0), (lambda reps: objective(reps, n_columns=4))


def cosent_case():
    """(texts: sentence1s then sentence2s; the Matryoshka CoSENT loss of reps (T, D) against fixed gold scores)."""
    from bertino.losses import LOSSES
    from bertino.objectives import Objective

    scores = torch.tensor([0.1, 0.5, 0.5, 0.9, 0.0, 0.3, 1.0], dtype=torch.float64)
    objective = Objective(LOSSES["cosent"], dims=[32, 16, 8], weights=[1.0, 0.4, 0.2])
    return random_texts(2 * B, seed=1), (lambda reps: objective(reps, n_columns=2, scores=scores))


CASES = {"mnrl_2_hard_negatives": retrieval_case, "cosent": cosent_case}


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters' gradients (cloned), then zeroed."""
    out = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return out


def max_rel_error(a: dict, b: dict) -> float:
    """max over parameters of ‖a_p − b_p‖ / ‖b_p‖.

    One exception: the key-projection biases (k_lin.bias) have an analytically zero gradient — adding q·b to every
    key's score is a constant shift inside each softmax row — so their computed gradients are rounding noise in both
    runs. Their error is measured relative to 1e-6 · the whole gradient's norm instead of their own ~0 norm.
    """
    assert a.keys() == b.keys() and len(a) > 0
    total = torch.sqrt(sum(g.double().norm() ** 2 for g in b.values()))
    return max(((a[n] - b[n]).norm() / torch.maximum(b[n].norm(), 1e-6 * total)).item() for n in a)


def global_rel_error(a: dict, b: dict) -> float:
    """‖a − b‖ / ‖b‖ over all parameters' gradients as one vector."""
    num = sum((a[n].double() - b[n].double()).norm() ** 2 for n in b)
    return torch.sqrt(num / sum(b[n].double().norm() ** 2 for n in b)).item()


def token_ids(enc, texts):
    from bertino.batching import PackedTokenIds

    return PackedTokenIds.tokenize(enc, texts)


def mini_batches(enc, texts, size: int = C):
    from bertino.grad_cache import make_mini_batches

    return make_mini_batches(token_ids(enc, texts), size, enc.tokenizer.pad_token_id)


def full_batch_plain(enc, texts, loss_fn, autocast=None, text_keys=None):
    """One forward of the whole batch (one padded tensor), one backward of loss × SCALE → the gradients: the
    reference every GradCache test compares with. `text_keys` (T,): keyed dropout masks, the texts' keys."""
    import contextlib

    features = token_ids(enc, texts).pad(range(len(texts)), enc.tokenizer.pad_token_id)  # (T, L)
    if text_keys is not None:
        features["dropout_keys"] = text_keys
    with autocast() if autocast else contextlib.nullcontext():
        reps = enc(features)  # (T, D)
    (loss_fn(reps) * SCALE).backward()
    return grads(enc)


def full_batch_from_mini_batch_forwards(enc, texts, loss_fn):
    """One autograd graph over the same mini-batch forwards GradCache runs (same RNG draws, in the same order)."""
    batches = mini_batches(enc, texts)
    outs = torch.cat([enc(b.features) for b in batches])  # (T, D), mini-batch order
    reps = torch.empty_like(outs)
    reps[torch.cat([b.texts for b in batches])] = outs
    (loss_fn(reps) * SCALE).backward()
    return grads(enc)


def grad_cache_grads(enc, texts, loss_fn, seed: int | None = 123, model=None, fast=None, size: int = C,
                     autocast=None, first_pass_size: int | None = None):
    """GradCache's gradient of loss × SCALE (the RNG seeded first unless seed is None): the textbook
    (bertino/grad_cache.py), or with `fast` the passes with its speed-ups (speedups/fast_grad_cache.py)."""
    import contextlib

    from bertino.grad_cache import grad_cache_step
    from bertino.speedups import fast_grad_cache

    if seed is not None:
        torch.manual_seed(seed)
    batches, autocast = mini_batches(enc, texts, size), autocast or contextlib.nullcontext
    scale_fn = lambda loss: loss * SCALE  # noqa: E731
    if fast is None:
        grad_cache_step(model or enc, batches, loss_fn, scale_fn, autocast)
    else:
        first = mini_batches(enc, texts, first_pass_size) if first_pass_size else None
        fast_grad_cache.grad_cache_step(model or enc, batches, loss_fn, scale_fn, autocast, fast, first)
    return grads(enc)


def fast_path(enc, keep_graphs: int = 0, keep_last: bool = True, sparse: bool = False, tape=None, keys=None, **more):
    """The speed-ups of the fast GradCache passes, installed into `enc` (tape: the names of the linears to tape)."""
    from bertino.speedups.fast_grad_cache import FastGradCache
    from bertino.speedups.linear_tape import install_linear_tape
    from bertino.speedups.settings import SpeedupsConfig
    from bertino.speedups.sparse_embeddings import install_sparse_embedding_grads

    settings = SpeedupsConfig(keep_last_graph=keep_last, memory_budget=keep_graphs, sparse_embedding_grads=sparse,
                              linear_tape=tape is not None, cpu_dropout=False, **more)
    return FastGradCache(settings, enc.max_seq_length, keys,
                         sparse=install_sparse_embedding_grads(enc.model) if sparse else None,
                         tape=install_linear_tape(enc.model, tape) if tape else None)


# ──────────────────────────────────────────────────────────────────────────────────────────────── user-side failures
def train_error_line(capsys, config: Path | None, *args: str) -> str:
    """Run train.cli (`--config config`, if given, then `args`): it must exit with code 2 and exactly one `error:`
    line, no traceback → that line."""
    import train

    with pytest.raises(SystemExit) as info:
        train.cli([*(["--config", str(config)] if config else []), *args])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err and err.rstrip().endswith(lines[0]), err
    return lines[0]


def folder_snapshot(folder: Path) -> dict:
    """Every file under `folder` with its modification time and size: equal snapshots = nothing was touched."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}


def fault_env(fault: str, folder: Path, **extra) -> dict:
    """The environment of a train.py child with a fault of tests/fault_injection.py switched on."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT),
            "BERTINO_FAULT": fault, "BERTINO_FAULT_DIR": str(folder), **extra}


def torchrun_with_fault(config: Path, fault: str, folder: Path, *overrides: str, nproc: int = 2) -> subprocess.Popen:
    """torchrun of tests/fault_injection.py (train.py with the fault) on `config`."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={nproc}", "tests/fault_injection.py", "--config", str(config),
                             *overrides], cwd=ROOT, env=fault_env(fault, folder), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)

