"""Run train.py with one fault injected, for the tests that must see how a run behaves when something goes wrong.

    BERTINO_FAULT=NAME python tests/fault_injection.py --config ... [overrides]     (or under torchrun)

NAME (the fault happens on rank 1 where it names a rank, else on the one process):
    fewer-rows        rank 1 reads two rows fewer of every task (a node with a stale copy of the data)
    other-rows        rank 1 reads the same number of rows, one of them changed
    hang-logging      rank 1 stops for good before its first logging collective (a stuck or lost rank); it
                      writes `hung-1` into BERTINO_FAULT_DIR first, and every rank writes `pid-RANK`
    sigterm-after-final   the process sends itself SIGTERM right after final/ is written
Not a test module (pytest collects test_*.py only).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from bertino.plumbing import data  # noqa: E402

FAULT = os.environ.get("BERTINO_FAULT", "")
RANK = int(os.environ.get("RANK", "0"))
OUT = Path(os.environ.get("BERTINO_FAULT_DIR", "."))

if FAULT in ("fewer-rows", "other-rows") and RANK == 1:
    load_run_data = data.load_run_data

    def stale_copy(cfg, **kwargs):
        loaded = load_run_data(cfg, **kwargs)
        for name, task in loaded.tasks.items():
            if FAULT == "fewer-rows":
                loaded.tasks[name] = task.select(list(range(len(task) - 2)))
            else:  # row 0 is replaced by a copy of row 1: the same count, other content
                loaded.tasks[name] = task.select([1, *range(1, len(task))])
        return loaded

    train.load_run_data = stale_copy

if FAULT == "hang-logging":
    (OUT / f"pid-{RANK}").write_text(str(os.getpid()))
    if RANK == 1:
        def hang(*args, **kwargs):
            (OUT / "hung-1").write_text("")
            # torchrun's SIGTERM, once rank 0 has given up, ends this stuck rank at once (bertino's own handler
            # would wait for a step end that never comes, and torchrun 30 s more before its SIGKILL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            time.sleep(3600)

        train.log_progress = hang

if FAULT == "sigterm-after-final":
    save_model = train.save_model

    def then_sigterm(run, folder, results):
        save_model(run, folder, results)
        if folder.name == "final":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)  # the handler runs here

    train.save_model = then_sigterm

if __name__ == "__main__":
    train.cli()
