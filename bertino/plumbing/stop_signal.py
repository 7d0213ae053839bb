"""SIGTERM / SIGINT (a pre-emption notice, Ctrl-C): finish the current step, write a checkpoint, then exit.

`StopSignal` sets a flag that the training loop reads after each step (where every rank agrees on it: a rank that
stopped alone would leave the others waiting in a collective). If the other ranks never come (one is lost), a rank
waiting for them in a collective stops a few seconds after the signal (distributed.py). A second signal acts as it
normally would.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from .. import distributed


class StopSignal:
    """`with StopSignal() as stop:` ... `stop.signum` is the signal received, or None."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        distributed.signal_received(signum)  # a rank waiting for lost ranks gives up instead of hanging
        if os.environ.get("RANK", "0") == "0":
            print(f"\nbertino: {signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                  f"(send it again to stop at once)", file=sys.stderr)
        for sig, handler in self._previous.items():  # the next one interrupts at once
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
