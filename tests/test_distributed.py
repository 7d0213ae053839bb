"""Ranks that disagree or get lost: ranks that read different data stop at once, a lost rank ends the job after
`train.ddp_timeout` (and a SIGTERM while waiting stops it), and two torchrun agents as two nodes train as one process
at the global batch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import make_distilbert
from helpers import (ROOT, rel_update_diff, run_train, torchrun_with_fault, train_config, weights, write_config)


@pytest.mark.parametrize("fault,what", [("fewer-rows", "24 rows on rank 0, 22 on rank 1"),
                                        ("other-rows", "the same 24 rows count, other content")])
def test_ranks_that_read_different_data_stop_at_once(tiny_model_dir, tmp_path, fault, what):
    cfg = train_config(tmp_path, tiny_model_dir, per_device_train_batch_size=3)
    start = time.monotonic()
    proc = torchrun_with_fault(write_config(tmp_path, cfg), fault, tmp_path)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode != 0 and time.monotonic() - start < 120
    lines = [line for line in err.splitlines() if "the ranks read different training data" in line]
    assert len(lines) == 2 and all(what in line for line in lines), err[-3000:]  # one line on every rank
    assert not (tmp_path / "run").exists()  # nothing written


def test_a_lost_rank_ends_the_job_after_ddp_timeout(tiny_model_dir, tmp_path):
    # 20 s, not less: on a loaded machine the two ranks' start-up (imports, model, data) can differ by several
    # seconds, and a shorter timeout would trip in an earlier collective than the hung one
    cfg = train_config(tmp_path, tiny_model_dir, per_device_train_batch_size=3, ddp_timeout=20)
    start = time.monotonic()
    proc = torchrun_with_fault(write_config(tmp_path, cfg), "hang-logging", tmp_path)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode != 0 and time.monotonic() - start < 120, err[-3000:]
    assert "waited 20 s for the other ranks (averaging the logged losses, train.ddp_timeout=20)" in err, err[-3000:]


def test_sigterm_while_waiting_for_a_lost_rank_stops_it(tiny_model_dir, tmp_path):
    cfg = train_config(tmp_path, tiny_model_dir, per_device_train_batch_size=3, ddp_timeout=600)
    proc = torchrun_with_fault(write_config(tmp_path, cfg), "hang-logging", tmp_path)
    deadline = time.monotonic() + 120
    while not (tmp_path / "hung-1").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    time.sleep(1.0)  # rank 0 is now waiting for rank 1 in a collective
    os.kill(int((tmp_path / "pid-0").read_text()), signal.SIGTERM)
    start = time.monotonic()
    _, err = proc.communicate(timeout=120)
    assert time.monotonic() - start < 60, err[-3000:]  # not the 600 s timeout
    assert "got signal 15 while waiting for the other ranks (averaging the logged losses)" in err


@pytest.mark.slow
def test_two_torchrun_agents_as_two_nodes_equal_one_process(tmp_path):
    nodrop = make_distilbert(tmp_path / "nodrop", dropout=0.0, seed=3)
    w0 = weights(nodrop)
    base = train_config(tmp_path, nodrop, gather_across_devices=True, mini_batch_size=2)
    one = dict(base, train={**base["train"], "per_device_train_batch_size": 6, "output_dir": str(tmp_path / "one")})
    run_train(write_config(tmp_path, one, "one.json"))
    two = dict(base, train={**base["train"], "per_device_train_batch_size": 3, "output_dir": str(tmp_path / "two")})
    config = write_config(tmp_path, two, "two.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    port = 29400 + os.getpid() % 500
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=bertino-test",
                               "train.py", "--config", str(config)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [node.communicate(timeout=300) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(err[-2000:] for _, err in results)
    diff = rel_update_diff(w0, weights(tmp_path / "two" / "final"), weights(tmp_path / "one" / "final"))
    assert diff <= 1e-3, diff
