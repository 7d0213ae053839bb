"""train.report_to: ["tensorboard"]: the event files, read back with tensorboard's own readers, hold exactly the
scalars of metrics.jsonl; a kill -9 + resume continues the same curves (strictly increasing steps, no duplicates)."""

from __future__ import annotations

import math
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, read_metrics, retrieval_rows, run_train, train_config, write_config, write_jsonl

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed (pip install 'bertino[tensorboard]')")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader  # noqa: E402

sys.path.insert(0, str(ROOT))
import train  # noqa: E402


def tb_config(tmp: Path, model: Path, **train_keys) -> dict:
    cfg = train_config(tmp, model, report_to=["tensorboard"], **train_keys)
    dev = [{"query": r["query"], "positive": r["positive"]} for r in retrieval_rows(24)[:10]]
    cfg["eval"] = {"ir": [str(write_jsonl(tmp / "dev.jsonl", dev))], "rescore": 4}
    return cfg


def expected_scalars(run: Path) -> dict[tuple[str, int], float | None]:
    """What the events should hold, from metrics.jsonl: every number of a logging line under its key, and
    eval/SET/METRIC/DIMd for every evaluation."""
    want = {}
    for r in read_metrics(run):
        if "lr" in r:
            want.update({(k, r["step"]): v for k, v in r.items() if k != "step"})
        for dim, sets in r.get("eval", {}).items():
            for name, metrics in sets.items():
                want.update({(f"eval/{name}/{m}/{dim}d", r["step"]): v for m, v in metrics.items()})
    return want


def events_by_tag(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tensorboard's EventAccumulator, keeping every scalar (no sampling)."""
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def raw_events(folder: Path) -> dict[str, list[int]]:
    """The steps of each tag as written, file after file (no reader-side purging of restarted runs)."""
    steps: dict[str, list[int]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in LegacyEventFileLoader(str(path)).Load():
            for value in event.summary.value if event.HasField("summary") else ():
                steps.setdefault(value.tag, []).append(event.step)
    return steps


def assert_events_equal_metrics_jsonl(events: dict, run: Path) -> None:
    want = expected_scalars(run)
    got = {(tag, step): value for tag, pairs in events.items() for step, value in pairs}
    assert set(got) == set(want)
    for key, value in want.items():
        if value is None:  # a non-finite number: null in metrics.jsonl
            assert not math.isfinite(got[key]), key
        else:
            assert got[key] == np.float32(value), key  # TensorBoard keeps float32


def test_events_hold_every_scalar_of_metrics_jsonl(tiny_model_dir, tmp_path):
    cfg = tb_config(tmp_path, tiny_model_dir, max_steps=4, eval_steps=2)
    train.main(["--config", str(write_config(tmp_path, cfg))])
    run = tmp_path / "run"
    events = events_by_tag(run / "runs")
    assert_events_equal_metrics_jsonl(events, run)
    for tag in ("lr", "grad_norm", "loss_scale", "examples_per_sec", "loss/retrieval", "loss/retrieval/32d",
                "loss/retrieval/16d", "eval/dev/ndcg@10/32d", "eval/dev/map@100/16d"):
        assert tag in events, tag
    assert [s for s, _ in events["loss/retrieval/16d"]] == [1, 2, 3, 4]
    assert [s for s, _ in events["eval/dev/ndcg@10/16d"]] == [2, 4]  # at step 2, and the final evaluation


def test_logging_dir_moves_the_events(tiny_model_dir, tmp_path):
    cfg = tb_config(tmp_path, tiny_model_dir, max_steps=2, logging_dir=str(tmp_path / "tb"))
    train.main(["--config", str(write_config(tmp_path, cfg))])
    assert not (tmp_path / "run" / "runs").exists()
    assert_events_equal_metrics_jsonl(events_by_tag(tmp_path / "tb"), tmp_path / "run")


def test_kill_9_and_resume_continue_the_same_curves(tiny_model_dir, tmp_path):
    from test_reliability import logged_steps, popen_train, wait_for

    from bertino.plumbing import run_folder

    run = tmp_path / "run"
    config = write_config(tmp_path, tb_config(tmp_path, tiny_model_dir, max_steps=12, save_steps=4, eval_steps=3))
    proc = popen_train(config)
    # killed 2 steps after checkpoint-4: the events of steps 5 and 6 (and step 6's evaluation) are on disk
    wait_for(proc, lambda: run_folder.list_checkpoints(run) and logged_steps(run) >= 6, "the kill point")
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert max(s for steps in raw_events(run / "runs").values() for s in steps) >= 5  # later steps were logged

    run_train(config, "train.resume_from_checkpoint=true")
    assert len(list((run / "runs").glob("events.out.tfevents.*"))) == 1  # the old file was folded into the new
    for tag, steps in raw_events(run / "runs").items():
        assert steps == sorted(set(steps)), tag  # strictly increasing as written: no duplicate, no step back
    events = events_by_tag(run / "runs")
    assert [s for s, _ in events["loss/retrieval"]] == list(range(1, 13))
    assert [s for s, _ in events["eval/dev/ndcg@10/32d"]] == [3, 6, 9, 12]
    assert_events_equal_metrics_jsonl(events, run)


def test_a_fresh_run_starts_empty_and_rank_0_alone_writes(tiny_model_dir, tmp_path, monkeypatch):
    from bertino import distributed
    from bertino.plumbing.config import load_config

    cfg = tb_config(tmp_path, tiny_model_dir, max_steps=2, save_steps=0)
    stale = tmp_path / "run" / "runs"
    stale.mkdir(parents=True)
    (stale / "events.out.tfevents.1.host.1.0.bertino").write_bytes(b"")  # a killed earlier fresh run's file
    (stale / "notes.txt").write_text("the user's")
    train.main(["--config", str(write_config(tmp_path, cfg))])
    assert not (stale / "events.out.tfevents.1.host.1.0.bertino").exists() and (stale / "notes.txt").exists()
    assert_events_equal_metrics_jsonl(events_by_tag(stale), tmp_path / "run")

    loaded = load_config(write_config(tmp_path, cfg, "other.json"))
    info = distributed.DistInfo(rank=1, local_rank=1, world_size=2)
    assert train.tensorboard_log(loaded, tmp_path / "run", info) is None


def test_runs_sharing_a_logging_dir_never_delete_each_other_s_events(tiny_model_dir, tmp_path, capsys):
    """Two runs with one train.logging_dir: the second's fresh start leaves the first's event files alone (it
    used to delete every *.bertino file there), and each run's files hold exactly its own metrics.jsonl."""
    shared = tmp_path / "tb"
    for name in ("a", "b"):
        cfg = train_config(tmp_path, tiny_model_dir, report_to=["tensorboard"], max_steps=2, logging_dir=str(shared),
                           output_dir=str(tmp_path / name))
        train.main(["--config", str(write_config(tmp_path, cfg, f"{name}.json"))])
    assert len(list(shared.glob("events.out.tfevents.*"))) == 2  # a's file survived b's start
    from bertino.plumbing.tensorboard_log import run_tag

    assert "also holds 1 event file(s) of other runs" in capsys.readouterr().err
    for name in ("a", "b"):
        (own,) = shared.glob(f"events.out.tfevents.*.{run_tag(tmp_path / name)}.bertino")
        alone = tmp_path / f"only_{name}"
        alone.mkdir()
        (alone / own.name).write_bytes(own.read_bytes())
        assert_events_equal_metrics_jsonl(events_by_tag(alone), tmp_path / name)
