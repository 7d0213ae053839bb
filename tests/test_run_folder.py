"""The run folder is the user's: a run never writes into another run's folder or its base model's, a full disk is one
error line and leaves the checkpoints intact, a damaged checkpoint is found and passed over, signals after the last
step end the run normally, and a resume's first logging line averages the same steps as the uninterrupted run's."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys

import pytest
import torch
from helpers import (ROOT, fault_env, folder_snapshot, read_metrics, train_config, train_error_line, weights,
                     write_config)

sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from bertino.plumbing.run_folder import list_checkpoints  # noqa: E402


def test_a_resume_never_writes_into_an_unrelated_run(tiny_model_dir, tmp_path, capsys):
    mine = train_config(tmp_path, tiny_model_dir, save_steps=2, output_dir=str(tmp_path / "mine"))
    train.main(["--config", str(write_config(tmp_path, mine, "mine.json"))])
    other = train_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "other"), learning_rate=5e-4)
    train.main(["--config", str(write_config(tmp_path, other, "other.json"))])
    before = folder_snapshot(tmp_path / "other")
    config = write_config(tmp_path, mine, "resume.json")
    line = train_error_line(capsys, config, f"train.output_dir={tmp_path / 'other'}",
                     f"train.resume_from_checkpoint={tmp_path / 'mine' / 'checkpoint-2'}")
    assert f"{tmp_path / 'other'} holds another run" in line
    assert folder_snapshot(tmp_path / "other") == before  # nothing replaced, nothing spliced
    # allowed: an empty folder, then that same folder again (a second resume of the same run)
    (tmp_path / "fresh").mkdir()
    for _ in range(2):
        shutil.rmtree(tmp_path / "fresh" / "final", ignore_errors=True)
        train.main(["--config", str(config), f"train.output_dir={tmp_path / 'fresh'}",
                    f"train.resume_from_checkpoint={tmp_path / 'mine' / 'checkpoint-2'}"])
    assert (tmp_path / "fresh" / "final").is_dir()


@pytest.mark.parametrize("inside", [False, True])
def test_output_dir_in_the_base_model_s_folder_is_refused(tiny_model_dir, tmp_path, capsys, inside):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    before = folder_snapshot(folder)
    out = folder / "run" if inside else folder
    line = train_error_line(capsys, write_config(tmp_path, train_config(tmp_path, folder, output_dir=str(out))))
    assert "the folder of the model the run starts from" in line
    assert folder_snapshot(folder) == before


def test_an_output_dir_under_a_file_is_named_as_such(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    line = train_error_line(capsys, write_config(tmp_path, train_config(tmp_path, tiny_model_dir,
                                                                 output_dir=str(tmp_path / "afile" / "run"))))
    assert f"{tmp_path / 'afile'} is a file, not a folder" in line


def test_a_full_disk_is_one_error_line_and_exit_2(tiny_model_dir, tmp_path):
    import resource

    def file_size_limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))

    cfg = train_config(tmp_path, tiny_model_dir, save_steps=2)
    proc = subprocess.run([sys.executable, "train.py", "--config", str(write_config(tmp_path, cfg))], cwd=ROOT,
                          env=fault_env("", tmp_path), capture_output=True, text=True, timeout=300,
                          preexec_fn=file_size_limit)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    line = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(line) == 1 and f"cannot write {tmp_path / 'run' / 'checkpoint-2'}" in line[0]
    assert "the disk is full or a file size limit was hit" in line[0]
    assert not list_checkpoints(tmp_path / "run") and not list((tmp_path / "run").glob(".tmp-*"))


def test_a_damaged_checkpoint_is_detected_and_passed_over(tiny_model_dir, tmp_path, capsys):
    cfg = train_config(tmp_path, tiny_model_dir, max_steps=6, save_steps=2)
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
    line = train_error_line(capsys, config, f"train.resume_from_checkpoint={run / 'checkpoint-4'}")
    assert "checkpoint-4 is damaged (model.safetensors: changed since it was written" in line
    assert f"resume from {run / 'checkpoint-2'} instead" in line
    # true: the latest sound one, with a notice; the run still ends exactly where the uninterrupted one did
    train.main(["--config", str(config), "train.resume_from_checkpoint=true"])
    err = capsys.readouterr().err
    assert "checkpoint-4 is damaged" in err and f"resuming from {run / 'checkpoint-2'}" in err
    assert all(torch.equal(a, b) for a, b in zip(weights(run / "final").values(), reference.values()))


def test_a_sigterm_after_final_is_written_ends_the_run_normally(tiny_model_dir, tmp_path):
    proc = subprocess.run([sys.executable, "tests/fault_injection.py", "--config",
                           str(write_config(tmp_path, train_config(tmp_path, tiny_model_dir)))],
                          cwd=ROOT, env=fault_env("sigterm-after-final", tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SIGTERM came after the last step; the run is complete" in proc.stderr
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_after_a_resume_from_an_odd_step_the_next_line_averages_the_same_steps(tiny_model_dir, tmp_path):
    cfg = train_config(tmp_path, tiny_model_dir, max_steps=6, save_steps=3, logging_steps=2)
    config = write_config(tmp_path, cfg)
    train.main(["--config", str(config)])
    train.main(["--config", str(config), f"train.output_dir={tmp_path / 'resumed'}",
                f"train.resume_from_checkpoint={tmp_path / 'run' / 'checkpoint-3'}"])
    lines = {r["step"]: r for r in read_metrics(tmp_path / "run") if "lr" in r}
    resumed = {r["step"]: r for r in read_metrics(tmp_path / "resumed") if "lr" in r}
    assert sorted(resumed) == [4, 6]  # a new folder: the lines after the checkpoint
    for step in (4, 6):  # step 4's line averages steps 3 and 4, as in the uninterrupted run
        assert resumed[step]["loss/retrieval"] == lines[step]["loss/retrieval"]
