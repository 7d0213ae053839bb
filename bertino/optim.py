"""AdamW with the usual weight-decay exclusions, and the learning-rate schedules (linear warm-up, then decay).

Schedules, with s the optimizer step (0-based), S the total steps, w = ceil(warmup_ratio · S) warm-up steps, and the
multiplier m(s) applied to the peak learning rate (as transformers' `get_*_schedule_with_warmup`):

    warm-up   s < w:  m = s / w
    cosine:           m = ½ (1 + cos(π · p)),   p = (s − w) / max(1, S − w)
    linear:           m = max(0, (S − s) / max(1, S − w))
    constant:         m = 1
"""

from __future__ import annotations

import math

import torch
from torch import nn


def decays(name: str) -> bool:
    """Weight decay applies to weight matrices and embeddings, never to biases or LayerNorm weights."""
    return not (name.endswith(".bias") or "LayerNorm" in name or "layer_norm" in name)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, fused: bool = False) -> torch.optim.AdamW:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if decays(n)], "weight_decay": weight_decay},
        {"params": [p for n, p in named if not decays(n)], "weight_decay": 0.0},
    ]
    if fused:  # speedups.adamw_fused: one kernel does the whole update of many tensors (CUDA and CPU)
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True)
        except RuntimeError:  # a torch without the fused kernel for these parameters' device: the one below
            pass
    # foreach=True: one fused multi-tensor kernel per group instead of a Python loop over 100 parameters.
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, foreach=True)


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(total_steps * warmup_ratio)


def lr_multiplier(step: int, total_steps: int, warmup: int, kind: str) -> float:
    """m(step) of the module docstring."""
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    if kind == "cosine":
        progress = (step - warmup) / max(1, total_steps - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown lr_scheduler_type {kind!r} (expected cosine, linear or constant)")


def make_scheduler(optimizer, total_steps: int, warmup_ratio: float, kind: str) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = warmup_steps(total_steps, warmup_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, total_steps, warmup, kind))
