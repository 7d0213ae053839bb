"""The Arrow-backed data layer (issue 22): the same rows, batches and scores as a plain list-based layer; data
prepared once into the cache and memory-mapped; hashes and checks reused; the fingerprint; the hold-out's seed."""

from __future__ import annotations

import itertools
import json
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bertino.objectives import column_major
from bertino.plumbing import readers
from bertino.plumbing.config import config_from_dict
from bertino.plumbing.data import (HOLDOUT_STREAM, TaskData, balance_indices, batch_schedule, holdout_indices,
                                   load_run_data, load_task)
from bertino.plumbing.run_checkpoints import data_fingerprint
from bertino.sampler import MultiTaskBatchSampler, NoDuplicatesBatchSampler
from bertino.plumbing.text_hashes import RowsOf

from helpers import retrieval_rows, sts_rows, write_jsonl


# ──────────────────────────────────────────────────────────────────────────────────────────────── a small config
def listed_rows(n: int) -> list[dict]:
    """Retrieval rows with a `hard_negatives` list of 3, exactly 2 (= count) or 1 (too short) items, and rows that
    share a positive or a query (so the no-duplicates sampler has to skip some)."""
    rows = []
    for i, r in enumerate(retrieval_rows(n)):
        negatives = [r["negative_1"], r["negative_2"], f"terzo {i}"]
        negatives = negatives[:1] if i % 7 == 0 else negatives[:2] if i % 3 == 0 else negatives
        rows.append({"query": r["query"], "positive": r["positive"], "hard_negatives": negatives})
    rows += [{"query": f"doppione {i}", "positive": rows[i]["positive"], "hard_negatives": [f"x {i}", f"y {i}"]}
             for i in range(8)]
    return rows


def two_task_config(tmp: Path, fmt: str, seed: int = 11, **train) -> dict:
    rows, sts = listed_rows(50), sts_rows(21)
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), tmp / "r.parquet")
        pq.write_table(pa.Table.from_pylist(sts), tmp / "s.parquet")
    else:
        write_jsonl(tmp / "r.jsonl", rows)
        write_jsonl(tmp / "s.jsonl", sts)
    return {"model": {"name_or_path": "unused"},
            "tasks": {"retrieval": {"dataset": str(tmp / f"r.{fmt}"), "columns": ["query", "positive"],
                                    "negatives": {"column": "hard_negatives", "count": 2}, "holdout": 0.1,
                                    "loss": "cached_mnrl"},
                      "sts": {"dataset": str(tmp / f"s.{fmt}"), "columns": ["sentence1", "sentence2", "score"],
                              "loss": "cosent", "score_scale": 5.0, "balance_to": "retrieval", "holdout": 0.15}},
            "train": {"per_device_train_batch_size": 4, "seed": seed, **train}}


def list_layer(cfg_dict: dict, world_size: int, rank: int):
    """The rows, hold-outs and batch stream of a plain list-based data layer (what bertino did before issue 22):
    every row a tuple of Python strings, read with json/pyarrow, the same seeded index draws."""
    cfg = config_from_dict(cfg_dict)
    texts, scores, held = {}, {}, {}
    for name, task in cfg.tasks.items():
        path = Path(task.dataset)
        rows = (pq.read_table(path).to_pylist() if path.suffix == ".parquet"
                else [json.loads(line) for line in path.read_text().splitlines() if line.strip()])
        if task.negatives is not None:
            rows = [r for r in rows if len(r[task.negatives.column]) >= task.negatives.count]
            t = [tuple(r[c] for c in task.columns) + tuple(r[task.negatives.column][:task.negatives.count])
                 for r in rows]
        else:
            t = [tuple(r[c] for c in task.columns[:2]) for r in rows]
        s = (np.asarray([r[task.columns[2]] for r in rows], dtype=np.float64) / task.score_scale).astype(np.float32) \
            if task.loss == "cosent" else None
        train, out = np.arange(len(t)), None
        if task.holdout > 0:
            rng = np.random.default_rng([cfg.train.seed, zlib.crc32(name.encode()), HOLDOUT_STREAM])
            train, out = holdout_indices(len(t), task.holdout, rng)
            held[name] = [t[i] for i in out]
        texts[name], scores[name] = [t[i] for i in train], None if s is None else s[train]
    for name, task in cfg.tasks.items():
        if task.balance_to is not None:
            rng = np.random.default_rng([cfg.train.seed, zlib.crc32(name.encode())])
            pick = balance_indices(len(texts[name]), len(texts[task.balance_to]), rng)
            texts[name] = [texts[name][i] for i in pick]
            scores[name] = None if scores[name] is None else scores[name][pick]
    size = cfg.train.per_device_train_batch_size
    samplers = {name: NoDuplicatesBatchSampler(texts[name], size, seed=cfg.train.seed, num_replicas=world_size,
                                               rank=rank) for name in texts}
    return texts, scores, held, MultiTaskBatchSampler(samplers, seed=cfg.train.seed)


@pytest.fixture(params=["memory", "prepared"])
def storage(request, tmp_path, monkeypatch):
    """Both places the rows can live: in memory (small files) and prepared into the cache (large files)."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    if request.param == "prepared":
        monkeypatch.setenv("BERTINO_DATA_IN_MEMORY_BYTES", "0")
    return request.param


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_the_arrow_layer_gives_the_rows_batches_and_scores_of_a_list_layer(tmp_path, storage, fmt, world_size):
    """Every batch of two epochs of a two-task config (list negatives with 3, exactly `count` and too few items,
    hold-outs, balance_to, shared texts): the same task, the same rows, the same texts column after column and
    the same scores as the list-based layer — in memory and prepared, on each rank."""
    cfg_dict = two_task_config(tmp_path, fmt)
    cfg = config_from_dict(cfg_dict)
    data = load_run_data(cfg)
    if storage == "prepared":
        assert all(t.table.cache_dir is not None for t in data.tasks.values())
    for rank in range(world_size):
        texts, scores, held, reference = list_layer(cfg_dict, world_size, rank)
        assert {n: d.text_rows() for n, d in data.holdouts.items()} == held
        assert {n: d.text_rows() for n, d in data.tasks.items()} == texts
        ours = batch_schedule(cfg, data.tasks, world_size, rank).stream(0, 0)
        theirs = reference.stream(0, 0)
        steps = 2 * len(reference)
        for (e1, i1, task1, rows1), (e2, i2, task2, rows2) in itertools.islice(zip(ours, theirs), steps):
            assert (e1, i1, task1, rows1) == (e2, i2, task2, rows2)
            batch_texts, batch_scores = data.tasks[task1].batch(rows1)
            assert batch_texts == column_major([texts[task1][r] for r in rows1])
            if scores[task1] is None:
                assert batch_scores is None
            else:
                assert np.array_equal(batch_scores, scores[task1][rows1])


def test_prepared_data_is_reused_by_the_next_run(tmp_path, monkeypatch):
    """A large file is converted once: a second load memory-maps the same files (no conversion, no hashing, no
    checking again); the converted table lives in the datasets cache."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setenv("BERTINO_DATA_IN_MEMORY_BYTES", "0")
    cfg = config_from_dict(two_task_config(tmp_path, "jsonl"))
    first = load_run_data(cfg)
    schedule = list(itertools.islice(batch_schedule(cfg, first.tasks).stream(0, 0), 20))
    folder = first.tasks["retrieval"].table.cache_dir
    assert folder.parent == tmp_path / "hf-datasets" / "bertino"
    files = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert {"table.arrow"} | {n for n in files if n.startswith(("hashes-", "checks-"))} <= set(files)

    def fail(*args, **kwargs):
        raise AssertionError("prepared again")

    for name in ("_prepare", "file_batches"):
        monkeypatch.setattr(readers, name, fail)
    monkeypatch.setattr("bertino.plumbing.text_hashes._fill", fail)
    monkeypatch.setattr("bertino.plumbing.row_checks._check", fail)
    second = load_run_data(cfg)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == files
    assert list(itertools.islice(batch_schedule(cfg, second.tasks).stream(0, 0), 20)) == schedule
    assert data_fingerprint(second.tasks) == data_fingerprint(first.tasks)
    assert isinstance(second.tasks["retrieval"]._source_hashes(), np.memmap)  # hashes memory-mapped, not read in


def test_a_changed_file_is_prepared_again(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setenv("BERTINO_DATA_IN_MEMORY_BYTES", "0")
    cfg = config_from_dict(two_task_config(tmp_path, "jsonl"))
    before = load_run_data(cfg).tasks["retrieval"]
    path = Path(cfg.tasks["retrieval"].dataset)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[1]["query"] = "una domanda nuova"
    write_jsonl(path, rows)
    after = load_run_data(cfg).tasks["retrieval"]
    assert after.table.cache_dir != before.table.cache_dir
    assert "una domanda nuova" in {row[0] for row in after.text_rows()} | {
        row[0] for row in load_run_data(cfg).holdouts["retrieval"].text_rows()}
    assert data_fingerprint({"r": after}) != data_fingerprint({"r": before})


# ──────────────────────────────────────────────────────────────────────────────────────────────── hashes, fingerprint
def test_text_hashes_equal_iff_the_texts_are_equal(tmp_path):
    texts = [("a", "b"), ("b", "a"), ("a", "a"), ("àè", "a "), ("a", "b")]
    data = TaskData.from_rows("t", ("x", "y"), texts)
    ids = data.text_ids()[np.arange(len(texts))]  # (5, 2) uint64
    flat = [t for row in texts for t in row]
    for (i, a), (j, b) in itertools.product(enumerate(flat), repeat=2):
        assert (ids.ravel()[i] == ids.ravel()[j]) == (a == b)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31), st.integers(1, 60), st.integers(1, 3), st.integers(1, 40), st.integers(1, 7))
def test_the_sampler_on_hashes_gives_the_batches_of_the_sampler_on_texts(seed, n, columns, vocab, size):
    """The sampler only compares texts: on their hashes, gathered through a row view, it makes the same batches."""
    rng = np.random.default_rng(seed)
    texts = [tuple(f"testo {v}" for v in rng.integers(0, vocab, columns)) for _ in range(n)]
    data = TaskData.from_rows("t", [f"c{k}" for k in range(columns)], texts)
    order = rng.permutation(n)  # a task's rows are any selection of the source rows
    view = data.select(order)
    on_texts = NoDuplicatesBatchSampler([texts[i] for i in order], size, seed=seed % 7)
    on_hashes = NoDuplicatesBatchSampler(view.text_ids(), size, seed=seed % 7)
    for epoch in (0, 1):
        on_texts.set_epoch(epoch), on_hashes.set_epoch(epoch)
        assert list(on_hashes) == list(on_texts) and on_hashes.remainder == on_texts.remainder


def test_rows_of_is_a_lazy_gather():
    ids = np.arange(20, dtype=np.uint64).reshape(10, 2)
    view = RowsOf(ids, np.array([3, 3, 0]))
    assert len(view) == 3 and view.shape == (3, 2) and view.ndim == 2 and view.dtype == np.uint64
    assert view[np.array([2, 0])].tolist() == [[0, 1], [6, 7]]


def test_fingerprint_reads_hashes_and_an_older_checkpoints_form_still_compares(tmp_path):
    """The fingerprint changes with any text, order or score; a checkpoint that recorded the older {"rows",
    "blake2b"} (of the texts) is compared in that form, computed exactly as before."""
    import hashlib

    texts = [("q1", "p1"), ("q2", "p2"), ("q3", "p3")]
    a = TaskData.from_rows("t", ("q", "p"), texts, scores=[0.1, 0.5, 0.9])
    fp = data_fingerprint({"t": a})["t"]
    assert fp["rows"] == 3 and set(fp) == {"rows", "hashes"}
    for other in (a.select([1, 0, 2]), TaskData.from_rows("t", ("q", "p"), [("q1", "p1"), ("q2", "p2"), ("q3", "p4")],
                                                           scores=[0.1, 0.5, 0.9]),
                  TaskData.from_rows("t", ("q", "p"), texts, scores=[0.1, 0.5, 0.8])):
        assert data_fingerprint({"t": other})["t"] != fp
    old = hashlib.blake2b(digest_size=16)  # the formula of bertino's earlier run_checkpoints.data_fingerprint
    old.update("\x1e".join("\x1f".join(row) for row in texts).encode("utf-8", "surrogatepass") + b"\x1e")
    old.update(np.asarray([0.1, 0.5, 0.9], dtype=np.float32).tobytes())
    saved = {"t": {"rows": 3, "blake2b": old.hexdigest()}}
    assert data_fingerprint({"t": a}, like=saved) == saved


# ──────────────────────────────────────────────────────────────────────────────────────────────── found by breaking
def test_rows_with_exactly_count_negatives_are_kept(tmp_path):
    """count = 2: lists of 2 items train (only shorter ones are dropped), with their two items in order."""
    rows = [{"query": f"q{i}", "positive": f"p{i}", "hard_negatives": [f"n{i}.{j}" for j in range(k)]}
            for i, k in enumerate([2, 1, 3, 2, 0, 2])]
    write_jsonl(tmp_path / "r.jsonl", rows)
    data = load_task(config_from_dict({"model": {"name_or_path": "x"}, "tasks": {"r": {
        "dataset": str(tmp_path / "r.jsonl"), "columns": ["query", "positive"], "loss": "mnrl",
        "negatives": {"column": "hard_negatives", "count": 2}}}}).tasks["r"], "r")
    assert data.text_rows() == [(f"q{i}", f"p{i}", f"n{i}.0", f"n{i}.1") for i in (0, 2, 3, 5)]
    assert data.dropped_rows == 2


def test_the_holdout_is_the_same_on_every_rank_and_differs_by_task_name(tmp_path, monkeypatch):
    """The hold-out is drawn from (train.seed, the task name) only: a torchrun rank (RANK, LOCAL_RANK, ...) does not
    change it, two tasks with the same rows do not hold out the same positions, and the seed does change it."""
    rows = [{"query": f"q{i}", "positive": f"p{i}"} for i in range(200)]
    write_jsonl(tmp_path / "r.jsonl", rows)

    def held(seed=5, **env):
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        task = {"dataset": str(tmp_path / "r.jsonl"), "columns": ["query", "positive"], "loss": "mnrl",
                "holdout": 0.1}
        cfg = config_from_dict({"model": {"name_or_path": "x"}, "tasks": {"uno": task, "due": task},
                                "train": {"seed": seed}})
        return {name: sorted(d.row_ids.tolist()) for name, d in load_run_data(cfg).holdouts.items()}

    rank0 = held(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2")
    assert held(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", GROUP_RANK="1") == rank0 == held()
    assert len(rank0["uno"]) == 20 and rank0["uno"] != rank0["due"]
    assert held(seed=6) != rank0


def test_two_processes_preparing_the_same_file_share_one_prepared_table(tmp_path):
    """The ranks of a torchrun job start together: both prepare the same large file at once — one converts (a lock),
    the other waits and opens it; both read the same rows."""
    import subprocess
    import sys

    from helpers import ROOT

    config = tmp_path / "c.json"
    config.write_text(json.dumps(two_task_config(tmp_path, "jsonl")))
    code = ("import json, sys\n"
            "from bertino.plumbing.config import load_config\n"
            "from bertino.plumbing.data import load_run_data\n"
            "from bertino.plumbing.run_checkpoints import data_fingerprint\n"
            "print(json.dumps(data_fingerprint(load_run_data(load_config(sys.argv[1])).tasks)))\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_CACHE": str(tmp_path / "hf"),
           "BERTINO_DATA_IN_MEMORY_BYTES": "0"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(config)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert outputs[0][0] == outputs[1][0] and "hashes" in outputs[0][0]
    tables = sorted((tmp_path / "hf" / "bertino").rglob("table.arrow"))
    assert len(tables) == 2  # one per task file, not one per process
    assert not list((tmp_path / "hf" / "bertino").glob(".tmp-*"))


def test_buffer_readers_respect_slices_and_nulls():
    """The helpers that read Arrow buffers directly (hashes, list items, numpy views) on sliced arrays with nulls
    give what the values themselves give."""
    import xxhash

    from bertino.plumbing.arrow_arrays import list_item, to_numpy
    from bertino.plumbing.text_hashes import hash_strings

    texts = pa.array(["alfa", None, "beta", "", "gamma è", "delta"], type=pa.string())
    for array in (texts, texts.slice(1, 4), texts.cast(pa.large_string()).slice(2)):
        expected = [0 if t is None else xxhash.xxh3_64_intdigest(t.encode()) for t in array.to_pylist()]
        assert hash_strings(array).tolist() == expected
    lists = pa.array([["a", "b"], None, ["c"], [], ["d", "e", "f"]], type=pa.list_(pa.string()))
    for array in (lists, lists.slice(1), lists.slice(2, 3)):
        for j in (0, 1, 2):
            assert list_item(array, j).to_pylist() == [v[j] if v is not None and len(v) > j else None
                                                       for v in array.to_pylist()]
    flags = pa.array([True, None, False, True, None, True, False, False, True, True])
    for array in (flags, flags.slice(3), flags.slice(1, 7)):
        assert to_numpy(array, fill=False).tolist() == [bool(v) for v in array.to_pylist()]
    numbers = pa.array([1.5, None, -2.0, 4.0])
    got = to_numpy(numbers.slice(1), fill=np.nan)
    assert np.isnan(got[0]) and got[1:].tolist() == [-2.0, 4.0]


def test_cached_check_results_follow_the_settings(tmp_path, monkeypatch):
    """The checks' outcome is cached beside a prepared table, per setting: after a run that dropped the bad rows, a
    run with bad_rows "error" still stops, and another negatives count gives other rows."""
    from bertino.errors import DataError

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setenv("BERTINO_DATA_IN_MEMORY_BYTES", "0")
    rows = listed_rows(30)
    rows[4]["query"] = ""
    write_jsonl(tmp_path / "r.jsonl", rows)

    def task(**kw):
        t = {"dataset": str(tmp_path / "r.jsonl"), "columns": ["query", "positive"], "loss": "mnrl",
             "negatives": {"column": "hard_negatives", "count": 2}, **kw}
        return config_from_dict({"model": {"name_or_path": "x"}, "tasks": {"r": t}}).tasks["r"]

    dropped = load_task(task(bad_rows="drop"), "r")
    assert sum(dropped.bad_rows.values()) == 1
    with pytest.raises(DataError, match="bad_rows"):
        load_task(task(), "r")
    one = load_task(task(bad_rows="drop", negatives={"column": "hard_negatives", "count": 1}), "r")
    assert len(one) > len(dropped) and one.dropped_rows < dropped.dropped_rows
    assert len(list((tmp_path / "hf-datasets").rglob("checks-*.npz"))) == 2
