"""What a red-team of user-side cases found (issue "found by breaking it on purpose"), each with the test that
failed before the fix: a tokenizer that is not there, runs that overwrite what is not theirs, ranks that see other
data or get lost, a full disk, a damaged checkpoint, bad eval rows, a CoSENT task that cannot learn, CSV digits,
byte-order marks, remote code in a tokenizer config, signals after the end, the log window across a resume, and
multi-node training on one machine.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_distilbert
from helpers import (ROOT, read_metrics, rel_update_diff, retrieval_rows, run_train, sts_rows, train_config,
                     weights, write_config, write_jsonl)

sys.path.insert(0, str(ROOT))
import train  # noqa: E402

from bertino import SentenceEncoder  # noqa: E402
from bertino.errors import CheckpointError, DataError  # noqa: E402
from bertino.plumbing.config import load_config  # noqa: E402
from bertino.plumbing.data import load_tasks  # noqa: E402
from bertino.plumbing.eval_data import load_ir_file  # noqa: E402
from bertino.plumbing.run_folder import list_checkpoints  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_distilbert(tmp_path_factory.mktemp("breaking_model"), dropout=0.1, seed=21)


def cli_error(capsys, config: Path, *overrides: str) -> str:
    with pytest.raises(SystemExit) as info:
        train.cli(["--config", str(config), *overrides])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}


def fault_env(fault: str, folder: Path, **extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT),
            "BERTINO_FAULT": fault, "BERTINO_FAULT_DIR": str(folder), **extra}


def torchrun(config: Path, fault: str, folder: Path, *overrides: str, nproc: int = 2) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={nproc}", "tests/fault_injection.py", "--config", str(config),
                             *overrides], cwd=ROOT, env=fault_env(fault, folder), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


# ──────────────────────────────────────────────────────────────────────── 6. a model folder without tokenizer files
def test_6_a_model_folder_without_tokenizer_files_is_refused(model_dir, tmp_path, capsys):
    folder = tmp_path / "no-tokenizer"
    shutil.copytree(model_dir, folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match=f"{folder}: the tokenizer has 5 tokens but the embedding matrix has "
                                              r"\d+ rows: its tokenizer files are missing"):
        SentenceEncoder.from_pretrained(folder)
    line = cli_error(capsys, write_config(tmp_path, train_config(tmp_path, folder)))
    assert str(folder) in line and "tokenizer files are missing" in line


# ──────────────────────────────────────────────────────────────────────── 7. resuming into another run's folder
def test_7_a_resume_never_writes_into_an_unrelated_run(model_dir, tmp_path, capsys):
    mine = train_config(tmp_path, model_dir, save_steps=2, output_dir=str(tmp_path / "mine"))
    train.main(["--config", str(write_config(tmp_path, mine, "mine.json"))])
    other = train_config(tmp_path, model_dir, output_dir=str(tmp_path / "other"), learning_rate=5e-4)
    train.main(["--config", str(write_config(tmp_path, other, "other.json"))])
    before = snapshot(tmp_path / "other")
    config = write_config(tmp_path, mine, "resume.json")
    line = cli_error(capsys, config, f"train.output_dir={tmp_path / 'other'}",
                     f"train.resume_from_checkpoint={tmp_path / 'mine' / 'checkpoint-2'}")
    assert f"{tmp_path / 'other'} holds another run" in line
    assert snapshot(tmp_path / "other") == before  # nothing replaced, nothing spliced
    # allowed: an empty folder, then that same folder again (a second resume of the same run)
    (tmp_path / "fresh").mkdir()
    for _ in range(2):
        shutil.rmtree(tmp_path / "fresh" / "final", ignore_errors=True)
        train.main(["--config", str(config), f"train.output_dir={tmp_path / 'fresh'}",
                    f"train.resume_from_checkpoint={tmp_path / 'mine' / 'checkpoint-2'}"])
    assert (tmp_path / "fresh" / "final").is_dir()


# ──────────────────────────────────────────────────────────────────────── 8. output_dir = the base model's folder
@pytest.mark.parametrize("inside", [False, True])
def test_8_output_dir_in_the_base_model_s_folder_is_refused(model_dir, tmp_path, capsys, inside):
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    before = snapshot(folder)
    out = folder / "run" if inside else folder
    line = cli_error(capsys, write_config(tmp_path, train_config(tmp_path, folder, output_dir=str(out))))
    assert "the folder of the model the run starts from" in line
    assert snapshot(folder) == before


# ──────────────────────────────────────────────────────────────────────── 9. ranks that see other data, lost ranks
@pytest.mark.parametrize("fault,what", [("fewer-rows", "24 rows on rank 0, 22 on rank 1"),
                                        ("other-rows", "the same 24 rows count, other content")])
def test_9_ranks_that_read_different_data_stop_at_once(model_dir, tmp_path, fault, what):
    cfg = train_config(tmp_path, model_dir, per_device_train_batch_size=3)
    start = time.monotonic()
    proc = torchrun(write_config(tmp_path, cfg), fault, tmp_path)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode != 0 and time.monotonic() - start < 120
    lines = [line for line in err.splitlines() if "the ranks read different training data" in line]
    assert len(lines) == 2 and all(what in line for line in lines), err[-3000:]  # one line on every rank
    assert not (tmp_path / "run").exists()  # nothing written


def test_9_a_lost_rank_ends_the_job_after_ddp_timeout(model_dir, tmp_path):
    # 20 s, not less: on a loaded machine the two ranks' start-up (imports, model, data) can differ by several
    # seconds, and a shorter timeout would trip in an earlier collective than the hung one
    cfg = train_config(tmp_path, model_dir, per_device_train_batch_size=3, ddp_timeout=20)
    start = time.monotonic()
    proc = torchrun(write_config(tmp_path, cfg), "hang-logging", tmp_path)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode != 0 and time.monotonic() - start < 120, err[-3000:]
    assert "waited 20 s for the other ranks (averaging the logged losses, train.ddp_timeout=20)" in err, err[-3000:]


def test_9_sigterm_while_waiting_for_a_lost_rank_stops_it(model_dir, tmp_path):
    cfg = train_config(tmp_path, model_dir, per_device_train_batch_size=3, ddp_timeout=600)
    proc = torchrun(write_config(tmp_path, cfg), "hang-logging", tmp_path)
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


# ──────────────────────────────────────────────────────────────────────── 10. a full disk
def test_10_a_full_disk_is_one_error_line_and_exit_2(model_dir, tmp_path):
    import resource

    def file_size_limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))

    cfg = train_config(tmp_path, model_dir, save_steps=2)
    proc = subprocess.run([sys.executable, "train.py", "--config", str(write_config(tmp_path, cfg))], cwd=ROOT,
                          env=fault_env("", tmp_path), capture_output=True, text=True, timeout=300,
                          preexec_fn=file_size_limit)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    line = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(line) == 1 and f"cannot write {tmp_path / 'run' / 'checkpoint-2'}" in line[0]
    assert "the disk is full or a file size limit was hit" in line[0]
    assert not list_checkpoints(tmp_path / "run") and not list((tmp_path / "run").glob(".tmp-*"))


# ──────────────────────────────────────────────────────────────────────── 11. a damaged checkpoint
def test_11_a_damaged_checkpoint_is_detected_and_passed_over(model_dir, tmp_path, capsys):
    cfg = train_config(tmp_path, model_dir, max_steps=6, save_steps=2)
    config = write_config(tmp_path, cfg)
    train.main(["--config", str(config)])
    run = tmp_path / "run"
    reference = weights(run / "final")
    shutil.rmtree(run / "final")
    damaged = run / "checkpoint-4" / "model.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-7] ^= 0x10  # one bit of one weight: the same size, a valid file
    damaged.write_bytes(bytes(data))
    # an explicit path: an error that says which checkpoint to pass instead
    line = cli_error(capsys, config, f"train.resume_from_checkpoint={run / 'checkpoint-4'}")
    assert "checkpoint-4 is damaged (model.safetensors: changed since it was written" in line
    assert f"resume from {run / 'checkpoint-2'} instead" in line
    # true: the latest sound one, with a notice; the run still ends exactly where the uninterrupted one did
    train.main(["--config", str(config), "train.resume_from_checkpoint=true"])
    err = capsys.readouterr().err
    assert "checkpoint-4 is damaged" in err and f"resuming from {run / 'checkpoint-2'}" in err
    assert all(torch.equal(a, b) for a, b in zip(weights(run / "final").values(), reference.values()))


# ──────────────────────────────────────────────────────────────────────── 12. empty texts in eval files
@pytest.mark.parametrize("row", [{"query": "  ", "positive": "p"}, {"query": "q", "positive": ""},
                                 {"query": "q", "positive": ["p", " "]}])
def test_12_eval_files_refuse_empty_texts_with_file_and_line(tmp_path, row):
    path = write_jsonl(tmp_path / "dev.jsonl", [{"query": "a", "positive": "b"}, row])
    with pytest.raises(DataError, match=f"{path}:2: key .(query|positive). must be a non-empty"):
        load_ir_file(path)


# ──────────────────────────────────────────────────────────────────────── 13. a CoSENT task that cannot learn
def test_13_cosent_with_all_gold_scores_equal_is_an_error(model_dir, tmp_path, capsys):
    rows = [{**r, "score": 3.0} for r in sts_rows(12)]
    cfg = train_config(tmp_path, model_dir)
    cfg["tasks"] = {"sts": {"dataset": str(write_jsonl(tmp_path / "flat.jsonl", rows)),
                            "columns": ["sentence1", "sentence2", "score"], "loss": "cosent"}}
    line = cli_error(capsys, write_config(tmp_path, cfg))
    assert "every gold score in column 'score' is 3.0; 'cosent' learns only from pairs whose scores differ" in line
    assert not (tmp_path / "run").exists()


# ──────────────────────────────────────────────────────────────────────── 14. CSV digits are text
def test_14_a_csv_text_column_of_digits_is_read_as_text(model_dir, tmp_path):
    """Queries "0100", "0101", ...: read as the strings they are (a number would lose the leading zero), and
    trained on as such."""
    rows = retrieval_rows(24)
    lines = ["query,positive,negative_1,negative_2"] + [f"0{100 + i},{r['positive']},{r['negative_1']},"
                                                        f"{r['negative_2']}" for i, r in enumerate(rows)]
    (tmp_path / "digits.csv").write_text("\n".join(lines) + "\n")
    cfg = train_config(tmp_path, model_dir)
    cfg["tasks"]["retrieval"]["dataset"] = str(tmp_path / "digits.csv")
    config = write_config(tmp_path, cfg)
    data = load_tasks(load_config(config))["retrieval"]
    assert [data.texts[i][0] for i in range(len(data))] == [f"0{100 + i}" for i in range(24)]
    train.main(["--config", str(config)])
    steps = [r for r in read_metrics(tmp_path / "run") if "loss/retrieval" in r]
    assert len(steps) == 3 and all(math.isfinite(r["loss/retrieval"]) for r in steps)


# ──────────────────────────────────────────────────────────────────────── 15. byte-order marks
def test_15_a_utf8_bom_is_accepted_in_eval_files_and_configs(model_dir, tmp_path):
    path = tmp_path / "dev.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"query": "q", "positive": "p"}\n{"query": "r", "positive": "s"}\n')
    assert load_ir_file(path).queries == ["q", "r"]
    config = tmp_path / "bom.json"
    config.write_bytes(b"\xef\xbb\xbf" + json.dumps(train_config(tmp_path, model_dir)).encode())
    assert load_config(config).train.max_steps == 3


# ──────────────────────────────────────────────────────────────────────── 16. remote code in a tokenizer config
def test_16_an_auto_map_is_not_copied_into_the_saved_model(model_dir, tmp_path):
    folder = tmp_path / "remote"
    shutil.copytree(model_dir, folder)
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**tok, "auto_map": {
        "AutoTokenizer": ["evil.EvilTokenizer", None]}}))
    train.main(["--config", str(write_config(tmp_path, train_config(tmp_path, folder)))])
    saved = json.loads((tmp_path / "run" / "final" / "tokenizer_config.json").read_text())
    assert "auto_map" not in saved and saved.get("do_lower_case") == tok.get("do_lower_case")


# ──────────────────────────────────────────────────────────────────────── minor items
def test_a_sigterm_after_final_is_written_ends_the_run_normally(model_dir, tmp_path):
    proc = subprocess.run([sys.executable, "tests/fault_injection.py", "--config",
                           str(write_config(tmp_path, train_config(tmp_path, model_dir)))],
                          cwd=ROOT, env=fault_env("sigterm-after-final", tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SIGTERM came after the last step; the run is complete" in proc.stderr
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_after_a_resume_from_an_odd_step_the_next_line_averages_the_same_steps(model_dir, tmp_path):
    cfg = train_config(tmp_path, model_dir, max_steps=6, save_steps=3, logging_steps=2)
    config = write_config(tmp_path, cfg)
    train.main(["--config", str(config)])
    train.main(["--config", str(config), f"train.output_dir={tmp_path / 'resumed'}",
                f"train.resume_from_checkpoint={tmp_path / 'run' / 'checkpoint-3'}"])
    lines = {r["step"]: r for r in read_metrics(tmp_path / "run") if "lr" in r}
    resumed = {r["step"]: r for r in read_metrics(tmp_path / "resumed") if "lr" in r}
    assert sorted(resumed) == [4, 6]  # a new folder: the lines after the checkpoint
    for step in (4, 6):  # step 4's line averages steps 3 and 4, as in the uninterrupted run
        assert resumed[step]["loss/retrieval"] == lines[step]["loss/retrieval"]


def test_an_output_dir_under_a_file_is_named_as_such(model_dir, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    line = cli_error(capsys, write_config(tmp_path, train_config(tmp_path, model_dir,
                                                                 output_dir=str(tmp_path / "afile" / "run"))))
    assert f"{tmp_path / 'afile'} is a file, not a folder" in line


# ──────────────────────────────────────────────────────────────────────── 17. two nodes on one machine
@pytest.mark.slow
def test_17_two_torchrun_agents_as_two_nodes_equal_one_process(tmp_path):
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
