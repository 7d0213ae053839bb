"""The one builder of what a run trains with, used by `train.py` and `python -m bertino.check` alike.

This is where the three parts of bertino meet (docs/design.md): the student modules (the encoder, the losses, the
`Step`), the speed-ups (bertino/speedups/, installed here and nowhere else) and the plumbing (config, precision).

    start_process(cfg)                  torchrun set-up (with train.ddp_timeout), every generator seeded, the
                                        autocast dtype for train.fp16 / train.bf16 on this hardware
    (the caller loads the encoder)      train.py: the model or the checkpoint to resume; the check: the model
    build_step(cfg, encoder, process)   into training mode on the device → dropout masks (model.dropout_masks) →
                                        the speed-ups (`speedups`; null: none) → DDP → GradScaler, autocast →
                                        the `Step` → the mini-batch that fits (speedups.auto_mini_batch_gib)
"""

from __future__ import annotations

import dataclasses
import random
import sys
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from . import distributed
from .encoder import SentenceEncoder
from .keyed_dropout import install_keyed_dropout
from .losses import LOSSES
from .objectives import Objective
from .plumbing.config import Config
from .plumbing.mixed_precision import autocast_dtype
from .speedups.fast_grad_cache import install_speedups
from .speedups.memory_fit import fit_mini_batch
from .step import Step


@dataclass(frozen=True)
class Process:
    """This process's place in the run: rank and device, and the autocast dtype (None: fp32)."""

    dist_info: distributed.DistInfo
    device: torch.device
    amp_dtype: torch.dtype | None


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's generators (every device's), as the HF Trainer's `set_seed`."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def start_process(cfg: Config) -> Process:
    """Join the torchrun group (if any), seed every generator, choose the autocast dtype (a warning on rank 0
    when the config's precision is not what this hardware runs)."""
    dist_info, device = distributed.setup(timeout=cfg.train.ddp_timeout)
    seed_everything(cfg.train.seed)
    amp_dtype, warning = autocast_dtype(cfg.train.fp16, cfg.train.bf16, device)
    if warning and dist_info.is_main:
        print(f"warning: {warning}", file=sys.stderr)
    return Process(dist_info, device, amp_dtype)


def make_objectives(cfg: Config, gather: bool | None = None) -> dict[str, Objective]:
    """Each task's loss: its function, scale, the Matryoshka dims and weights, the cross-rank gather
    (`gather`: train.gather_across_devices unless given; a one-process reference has none)."""
    m = cfg.matryoshka
    gather = cfg.train.gather_across_devices if gather is None else gather
    return {name: Objective(LOSSES[t.loss], t.scale, m and m.dims, m and m.weights, gather=gather)
            for name, t in cfg.tasks.items()}


def build_step(cfg: Config, encoder: SentenceEncoder, process: Process) -> Step:
    """The run's `Step` (module docstring). Installs the dropout masks and speed-ups into `encoder` in place."""
    device, dist_info = process.device, process.dist_info
    encoder.to(device).train()
    # dropout masks: keyed (each a function of its text: keyed_dropout.py) or torch's random stream. Not a speed-up:
    # keyed masks are other random variables than the stream's, so they are installed whatever `speedups` says.
    keys = install_keyed_dropout(encoder.model) if cfg.model.dropout_masks == "keyed" else None
    fast = None if cfg.speedups is None else install_speedups(encoder, cfg.speedups, keys)
    model = encoder
    if dist_info.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            encoder, device_ids=[device.index] if device.type == "cuda" else None)
    amp = process.amp_dtype
    graphs = fast is not None and cfg.speedups.cuda_graphs  # graphed passes run every task's loss via GradCache
    step = Step(
        encoder=encoder, model=model, objectives=make_objectives(cfg),
        grad_cache_tasks=frozenset(name for name, t in cfg.tasks.items()
                                   if LOSSES[t.loss].grad_cache or graphs),
        device=device,
        autocast=partial(torch.autocast, device.type, dtype=amp or torch.float32, enabled=amp is not None),
        # nanoGPT's trick: one code path, the scaler is a no-op unless fp16
        scaler=torch.amp.GradScaler(device.type, enabled=(amp == torch.float16)),
        mini_batch_size=cfg.train.mini_batch_size, seed=cfg.train.seed, dropout_keys=keys, fast=fast,
        rank=dist_info.rank, world_size=dist_info.world_size)
    if fast is None or cfg.speedups.auto_mini_batch_gib is None:
        return step
    cap = max(cfg.train.per_device_train_batch_size * len(t.columns) for t in cfg.tasks.values())
    return fit_mini_batch(step, cfg.speedups.auto_mini_batch_gib, cap, is_main=dist_info.is_main)


def with_rank(step: Step, rank: int, world_size: int, cfg: Config) -> Step:
    """The same Step as one process would run the share of `rank` of `world_size` without DDP and without the
    cross-rank gather (bertino.check's references: the keyed masks of that share, computed in this process)."""
    return dataclasses.replace(step, model=step.encoder, objectives=make_objectives(cfg, gather=False), rank=rank,
                               world_size=world_size)
