"""Tapes: what GradCache's pass 1 records so that pass 3 replays it instead of computing it again.

Pass 3 re-runs a mini-batch's forward only to rebuild the autograd graph that pass 1 threw away; whatever that
forward would compute again to the same bits can be recorded in pass 1 and replayed. Two kinds are recorded:

- linear-layer outputs (linear_tape.py, `speedups.linear_tape`): no matrix multiplication recomputed;
- dropout masks (cpu_dropout.py, `speedups.keep_dropout_masks`): no random bits drawn again.

A `Tape` holds one mini-batch's recorded tensors in call order. A `TapeDeck` is shared by the modules that record
and replay (one kind, one encoder): pass 1 records each recomputed mini-batch's forward into a fresh tape
(`deck.recording(tape)`), pass 3 replays it (`deck.replaying(tape)`). Both passes run the same forward on the same
texts, so the modules are called in the same order and the i-th call takes the i-th recorded tensor. With no tape on
the deck, the modules compute as usual.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class Tape:
    """The recorded tensors of one mini-batch's forward, in call order."""

    def __init__(self):
        self.outputs: list[torch.Tensor] = []

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.outputs)


class TapeDeck:
    """What the recording modules share: the tape being recorded or replayed, if any. `what` names the kind in
    errors ("linear tape", "dropout-mask tape")."""

    def __init__(self, what: str):
        self.what = what
        self.tape: Tape | None = None
        self.replay_at: int | None = None  # None while recording

    @property
    def recording_now(self) -> bool:
        return self.tape is not None and self.replay_at is None

    @property
    def replaying_now(self) -> bool:
        return self.tape is not None and self.replay_at is not None

    @contextlib.contextmanager
    def recording(self, tape: Tape) -> Iterator[Tape]:
        """Pass 1: the modules compute as usual and append their (detached) results to `tape`."""
        self.tape, self.replay_at = tape, None
        try:
            yield tape
        finally:
            self.tape = None

    @contextlib.contextmanager
    def replaying(self, tape: Tape) -> Iterator[Tape]:
        """Pass 3: the modules take the results of `tape`, in the same order; the tape is then emptied."""
        self.tape, self.replay_at = tape, 0
        try:
            yield tape
            if self.replay_at != len(tape.outputs):
                raise RuntimeError(f"{self.what}: {len(tape.outputs)} outputs recorded but {self.replay_at} "
                                   f"replayed; pass 3 must run the same forward as pass 1")
        finally:
            self.tape, self.replay_at = None, None
            tape.outputs = []  # free the recorded tensors

    def record(self, t: torch.Tensor) -> None:
        self.tape.outputs.append(t.detach())

    def next_output(self, name: str) -> torch.Tensor:
        """Pass 3: the next recorded tensor (`name`: the module asking, for the error)."""
        tape = self.tape
        if self.replay_at >= len(tape.outputs):
            raise RuntimeError(f"{self.what}: {name} asked for output {self.replay_at + 1} of "
                               f"{len(tape.outputs)} recorded; pass 3 must run the same forward as pass 1")
        self.replay_at += 1
        return tape.outputs[self.replay_at - 1]
