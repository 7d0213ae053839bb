"""Reliability: interrupted runs resume exactly, bad input is one clear line and touches nothing, nothing unsafe loads.

Most runs here call `train.main` / `train.cli` in-process (a tiny model trains ~15 steps/s; no interpreter start-up),
comparing runs of the same process. The kill -9 / SIGTERM tests and the torchrun tests use real subprocesses, all
with OMP_NUM_THREADS=1, and compare only subprocess runs with each other (bitwise equality needs equal threads).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (ROOT, folder_snapshot, read_metrics, retrieval_rows, run_train, sts_rows, train_config,
                     train_error_line, weights, write_config, write_jsonl)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(ROOT))
import train  # noqa: E402

from bertino import SentenceEncoder  # noqa: E402
from bertino.errors import CheckpointError, ConfigError, DataError  # noqa: E402
from bertino.objectives import Objective  # noqa: E402
from bertino import build  # noqa: E402
from bertino.plumbing.config import MOVED_KEYS  # noqa: E402
from bertino.speedups.settings import SpeedupsConfig  # noqa: E402
from bertino.plumbing import metrics_log, mixed_precision, run_checkpoints, run_folder  # noqa: E402
from bertino.plumbing.config import config_from_dict  # noqa: E402
from bertino.plumbing.data import batch_schedule, load_tasks  # noqa: E402
from bertino.plumbing.files import restore_half_replaced  # noqa: E402
from bertino.plumbing.metrics_log import LogWindow  # noqa: E402
from bertino.plumbing.pickled_weights import convert  # noqa: E402


# ──────────────────────────────────────────────────────────────────────────────────────────────── helpers


def two_task_config(tmp: Path, model: Path, **train_keys) -> dict:
    """retrieval (24 rows, GradCache + Matryoshka) + sts (12 rows, plain CoSENT): 4 + 2 = 6 steps per epoch."""
    cfg = train_config(tmp, model, **{"max_steps": 10, "lr_scheduler_type": "cosine", "warmup_ratio": 0.2,
                                      **train_keys})
    cfg["tasks"]["sts"] = {"dataset": str(write_jsonl(tmp / "sts.jsonl", sts_rows(12))),
                           "columns": ["sentence1", "sentence2", "score"], "loss": "cosent", "score_scale": 5.0}
    return cfg


def run_inprocess(tmp: Path, cfg: dict, *overrides: str) -> None:
    path = write_config(tmp, cfg, f"cfg-{time.monotonic_ns()}.json")
    train.main(["--config", str(path), *overrides])


def cli_error(capsys, tmp: Path, cfg: dict | None, *args: str) -> str:
    """train.cli on the config `cfg` (written to a file) → its one `error:` line (exit code 2, no traceback)."""
    return train_error_line(capsys, write_config(tmp, cfg, f"cfg-{time.monotonic_ns()}.json") if cfg else None, *args)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def step_records(run: Path) -> list[dict]:
    return [r for r in read_metrics(run) if "lr" in r]


# ──────────────────────────────────────────────────────────────────────────────────────────────── exact resume
@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    """An uninterrupted 10-step run with checkpoints at 3 (mid epoch 0), 6 (end of epoch 0), 9 (mid epoch 1)."""
    tmp = tmp_path_factory.mktemp("rel_reference")
    cfg = two_task_config(tmp, tiny_model_dir, save_steps=3, output_dir=str(tmp / "run"))
    run_inprocess(tmp, cfg)
    return tmp / "run", cfg


def as_if_killed_after(reference_run: Path, k: int, dst: Path) -> Path:
    """The run folder a run killed a little after writing checkpoint-k would leave: later steps' metrics, a line
    cut in half, a half-written temp checkpoint."""
    shutil.copytree(reference_run, dst)
    shutil.rmtree(dst / "final")
    for step, folder in run_folder.list_checkpoints(dst):
        if step > k:
            shutil.rmtree(folder)
    lines = (dst / "metrics.jsonl").read_text().splitlines()  # one line per step
    cut = lines[k + 2][:25] if len(lines) > k + 2 else ""
    (dst / "metrics.jsonl").write_text("\n".join(lines[:k + 2]) + "\n" + cut)
    partial = dst / f".tmp-checkpoint-{k + 3}"
    shutil.copytree(dst / f"checkpoint-{k}", partial)
    (partial / "trainer_state.json").unlink()
    (partial / "optimizer.pt").write_bytes(b"half")
    return dst


@pytest.mark.parametrize("k", [3, 6, 9], ids=["mid-epoch", "epoch-boundary", "second-epoch"])
def test_resume_is_bitwise_identical(reference, tmp_path, k):
    ref_run, cfg = reference
    state = json.loads((ref_run / f"checkpoint-{k}" / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (k, 0 if k <= 6 else 1, k if k <= 6 else 3)
    run = as_if_killed_after(ref_run, k, tmp_path / "run")
    run_inprocess(tmp_path, cfg, f"train.output_dir={run}", "train.resume_from_checkpoint=true")

    assert same_weights(weights(run / "final"), weights(ref_run / "final"))
    # metrics.jsonl reads as one run: the steps after k were dropped and logged again, identically
    records = step_records(run)
    assert [r["step"] for r in records] == list(range(1, 11))
    ref = step_records(ref_run)
    for mine, theirs in zip(records, ref):
        for key in ("lr", "grad_norm", "epoch", *[key for key in theirs if key.startswith("loss/")]):
            assert mine[key] == theirs[key], (mine["step"], key)
    resumed = [r for r in read_metrics(run) if r.get("event") == "resumed"]
    assert resumed == [{"step": k, "event": "resumed", "checkpoint": str(run / f"checkpoint-{k}")}]
    assert not list(run.glob(".tmp-*"))  # the killed run's temp folder was cleaned up


def test_resume_from_a_path_into_a_new_folder_and_the_rng_matters(reference, tmp_path, monkeypatch):
    ref_run, cfg = reference
    ckpt = ref_run / "checkpoint-3"
    run_inprocess(tmp_path, cfg, f"train.output_dir={tmp_path / 'a'}", f"train.resume_from_checkpoint={ckpt}")
    assert same_weights(weights(tmp_path / "a" / "final"), weights(ref_run / "final"))
    # Control: without restoring the RNG streams, dropout draws other masks and the weights differ.
    monkeypatch.setattr(run_checkpoints, "set_rng_state", lambda state: None)
    run_inprocess(tmp_path, cfg, f"train.output_dir={tmp_path / 'b'}", f"train.resume_from_checkpoint={ckpt}")
    assert not same_weights(weights(tmp_path / "b" / "final"), weights(ref_run / "final"))


def test_resume_into_a_new_folder_brings_the_best_model_along(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """load_best_model_at_end, the best score at the first evaluation (step 2): a run resumed from checkpoint-6
    into another folder must finish with the same final/ (the step-2 model) as the uninterrupted run."""
    dev = write_jsonl(tmp_path / "dev_ir.jsonl", [{"query": r["query"], "positive": r["positive"]}
                                                   for r in retrieval_rows(8, seed=3)])
    cfg = two_task_config(tmp_path, tiny_model_dir, save_steps=3, eval_steps=2, load_best_model_at_end=True,
                          output_dir=str(tmp_path / "ref"))
    cfg["eval"] = {"ir": [str(dev)]}
    calls = iter(range(10**6))
    monkeypatch.setattr(train, "best_metric_value", lambda *args: -float(next(calls)))  # the first eval wins
    run_inprocess(tmp_path, cfg)
    ref = tmp_path / "ref"
    assert json.loads((ref / "checkpoint-6" / "trainer_state.json").read_text())["best_step"] == 2
    assert not same_weights(weights(ref / "final"), weights(ref / "checkpoint-9"))  # final/ is not the last model
    # ... and its storage-vs-quality table is the best model's too (best/'s eval_results_by_precision.json)
    by_precision = json.loads((ref / "final" / run_folder.PRECISION_RESULTS).read_text())
    assert by_precision == json.loads((ref / "best" / run_folder.PRECISION_RESULTS).read_text())
    final_results = json.loads((ref / "final" / "eval_results.json").read_text())
    assert by_precision["float32"] == final_results and list(by_precision) == ["float32", "int8", "binary"]
    assert f"| 16 | int8 | 16 | 12.5% | {by_precision['int8']['16']['dev_ir']['ndcg@10']:.4f} |" in \
        (ref / "final" / "README.md").read_text()

    calls = iter(range(10**6))  # the resumed run's evaluations all score below the checkpoint's best (−0)
    run_inprocess(tmp_path, cfg, f"train.output_dir={tmp_path / 'new'}",
                  f"train.resume_from_checkpoint={ref / 'checkpoint-6'}")
    assert same_weights(weights(tmp_path / "new" / "final"), weights(ref / "final"))
    assert same_weights(weights(tmp_path / "new" / "best"), weights(ref / "best"))

    # the earlier run's best/ is gone: a warning says so, and training goes on
    shutil.rmtree(ref / "best")
    calls = iter(range(10**6))
    run_inprocess(tmp_path, cfg, f"train.output_dir={tmp_path / 'gone'}",
                  f"train.resume_from_checkpoint={ref / 'checkpoint-6'}")
    assert (tmp_path / "gone" / "final").is_dir() and not (tmp_path / "gone" / "best").exists()
    assert f"{ref / 'best'} is missing" in capsys.readouterr().err


def test_examples_per_sec_leaves_out_evaluations_and_checkpoints(monkeypatch):
    from types import SimpleNamespace as NS

    clock = iter([101.0, 109.0, 110.0])  # window opened at 100; an evaluation from 101 to 109; logged at 110
    monkeypatch.setattr(metrics_log.time, "perf_counter", lambda: next(clock))
    window = LogWindow(examples=10, t0=100.0)
    with window.pause():
        pass
    records = []
    run = NS(cfg=NS(matryoshka=None), state=NS(step=1, epoch=0, batch_in_epoch=1, skipped_steps=0), steps_per_epoch=2,
             scheduler=NS(get_last_lr=lambda: [0.1]), scaler=NS(is_enabled=lambda: False), log=NS(write=records.append))
    train.log_progress(run, window, torch.tensor(1.0), NS(set_postfix=lambda **kw: None))
    assert records[0]["examples_per_sec"] == 5.0  # 10 examples in 10 s, 8 of them evaluating


def test_checkpoint_contents_load_safely(reference):
    ckpt = reference[0] / "checkpoint-6"
    assert not run_checkpoints.missing_files(ckpt, world_size=1)
    for name in ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state_0.pt"):
        torch.load(ckpt / name, weights_only=True)  # plain data only
    assert SentenceEncoder.from_pretrained(ckpt).encode(["il gatto"]).shape == (1, 32)


# ──────────────────────────────────────────────────────────────────────────────────────────────── kill -9, SIGTERM
def popen_train(config: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "train.py", "--config", str(config), *overrides], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def logged_steps(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line).get("step", 0) for line in lines[:-1] if line.strip()]  # the last may be partial
    return max(steps, default=0)


def wait_for(proc: subprocess.Popen, ready, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"train.py exited ({proc.returncode}) before {what}:\n{proc.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


@pytest.fixture(scope="module")
def subprocess_reference(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rel_subprocess")
    cfg = two_task_config(tmp, tiny_model_dir, max_steps=40, save_steps=4, output_dir=str(tmp / "reference"))
    config = write_config(tmp, cfg)
    run_train(config)
    return config, weights(tmp / "reference" / "final")


@pytest.fixture(scope="module")
def keyed_subprocess_reference(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rel_subprocess_keyed")
    cfg = two_task_config(tmp, tiny_model_dir, max_steps=40, save_steps=4, output_dir=str(tmp / "reference"))
    cfg["model"]["dropout_masks"] = "keyed"
    config = write_config(tmp, cfg)
    run_train(config)
    return config, weights(tmp / "reference" / "final")


@pytest.mark.parametrize("masks", ["stream", "keyed"])
def test_kill_9_at_a_random_step_then_resume_is_bitwise_identical(request, masks, tmp_path):
    config, reference_weights = request.getfixturevalue(
        "subprocess_reference" if masks == "stream" else "keyed_subprocess_reference")
    run = tmp_path / "run"
    extra = random.randint(1, 3)  # steps past the first checkpoint
    print(f"killing {extra} step(s) after checkpoint-4")
    proc = popen_train(config, f"train.output_dir={run}")
    wait_for(proc, lambda: run_folder.list_checkpoints(run) and logged_steps(run) >= 4 + extra, "the kill point")
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "final").exists()

    resumed = run_train(config, f"train.output_dir={run}", "train.resume_from_checkpoint=true")
    assert "resuming from" in resumed.stderr
    assert same_weights(weights(run / "final"), reference_weights)
    assert [r["step"] for r in step_records(run)] == list(range(1, 41))
    assert not list(run.glob(".tmp-*"))


def test_sigterm_checkpoints_the_current_step_and_exits(subprocess_reference, tmp_path):
    config, reference_weights = subprocess_reference
    run = tmp_path / "run"
    proc = popen_train(config, f"train.output_dir={run}")
    wait_for(proc, lambda: logged_steps(run) >= 2, "step 2")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    step = run_folder.list_checkpoints(run)[-1][0]
    assert f"stopped by SIGTERM after step {step}; saved {run / f'checkpoint-{step}'}" in err
    assert step == max(r["step"] for r in step_records(run))  # the checkpoint is of the step it stopped after
    run_train(config, f"train.output_dir={run}", "train.resume_from_checkpoint=true")
    assert same_weights(weights(run / "final"), reference_weights)


# ──────────────────────────────────────────────────────────────────────────────────────────────── atomic checkpoints
def test_a_failed_checkpoint_write_leaves_the_earlier_ones(tiny_model_dir, tmp_path, capsys, monkeypatch):
    cfg = train_config(tmp_path, tiny_model_dir, max_steps=6, save_steps=2)
    real, real_torch_save = run_checkpoints.save_checkpoint, torch.save
    failed = []

    def disk_full_at_step_4(tmp, final, *, state, **kwargs):
        """The real checkpoint write; at step 4 the disk fills up half-way through optimizer.pt (after the
        model and the RNG state were written into the temp folder)."""
        if state.step != 4:
            return real(tmp, final, state=state, **kwargs)

        def torch_save(obj, f, *args, **kw):
            if Path(f).name == "optimizer.pt":
                Path(f).write_bytes(b"partial")
                failed.append(Path(f))
                raise OSError(28, "No space left on device")
            return real_torch_save(obj, f, *args, **kw)

        with monkeypatch.context() as m:
            m.setattr(run_checkpoints.torch, "save", torch_save)
            return real(tmp, final, state=state, **kwargs)

    monkeypatch.setattr(run_checkpoints, "save_checkpoint", disk_full_at_step_4)
    line = cli_error(capsys, tmp_path, cfg)
    run = tmp_path / "run"
    assert failed and failed[0].parent.name.startswith(".tmp-")  # it failed inside the temp folder of step 4
    assert f"cannot write {run / 'checkpoint-4'}: No space left on device" in line
    assert [s for s, _ in run_folder.list_checkpoints(run)] == [2]
    assert not (run / "checkpoint-4").exists() and not list(run.glob(".tmp-*"))
    monkeypatch.setattr(run_checkpoints, "save_checkpoint", real)
    run_inprocess(tmp_path, cfg, "train.resume_from_checkpoint=true")
    assert (run / "final" / "model.safetensors").exists()


def test_incomplete_checkpoints_are_never_taken(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    (run / "checkpoint-9" / "trainer_state.json").unlink()  # cut off before its last file
    shutil.copytree(run / "checkpoint-6", run / ".tmp-checkpoint-12")  # a temp folder is never a checkpoint
    (run / "checkpoint-6" / "rng_state_0.pt").unlink()
    assert run_folder.resolve_resume(True, run)[0] == run / "checkpoint-3"
    with pytest.raises(ConfigError, match=r"checkpoint-9 is not a complete checkpoint \(missing trainer_state"):
        run_folder.resolve_resume(str(run / "checkpoint-9"), run)
    with pytest.raises(ConfigError, match="holds no complete checkpoint"):
        run_folder.resolve_resume("true", tmp_path / "empty")


def test_restore_half_replaced_removes_temp_files_and_folders_and_restores_a_half_replaced_one(tmp_path):
    for name in (".tmp-checkpoint-5", ".old-final", ".old-best", "best"):
        (tmp_path / name).mkdir()
    (tmp_path / ".old-final" / "model.safetensors").write_text("x")
    (tmp_path / ".old-best" / "model.safetensors").write_text("old")
    (tmp_path / "best" / "model.safetensors").write_text("new")
    (tmp_path / ".tmp-metrics.jsonl.k1ll3d").write_text("half")  # an atomic write cut short
    restore_half_replaced(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "final"]
    assert (tmp_path / "final" / "model.safetensors").read_text() == "x"
    assert (tmp_path / "best" / "model.safetensors").read_text() == "new"  # the newer best/ wins


@pytest.mark.parametrize("keep, best, kept", [(None, None, [2, 4, 6, 8]), (2, None, [6, 8]), (1, None, [8]),
                                              (2, 2, [2, 6, 8]), (1, 2, [2, 8]), (2, 8, [6, 8])])
def test_save_total_limit_keeps_the_newest_and_the_best(reference, tmp_path, keep, best, kept):
    for step in (2, 4, 6, 8):
        shutil.copytree(reference[0] / "checkpoint-3", tmp_path / f"checkpoint-{step}")
    run_folder.rotate_checkpoints(tmp_path, keep, best)
    assert [s for s, _ in run_folder.list_checkpoints(tmp_path)] == kept


def test_checkpoints_are_ordered_by_step_not_by_folder_name(reference, tmp_path):
    """checkpoint-10 is newer than checkpoint-9, though "checkpoint-10" < "checkpoint-9" as strings: ordered by
    name, resume=true would take step 9 and save_total_limit would delete step 10, the newest."""
    for step in (9, 10):
        shutil.copytree(reference[0] / "checkpoint-3", tmp_path / f"checkpoint-{step}")
    assert [s for s, _ in run_folder.list_checkpoints(tmp_path)] == [9, 10]
    assert run_folder.resolve_resume(True, tmp_path)[0] == tmp_path / "checkpoint-10"
    (tmp_path / "checkpoint-10" / "optimizer.pt").write_bytes(b"damaged")  # the fallback walks back by step too
    assert run_folder.resolve_resume(True, tmp_path)[0] == tmp_path / "checkpoint-9"
    shutil.rmtree(tmp_path / "checkpoint-10")
    for step in (9, 10, 11):
        shutil.copytree(reference[0] / "checkpoint-3", tmp_path / f"checkpoint-{step}", dirs_exist_ok=True)
    run_folder.rotate_checkpoints(tmp_path, 2, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-11"]


def test_save_total_limit_in_a_run(tiny_model_dir, tmp_path):
    run_inprocess(tmp_path, train_config(tmp_path, tiny_model_dir, max_steps=7, save_steps=2, save_total_limit=2))
    assert [s for s, _ in run_folder.list_checkpoints(tmp_path / "run")] == [4, 6]


# ──────────────────────────────────────────────────────────────────────────────────────────────── bad data
BAD_DATA = [  # (rows or raw text inserted as line 3, task loss, fragments of the message)
    ("retrieval", '{"query": "q", "positive": ', [":3: invalid JSON"]),
    ("retrieval", {"query": "q", "positive": "p", "negative_1": "n"}, [":3: missing column 'negative_2'"]),
    ("retrieval", {"query": "", "positive": "p", "negative_1": "n", "negative_2": "m"},
     [":3: column 'query': expected a non-empty string"]),
    ("retrieval", {"query": "q", "positive": 7, "negative_1": "n", "negative_2": "m"},
     [":3: column 'positive'", "found 7"]),
    ("retrieval", {"query": "q", "positive": "p", "negative_1": "n", "negative_2": "p"},
     [":3: column 'negative_2' equals column 'positive'"]),
    ("sts", {"sentence1": "a", "sentence2": "b", "score": "high"}, [":3: column 'score': expected a number"]),
    ("sts", '{"sentence1": "a", "sentence2": "b", "score": NaN}', [":3: column 'score'", "finite", "nan"]),
    ("sts", '{"sentence1": "a", "sentence2": "b", "score": -Infinity}', [":3: column 'score'", "finite"]),
    ("sts", {"sentence1": "a", "sentence2": None, "score": 1}, [":3: column 'sentence2'", "found None"]),
]


@pytest.mark.parametrize("task, bad, fragments", BAD_DATA)
def test_bad_rows_are_one_line_exit_2_and_no_run_folder(tiny_model_dir, tmp_path, capsys, task, bad, fragments):
    cfg = two_task_config(tmp_path, tiny_model_dir)
    path = Path(cfg["tasks"][task]["dataset"])
    lines = path.read_text().splitlines()
    lines.insert(2, bad if isinstance(bad, str) else json.dumps(bad))
    path.write_text("\n".join(lines) + "\n")
    line = cli_error(capsys, tmp_path, cfg)
    assert f"{path}:3: " in line, line  # FILE:LINE
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert not (tmp_path / "run").exists()


def test_empty_dataset_and_too_few_rows_for_a_batch(tiny_model_dir, tmp_path, capsys):
    cfg = two_task_config(tmp_path, tiny_model_dir)
    sts = Path(cfg["tasks"]["sts"]["dataset"])
    sts.write_text("\n")
    assert f"task 'sts': {sts} has no rows" in cli_error(capsys, tmp_path, cfg)
    write_jsonl(sts, sts_rows(4))
    line = cli_error(capsys, tmp_path, cfg)
    assert "task 'sts'" in line and "a step needs 6 rows" in line and "only 4 rows" in line
    # 30 rows, but every row shares its positive with 9 others: a batch without repeats holds at most 3 rows
    rows = [{**r, "positive": f"il testo {i % 3}"} for i, r in enumerate(retrieval_rows(30))]
    write_jsonl(Path(cfg["tasks"]["retrieval"]["dataset"]), rows)
    write_jsonl(sts, sts_rows(12))
    line = cli_error(capsys, tmp_path, cfg)
    assert "task 'retrieval'" in line and "30 rows fill at most 3 without repeating a text" in line
    assert "lower train.per_device_train_batch_size" in line
    assert not (tmp_path / "run").exists()


def test_bad_eval_file_and_pre_existing_output_dir_is_untouched(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = folder_snapshot(out)
    bad_eval = tmp_path / "dev.jsonl"
    bad_eval.write_text('{"query": "q"}\n')
    cfg = two_task_config(tmp_path, tiny_model_dir, output_dir=str(out))
    cfg["eval"] = {"ir": [str(bad_eval)]}
    line = cli_error(capsys, tmp_path, cfg)
    assert str(bad_eval) in line
    assert folder_snapshot(out) == before


def test_a_real_subprocess_prints_one_line_and_no_traceback(tiny_model_dir, tmp_path):
    cfg = two_task_config(tmp_path, tiny_model_dir)
    path = Path(cfg["tasks"]["retrieval"]["dataset"])
    path.write_text(path.read_text() + "{not json\n")
    proc = run_train(write_config(tmp_path, cfg), check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {path}:25: invalid JSON")
    assert not (tmp_path / "run").exists()


# ──────────────────────────────────────────────────────────────────────────────────────────────── bad config
BAD_CONFIG = [
    (["train.learning_rat=1e-4"], ["train.learning_rat", "unknown key", "learning_rate"]),
    (["train.max_steps=\"ten\""], ["train.max_steps", "expected integer", "\"ten\""]),
    (["train.mini_batch_size=0"], ["train.mini_batch_size", "expected ≥ 1", "found 0"]),
    (["matryoshka.dims=[16,32]", "matryoshka.weights=[1,1]"], ["matryoshka.dims", "strictly descending"]),
    (["matryoshka.dims=[64,16]"], ["matryoshka.dims", "[64] larger than the model's embedding dim 32"]),
    (["matryoshka.weights=[1.0]"], ["matryoshka.weights", "2 dims", "1 weights"]),
    (["tasks.sts.balance_to=\"retrival\""], ["tasks.sts.balance_to", "no task named 'retrival'", "retrieval, sts"]),
    (["train.fp16=true", "train.bf16=true"], ["train.fp16 and train.bf16"]),
    (["train.max_steps"], ["override 'train.max_steps'", "expected KEY.SUB=VALUE"]),
    (["model.max_seq_length=100"], ["model.max_seq_length", "64 position embeddings"]),
]


@pytest.mark.parametrize("overrides, fragments", BAD_CONFIG)
def test_bad_config_is_one_line_exit_2_and_no_run_folder(tiny_model_dir, tmp_path, capsys, overrides, fragments):
    line = cli_error(capsys, tmp_path, two_task_config(tmp_path, tiny_model_dir), *overrides)
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert not (tmp_path / "run").exists()


def test_mini_batch_size_counts_texts_and_may_exceed_the_batch_size(tiny_model_dir, tmp_path):
    """6 rows × 4 columns = 24 texts a step: mini_batch_size 12 (> the 6 rows) cuts them in two chunks, and any
    mini_batch_size ≥ 24 is one chunk of them all, so 24 and 1000 train bitwise alike."""
    for mini in (12, 24, 1000):
        run_inprocess(tmp_path, train_config(tmp_path, tiny_model_dir, mini_batch_size=mini,
                                             output_dir=str(tmp_path / f"run-{mini}")))
        assert json.loads((tmp_path / f"run-{mini}" / "config.json").read_text())["train"]["mini_batch_size"] == mini
    assert same_weights(weights(tmp_path / "run-24" / "final"), weights(tmp_path / "run-1000" / "final"))
    assert not same_weights(weights(tmp_path / "run-24" / "final"), weights(tiny_model_dir))  # it trained


def test_bad_config_files(tmp_path, capsys):
    assert f"{tmp_path / 'nope.json'}: file not found" in cli_error(capsys, tmp_path, None, "--config",
                                                                   str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text('{"model": {"name_or_path": "x"},\n "tasks": }')
    assert "bad.json:2:" in cli_error(capsys, tmp_path, None, "--config", str(tmp_path / "bad.json"))
    (tmp_path / "latin1.json").write_bytes(b'{"model": "caf\xe9"}')
    assert "not UTF-8" in cli_error(capsys, tmp_path, None, "--config", str(tmp_path / "latin1.json"))
    with pytest.raises(SystemExit) as info:  # argparse's own usage error, also exit 2
        train.cli([])
    assert info.value.code == 2 and "required: --config" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_fp16_without_cuda_warns_once_and_says_what_it_does(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(mixed_precision, "native_bf16", lambda device: False)  # never emulate bf16 here: ~100× slower
    run_inprocess(tmp_path, train_config(tmp_path, tiny_model_dir, max_steps=1, fp16=True))
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: train.fp16 needs CUDA and this machine has none: training with fp32 instead "
                        "(this CPU has no native bfloat16)."]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["fp16"] is True


def test_a_fresh_run_never_overwrites_an_earlier_one(reference, tmp_path, capsys):
    run, cfg = reference
    before = folder_snapshot(run)
    line = cli_error(capsys, tmp_path, cfg)
    assert f"train.output_dir: {run} already holds an earlier run" in line and "resume_from_checkpoint=true" in line
    line = cli_error(capsys, tmp_path, cfg, f"train.output_dir={tmp_path / 'empty'}",
                     "train.resume_from_checkpoint=true")
    assert "holds no complete checkpoint" in line
    assert folder_snapshot(run) == before


def test_resume_refuses_other_settings_or_data_and_warns_on_memory_knobs(reference, tmp_path, capsys):
    ref_run, cfg = reference
    ckpt = ref_run / "checkpoint-6"
    before = folder_snapshot(ref_run)
    args = [f"train.output_dir={tmp_path / 'out'}", f"train.resume_from_checkpoint={ckpt}"]
    line = cli_error(capsys, tmp_path, cfg, *args, "train.learning_rate=0.002", "train.seed=8")
    assert "train.learning_rate: 0.001 → 0.002" in line and "train.seed: 7 → 8" in line
    assert f"model.name_or_path={ckpt}" in line
    moved = write_jsonl(tmp_path / "moved" / "sts.jsonl", sts_rows(12))  # a new path, same rows: fine
    changed = write_jsonl(tmp_path / "changed.jsonl", sts_rows(12, seed=1))
    line = cli_error(capsys, tmp_path, cfg, *args, f"tasks.sts.dataset={changed}")
    assert "the rows of task 'sts' changed (same row count, other content)" in line
    assert not (tmp_path / "out").exists()
    run_inprocess(tmp_path, cfg, *args, f"tasks.sts.dataset={moved}", "train.mini_batch_size=2",
                  "train.logging_steps=5")
    err = capsys.readouterr().err
    assert "warning: resuming with train.mini_batch_size 3 → 2" in err
    assert folder_snapshot(ref_run) == before
    with pytest.raises(ConfigError, match=r"world size: 1 → 2 process\(es\)"):
        state, saved = run_checkpoints.read_checkpoint(ckpt)
        run_checkpoints.check_resume(ckpt, state, saved, saved, 2, state.data_fingerprint)


def test_a_checkpoint_from_before_the_speedups_section_resumes_bitwise(reference, tmp_path, capsys):
    """A checkpoint whose run_config.json has the speed-up keys at their old places (train.grad_cache_*,
    train.adamw_fused, no `speedups`) and none of the keys added since, as every run folder written before the move
    has: it resumes, and ends bitwise where the uninterrupted run ended. The keys it lacks that change rounding ran as
    false (EARLIER_DEFAULTS): a resume under today's defaults names each in a notice; with the old values it is
    silent."""
    ref_run, cfg = reference
    old = tmp_path / "old" / "checkpoint-6"
    shutil.copytree(ref_run / "checkpoint-6", old)
    saved = json.loads((old / "run_config.json").read_text())
    speedups = saved.pop("speedups")
    assert speedups == dataclasses.asdict(SpeedupsConfig())
    saved["train"].update({old_key.split(".")[1]: speedups[new.split(".")[1]]
                           for old_key, new in MOVED_KEYS.items()})
    (old / "run_config.json").write_text(json.dumps(saved))
    seal_checksums(old)
    # the keys that came with issue 20 ran as false; of those, the two that change no number need no notice
    later = {"onednn_linear": '"auto"', "embedding_grad_buffer": "true", "lazy_mask_bits": "true"}
    for extra in ([], [f"speedups.{key}=false" for key in later]):
        capsys.readouterr()
        out = tmp_path / f"out{len(extra)}"
        run_inprocess(tmp_path, cfg, f"train.output_dir={out}", f"train.resume_from_checkpoint={old}", *extra)
        err = capsys.readouterr().err
        warned = [f"warning: resuming with speedups.{key} false → {value}" in err for key, value in later.items()]
        assert warned == [not extra] * len(later) and err.count("warning: resuming with") == sum(warned), err
        if not extra:  # today's defaults, as the reference run: bitwise (the tiny model's products are below
            assert same_weights(weights(out / "final"), weights(ref_run / "final"))  # "auto"'s size)


def test_a_resume_may_change_the_speedups_that_change_no_number_silently(reference, tmp_path, capsys):
    """keep_dropout_masks (pass 1's masks from a tape = the masks the RNG replay draws again) and keep_freed_memory
    (malloc's thresholds): a resume that turns them off is silent and ends bitwise where the uninterrupted run did."""
    ref_run, cfg = reference
    capsys.readouterr()
    run_inprocess(tmp_path, cfg, f"train.output_dir={tmp_path / 'out'}",
                  f"train.resume_from_checkpoint={ref_run / 'checkpoint-6'}", "speedups.keep_dropout_masks=false",
                  "speedups.keep_freed_memory=false")
    err = capsys.readouterr().err
    assert "warning: resuming with" not in err, err
    assert same_weights(weights(tmp_path / "out" / "final"), weights(ref_run / "final"))


def test_a_resume_accepts_every_speedup_change_with_a_notice(reference, tmp_path, capsys):
    """The speed-ups change cost, not the gradient: after a pre-emption onto a smaller GPU the run goes on. The keys
    at their new places and at their old ones (train.grad_cache_auto_mini_batch_gib, ..._length_multiple,
    ..._mini_batch_tokens, train.adamw_fused), and `speedups=null`."""
    ref_run, cfg = reference
    ckpt = ref_run / "checkpoint-9"
    changes = {"new": ["speedups.memory_budget=1", "speedups.linear_tape=true"],
               "old": ["train.grad_cache_length_multiple=8", "train.grad_cache_mini_batch_tokens=40",
                       "train.grad_cache_auto_mini_batch_gib=1.5", "train.adamw_fused=false"],
               "null": ["speedups=null"]}
    for name, overrides in changes.items():
        capsys.readouterr()
        run_inprocess(tmp_path, cfg, f"train.output_dir={tmp_path / name}", f"train.resume_from_checkpoint={ckpt}",
                      *overrides)
        err = capsys.readouterr().err
        notices = [line for line in err.splitlines() if line.startswith("warning: resuming with speedups")]
        assert len(notices) >= len(overrides) and all("not bitwise" in n for n in notices), err
        assert (tmp_path / name / "final" / "model.safetensors").is_file()


# ──────────────────────────────────────────────────────────────────────────────────────────────── numerical faults
def inject(monkeypatch, bad_calls, factor=float("nan")):
    """Objective(...) is called once per step: multiply the loss of the listed (0-based) calls by `factor`."""
    original, calls = Objective.__call__, {"n": 0}

    def patched(self, reps, n_columns, scores=None, parts=None):
        loss = original(self, reps, n_columns, scores, parts)
        i, calls["n"] = calls["n"], calls["n"] + 1
        return loss * factor if i in bad_calls else loss

    monkeypatch.setattr(Objective, "__call__", patched)


def optimizer_moments(ckpt: Path) -> list[torch.Tensor]:
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)["state"]
    return [t for s in state.values() for t in (s["exp_avg"], s["exp_avg_sq"], s["step"])]


def test_nonfinite_steps_are_skipped_counted_and_change_nothing(tiny_model_dir, tmp_path, monkeypatch):
    inject(monkeypatch, {2, 4})  # steps 3 and 5
    run_inprocess(tmp_path, train_config(tmp_path, tiny_model_dir, max_steps=6, save_steps=1))
    run = tmp_path / "run"
    skipped = [r for r in read_metrics(run) if "skipped" in r]
    assert [(r["step"], r["skipped"]) for r in skipped] == [(3, "non-finite loss"), (5, "non-finite loss")]
    assert step_records(run)[-1]["skipped_steps"] == 2
    assert all(r.get("loss/retrieval") is None or np.isfinite(r["loss/retrieval"]) for r in step_records(run))
    w = {s: weights(run / f"checkpoint-{s}") for s in range(1, 6)}
    assert same_weights(w[2], w[3]) and same_weights(w[4], w[5])
    assert not same_weights(w[3], w[4]) and not same_weights(w[1], w[2])
    assert all(torch.equal(a, b) for a, b in zip(optimizer_moments(run / "checkpoint-2"),
                                                   optimizer_moments(run / "checkpoint-3")))
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))  # strict JSON


def test_n_nonfinite_steps_in_a_row_stop_the_run(tiny_model_dir, tmp_path, capsys, monkeypatch):
    inject(monkeypatch, set(range(3, 100)))  # from step 4 on
    cfg = train_config(tmp_path, tiny_model_dir, max_steps=20, save_steps=2, max_consecutive_nonfinite=3)
    line = cli_error(capsys, tmp_path, cfg)
    run = tmp_path / "run"
    assert line.startswith("error: 3 steps in a row had a non-finite loss or gradient (the last: step 6, task "
                           "'retrieval', its loss)")
    assert f"the last checkpoint is {run / 'checkpoint-4'}" in line


def test_fp16_gradscaler_skips_and_lowers_the_scale(tiny_model_dir, tmp_path, monkeypatch):
    """The fp16 branch on CPU (torch.amp.GradScaler("cpu") and fp16 autocast work there; on CUDA it is the same
    code). The scaler starts at 2**16, too high for this model: its first steps overflow, as on a GPU."""
    monkeypatch.setattr(build, "autocast_dtype", lambda fp16, bf16, device: (torch.float16, None))
    inject(monkeypatch, {4})  # step 5: a NaN loss
    run_inprocess(tmp_path, train_config(tmp_path, tiny_model_dir, max_steps=10, save_steps=1))
    run = tmp_path / "run"
    skipped = [r for r in read_metrics(run) if "skipped" in r]
    assert [r["loss_scale"] for r in skipped] == [2.0 ** (15 - i) for i in range(len(skipped))]  # halved each time
    assert [(r["skipped"], r["nonfinite_in_a_row"]) for r in skipped if r["step"] == 5] == [("non-finite loss", 1)]
    assert all(r["skipped"] == "fp16 gradient overflow" for r in skipped if r["step"] != 5)
    w = {0: weights(tiny_model_dir), **{s: weights(run / f"checkpoint-{s}") for s in range(1, 10)},
         10: weights(run / "final")}
    skipped_steps = {r["step"] for r in skipped}
    for s in range(1, 11):
        assert same_weights(w[s - 1], w[s]) == (s in skipped_steps), s  # a skipped step changes nothing
    assert torch.load(run / "checkpoint-9" / "scaler.pt", weights_only=True)["scale"] == skipped[-1]["loss_scale"]


def test_fp16_gradient_overflows_do_not_stop_the_run(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(build, "autocast_dtype", lambda fp16, bf16, device: (torch.float16, None))
    inject(monkeypatch, {0, 1, 2}, factor=1e30)  # a finite loss whose scaled gradient overflows fp16
    run_inprocess(tmp_path, train_config(tmp_path, tiny_model_dir, max_steps=4, max_consecutive_nonfinite=1))
    skipped = [r for r in read_metrics(tmp_path / "run") if "skipped" in r]
    assert len(skipped) >= 3 and {r["skipped"] for r in skipped} == {"fp16 gradient overflow"}
    assert (tmp_path / "run" / "final").exists()  # overflows do not count toward max_consecutive_nonfinite


# ──────────────────────────────────────────────────────────────────────────────────────────────── safe loading
class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {PWNED}",))


PWNED = Path(tempfile.gettempdir()) / f"bertino-pwned-{os.getpid()}"


def test_pickled_weights_load_through_a_safe_cached_copy_and_the_converter(tiny_mlm_dir, tmp_path, capsys,
                                                                           monkeypatch):
    """A folder with only pytorch_model.bin loads: converted once (weights_only) into bertino's cache, keyed by the
    pickle's sha256, with a one-line notice; the folder itself is left untouched. The explicit converter stays."""
    from transformers import DistilBertForMaskedLM

    monkeypatch.setenv("BERTINO_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "bin"
    shutil.copytree(tiny_mlm_dir, folder)
    (folder / "model.safetensors").unlink()
    # the state_dict of an MLM model ties vocab_projector.weight to the word embeddings (one shared storage)
    torch.save(DistilBertForMaskedLM.from_pretrained(str(tiny_mlm_dir)).state_dict(), folder / "pytorch_model.bin")
    original = SentenceEncoder.from_pretrained(tiny_mlm_dir).encode(["il gatto"])
    np.testing.assert_array_equal(SentenceEncoder.from_pretrained(folder).encode(["il gatto"]), original)
    notice = capsys.readouterr().err
    assert notice.count("converting them once, safely") == 1 and str(tmp_path / "cache" / "converted") in notice
    assert len(list((tmp_path / "cache" / "converted").glob("*/model.safetensors"))) == 1
    assert not (folder / "model.safetensors").exists()  # the model folder is not written to
    SentenceEncoder.from_pretrained(folder)  # the second load reads the cached copy: no notice
    assert "converting" not in capsys.readouterr().err
    from bertino import convert as convert_module

    convert_module.main([str(folder)])  # tied MLM weights share storage: the converter copies them apart
    assert "wrote" in capsys.readouterr().out
    np.testing.assert_array_equal(SentenceEncoder.from_pretrained(folder).encode(["il gatto"]), original)


def seal_checksums(ckpt):
    """Rewrite a tampered checkpoint's checksums, as someone who forges a checkpoint would."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["checksums"] = run_checkpoints.checksums(ckpt)
    (ckpt / "trainer_state.json").write_text(json.dumps(state))


def test_pickled_code_is_refused_everywhere(reference, tmp_path, capsys):
    PWNED.unlink(missing_ok=True)
    folder = tmp_path / "evil"
    folder.mkdir()
    torch.save({"w": torch.zeros(1), "x": RunsCode()}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refused by torch.load"):
        convert(folder)
    (folder / "config.json").write_text('{"model_type": "distilbert", "vocab_size": 8, "dim": 4, "n_layers": 1, '
                                        '"n_heads": 1, "hidden_dim": 8, "max_position_embeddings": 8}')
    with pytest.raises(CheckpointError, match="refused by torch.load"):  # the automatic conversion refuses it too
        SentenceEncoder.from_pretrained(folder)
    ref_run, cfg = reference
    ckpt = tmp_path / "checkpoint-3"
    shutil.copytree(ref_run / "checkpoint-3", ckpt)
    torch.save({"state": {}, "param_groups": RunsCode()}, ckpt / "optimizer.pt")
    args = f"train.output_dir={tmp_path / 'out'}", f"train.resume_from_checkpoint={ckpt}"
    assert "optimizer.pt: changed since it was written" in cli_error(capsys, tmp_path, cfg, *args)
    # an attacker rewrites the checksums too: torch.load(weights_only=True) still refuses the pickle
    seal_checksums(ckpt)
    assert f"{ckpt / 'optimizer.pt'}: cannot read with torch.load(weights_only=True)" in cli_error(
        capsys, tmp_path, cfg, *args)
    (ckpt / "optimizer.pt").write_bytes((ref_run / "checkpoint-3" / "optimizer.pt").read_bytes()[:100])
    seal_checksums(ckpt)
    assert "optimizer.pt: cannot read" in cli_error(capsys, tmp_path, cfg, *args)
    assert not PWNED.exists() and not (tmp_path / "out").exists()


def test_truncated_weights_and_mismatched_config_or_tokenizer_are_errors(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "m"
    shutil.copytree(tiny_model_dir, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read as safetensors"):
        SentenceEncoder.from_pretrained(bad)
    (bad / "model.safetensors").write_bytes(data)
    hf = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**hf, "dim": 64, "hidden_dim": 256}))
    cfg = two_task_config(tmp_path, bad)
    assert "shape mismatch for 'embeddings.word_embeddings.weight'" in cli_error(capsys, tmp_path, cfg)
    (bad / "config.json").write_text(json.dumps({**hf, "vocab_size": hf["vocab_size"] - 10}))
    line = cli_error(capsys, tmp_path, cfg)
    assert "shape mismatch" in line  # the weights have more rows than config.json says
    (bad / "config.json").write_text(json.dumps(hf))
    assert not (tmp_path / "run").exists()


def test_a_tokenizer_asking_for_remote_code_does_not_run_it(tiny_model_dir, tmp_path):
    folder = tmp_path / "remote"
    shutil.copytree(tiny_model_dir, folder)
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "auto_map": {
        "AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}}))
    marker = tmp_path / "ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    try:
        SentenceEncoder.from_pretrained(folder)
    except CheckpointError:
        pass  # refusing is fine too; running the code is not
    assert not marker.exists()


def test_no_unsafe_loading_in_the_source():
    sources = [ROOT / "train.py", ROOT / "evaluate.py", *sorted((ROOT / "bertino").rglob("*.py"))]
    packages = {p.parent.relative_to(ROOT).as_posix() for p in sources}
    assert {"bertino", "bertino/plumbing", "bertino/speedups"} <= packages  # every subpackage is covered
    assert sum("torch.load(" in p.read_text() for p in sources) >= 2  # the check below has something to check
    for path in sources:
        text = path.read_text()
        assert "trust_remote_code=True" not in text, path
        for chunk in text.split("torch.load(")[1:]:
            assert "weights_only=True" in chunk.split("\n")[0], f"{path}: torch.load without weights_only=True"


# ──────────────────────────────────────────────────────────────────────────────────────────────── property test
TEXTS = st.sampled_from(["a", "b", "c", "d", "e", "f", " ", "", "a "])  # few values: duplicates are common
VALUE = st.one_of(TEXTS, TEXTS, TEXTS, st.none(), st.integers(-2, 9), st.floats(allow_nan=True),
                  st.lists(st.integers(), max_size=1))
ROW = st.one_of(
    st.fixed_dictionaries({}, optional={k: VALUE for k in ("q", "p", "n", "s1", "s2", "score")}),
    st.fixed_dictionaries({"q": TEXTS, "p": TEXTS, "n": TEXTS, "s1": TEXTS, "s2": TEXTS,
                           "score": st.one_of(st.floats(0, 5), st.integers(0, 5))}),
    st.just("RAW{"),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(rows=st.lists(ROW, max_size=12), columns=st.sampled_from([("q", "p"), ("q", "p", "n"), ("s1", "s2", "score")]),
       batch_size=st.integers(1, 5), sampler=st.sampled_from(["no_duplicates", "batch_sampler"]),
       drop_last=st.booleans(), world=st.integers(1, 2), mode=st.sampled_from(["proportional", "round_robin"]))
def test_random_rows_give_clean_batches_or_a_data_error(rows, columns, batch_size, sampler, drop_last, world, mode):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.jsonl"
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
        loss = "cosent" if "score" in columns else "mnrl"
        cfg = config_from_dict({
            "model": {"name_or_path": "unused"},
            "tasks": {"t": {"dataset": str(path), "columns": list(columns), "loss": loss}},
            "train": {"per_device_train_batch_size": batch_size, "mini_batch_size": 1, "batch_sampler": sampler,
                      "dataloader_drop_last": drop_last, "multi_dataset_batch_sampler": mode}})
        try:
            tasks = load_tasks(cfg)
            per_rank = [batch_schedule(cfg, tasks, world, rank) for rank in range(world)]
        except DataError as e:
            assert str(path) in str(e), e
            return
    data = tasks["t"]
    for epoch in (0, 1):  # (greedy de-duplication may fill fewer batches in another epoch's order)
        for b in per_rank:
            b.set_epoch(epoch)
        steps = list(zip(*per_rank))
        assert len(steps) == len(per_rank[0]) >= (1 if epoch == 0 else 0)
        for step in steps:
            assert all(name == "t" for name, _ in step)
            shards = [rows for _, rows in step]
            assert len({len(s) for s in shards}) == 1 and 1 <= len(shards[0]) <= batch_size
            batch = [i for s in shards for i in s]
            assert all(0 <= i < len(data) for i in batch) and len(set(batch)) == len(batch)
            if sampler == "no_duplicates":
                texts = [t for i in batch for t in set(data.text_rows([i])[0])]
                assert len(texts) == len(set(texts))
        assert epoch > 0 or len(steps[0][0][1]) == batch_size  # batch_schedule checked: epoch 0 fills a batch
        if drop_last:
            assert all(len(s[0][1]) == batch_size for s in steps)


# ──────────────────────────────────────────────────────────────────────────────────────────────── torchrun
@pytest.mark.slow
def test_two_process_resume_is_bitwise_identical(tiny_model_dir, tmp_path):
    cfg = train_config(tmp_path, tiny_model_dir, per_device_train_batch_size=3, max_steps=6, save_steps=3,
                       gather_across_devices=True)
    config = write_config(tmp_path, cfg)
    run_train(config, f"train.output_dir={tmp_path / 'ref'}", nproc=2)
    assert (tmp_path / "ref" / "checkpoint-3" / "rng_state_1.pt").exists()
    run_train(config, f"train.output_dir={tmp_path / 'resumed'}",
              f"train.resume_from_checkpoint={tmp_path / 'ref' / 'checkpoint-3'}", nproc=2)
    assert same_weights(weights(tmp_path / "resumed" / "final"), weights(tmp_path / "ref" / "final"))
    proc = run_train(config, f"train.output_dir={tmp_path / 'one'}",
                     f"train.resume_from_checkpoint={tmp_path / 'ref' / 'checkpoint-3'}", check=False)
    assert proc.returncode == 2 and "world size: 2 → 1 process(es)" in proc.stderr


def test_two_process_bad_data_fails_fast_on_every_rank(tiny_model_dir, tmp_path):
    cfg = two_task_config(tmp_path, tiny_model_dir)
    path = Path(cfg["tasks"]["sts"]["dataset"])
    path.write_text(path.read_text() + '{"sentence1": "a", "sentence2": "b", "score": NaN}\n')
    start = time.monotonic()
    proc = run_train(write_config(tmp_path, cfg), nproc=2, check=False, timeout=180)
    assert proc.returncode != 0 and time.monotonic() - start < 120
    assert f"error: task 'sts': {path}:13: column 'score'" in proc.stderr
    assert not (tmp_path / "run").exists()
