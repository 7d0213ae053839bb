"""The largest GradCache mini-batch that fits: chosen once, at start, from a memory budget on the GPU.

Shapes: C texts per mini-batch, L_max the encoder's max_seq_length, T_max the most texts one batch of the run holds.

On a CPU small mini-batches cost little (docs/gradcache.md §6); on a GPU the step is launch-bound and fewer, larger
mini-batches are faster, as long as memory holds them. `speedups.auto_mini_batch_gib: G` measures it at
start: the peak memory of one forward + backward of C texts of L_max tokens (the largest mini-batch a step can
have) under the run's precision and dropout masks, above what was allocated before (`cuda_probe`). C doubles from
`train.mini_batch_size` while the peak stays within G GiB — and halves while it does not — never beyond T_max
(`choose_mini_batch_size`). The chosen C replaces the Step's `mini_batch_size`; with a token budget, C · L_max
replaces `speedups.mini_batch_tokens`. Under DDP every rank measures and all take the smallest.

GradCache's gradient does not depend on C (docs/gradcache.md §1): this changes the time and the memory of a step,
not its result (tests/test_memory_fit.py, with a fake probe on the CPU; scripts/cuda_checks.py measures the real
one). The probe runs inside `torch.random.fork_rng`, so the run's random streams are as without it.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Callable

import torch

from ..keyed_dropout import text_keys
from .fast_grad_cache import with_settings

Probe = Callable[[int], float | None]  # C → peak bytes of one (C, L_max) forward + backward, None if out of memory


def choose_mini_batch_size(probe: Probe, start: int, cap: int, budget: float) -> tuple[int, dict[int, float | None]]:
    """The largest C ≤ `cap` reachable from `start` by doubling (or, if `start` does not fit, halving) whose
    probe is ≤ `budget` bytes → (C, every probe's result). Memory grows with C, so the search stops at the first
    C that does not fit."""
    measured: dict[int, float | None] = {}

    def fits(c: int) -> bool:
        if c not in measured:
            measured[c] = probe(c)
        return measured[c] is not None and measured[c] <= budget

    c = max(1, min(start, cap))
    if fits(c):
        while c < cap and fits(min(2 * c, cap)):
            c = min(2 * c, cap)
        return c, measured
    while c > 1:
        c //= 2
        if fits(c):
            return c, measured
    raise RuntimeError(f"not even one text of the longest length fits in {budget / 2**30:.2f} GiB "
                       f"(measured {measured}); raise speedups.auto_mini_batch_gib")


def cuda_probe(step) -> Probe:
    """The peak CUDA memory of one training forward + backward of C texts of max_seq_length tokens (a `Step`'s
    encoder, autocast and dropout masks), above what was allocated before."""
    encoder, device, L = step.encoder, step.device, step.encoder.max_seq_length

    def probe(C: int) -> float | None:
        ids = (torch.arange(C * L, device=device) % encoder.model.config.vocab_size).view(C, L)  # (C, L)
        features = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if step.dropout_keys is not None:
            features["dropout_keys"] = text_keys(0, 0, torch.arange(C)).to(device)  # (C,)
        encoder.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = None
        try:
            with step.autocast():
                out = encoder(features)  # (C, D)
            out.float().sum().backward()
            torch.cuda.synchronize(device)
            return float(torch.cuda.max_memory_allocated(device) - base)
        except torch.OutOfMemoryError:
            return None
        finally:
            out = None
            encoder.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    return probe


def fit_mini_batch(step, gib: float, cap: int, probe: Probe | None = None, is_main: bool = True):
    """The `Step` with its mini-batch size (and a token budget) set to the largest mini-batch that fits in `gib`
    GiB (`speedups.auto_mini_batch_gib`), at most `cap` texts (the most one batch holds); `step` itself off CUDA
    without a `probe`."""
    if probe is None:
        if step.device.type != "cuda":
            if is_main:
                print(f"warning: speedups.auto_mini_batch_gib measures GPU memory; on {step.device.type} the "
                      f"mini-batch stays train.mini_batch_size = {step.mini_batch_size}", file=sys.stderr)
            return step
        probe = cuda_probe(step)
    devices = [step.device] if step.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        chosen, measured = choose_mini_batch_size(probe, step.mini_batch_size, cap, gib * 2**30)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor([chosen], device=step.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        chosen = int(t.item())
    L = step.encoder.max_seq_length
    if is_main:
        shown = ", ".join(f"{c}: {'out of memory' if m is None else f'{m / 2**30:.2f} GiB'}"
                          for c, m in sorted(measured.items()))
        print(f"bertino: mini-batches of {chosen} texts (speedups.auto_mini_batch_gib = {gib}; one forward + "
              f"backward of C texts × {L} tokens: {shown})", file=sys.stderr)
    fast = step.fast
    if fast.settings.mini_batch_tokens is not None:
        fast = with_settings(fast, mini_batch_tokens=chosen * L)
    return dataclasses.replace(step, mini_batch_size=chosen, fast=fast)
