"""The largest GradCache mini-batch that fits: chosen once, at start, from a memory budget on the GPU.

Shapes: C texts per mini-batch, L_max the encoder's max_seq_length, T_max the most texts one batch of the run holds.

On a CPU small mini-batches cost little (docs/gradcache.md §6); on a GPU the step is launch-bound and fewer, larger
mini-batches are faster, as long as memory holds them. `train.grad_cache_auto_mini_batch_gib: G` measures it at
start: the peak memory of one forward + backward of C texts of L_max tokens (the largest mini-batch a step can
have) under the run's precision and dropout masks, above what was allocated before (`cuda_probe`). C doubles from
`train.mini_batch_size` while the peak stays within G GiB — and halves while it does not — never beyond T_max
(`choose_mini_batch_size`). The chosen C replaces `mini_batch_size`; with a token budget, C · L_max replaces
`grad_cache_mini_batch_tokens`. Under DDP every rank measures and all take the smallest.

GradCache's gradient does not depend on C (docs/gradcache.md §1): this changes the time and the memory of a step,
not its result (tests/test_memory_fit.py, with a fake probe on the CPU; scripts/cuda_checks.py measures the real
one). The probe runs inside `torch.random.fork_rng`, so the run's random streams are as without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from typing import Callable

import torch

from ..keyed_dropout import text_keys

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
                       f"(measured {measured}); raise train.grad_cache_auto_mini_batch_gib")


def cuda_probe(step) -> Probe:
    """The peak CUDA memory of one training forward + backward of C texts of max_seq_length tokens (a `Step`'s
    encoder, autocast and dropout masks), above what was allocated before."""
    encoder, device, L = step.encoder, step.device, step.encoder.max_seq_length

    def probe(C: int) -> float | None:
        ids = (torch.arange(C * L, device=device) % encoder.model.config.vocab_size).view(C, L)  # (C, L)
        features = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        keys = step.dropout_keys
        encoder.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = None
        try:
            with step.autocast(), keys.use(text_keys(0, 0, torch.arange(C)).to(device)) if keys else contextlib.nullcontext():
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


def fit_mini_batch(step, probe: Probe | None = None, is_main: bool = True):
    """The `Step` with `train.mini_batch_size` (and a token budget) set to the largest mini-batch that fits in
    `train.grad_cache_auto_mini_batch_gib`; `step` itself when the key is null, or off CUDA without a `probe`."""
    cfg, train = step.cfg, step.cfg.train
    gib = train.grad_cache_auto_mini_batch_gib
    if gib is None:
        return step
    if probe is None:
        if step.device.type != "cuda":
            if is_main:
                print(f"warning: train.grad_cache_auto_mini_batch_gib measures GPU memory; on {step.device.type} "
                      f"the mini-batch stays train.mini_batch_size = {train.mini_batch_size}", file=sys.stderr)
            return step
        probe = cuda_probe(step)
    cap = max(train.per_device_train_batch_size * len(t.columns) for t in cfg.tasks.values())
    devices = [step.device] if step.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        chosen, measured = choose_mini_batch_size(probe, train.mini_batch_size, cap, gib * 2**30)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor([chosen], device=step.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        chosen = int(t.item())
    L = step.encoder.max_seq_length
    if is_main:
        shown = ", ".join(f"{c}: {'out of memory' if m is None else f'{m / 2**30:.2f} GiB'}"
                          for c, m in sorted(measured.items()))
        print(f"bertino: mini-batches of {chosen} texts (train.grad_cache_auto_mini_batch_gib = {gib}; one "
              f"forward + backward of C texts × {L} tokens: {shown})", file=sys.stderr)
    tokens = None if train.grad_cache_mini_batch_tokens is None else chosen * L
    new_train = dataclasses.replace(train, mini_batch_size=chosen, grad_cache_mini_batch_tokens=tokens)
    return dataclasses.replace(step, cfg=dataclasses.replace(cfg, train=new_train))
