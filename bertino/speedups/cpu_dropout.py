"""Dropout and attention for training on a CPU: the same random variables as torch's, drawn faster.

Shapes: B batch, H heads, L sequence length, Dh head dim.

Two replacements, installed together by `install_cpu_dropout(model)` (train.py does it for every run; the tests
compare each with the plain module it replaces, tests/test_speedups.py):

* `BitsDropout` replaces `nn.Dropout`. PyTorch's CPU `bernoulli_` is a serial double-precision loop on CPUs other
  than Intel's (MKL's vectorised kernel is Intel-only): ~12% of a GradCache step on a 2-core AMD EPYC. Here the
  keep-mask is m_i = [u_i ≥ t] for u_i uniform 32-bit integers and t = round(p · 2³²) − 2³¹, so P(drop) = p up to
  2⁻³²: the same Bernoulli(1 − p) variable, ~4× faster, and autograd keeps a bool mask instead of a float one. The
  bits come from the default CPU generator (int64 `random_` over the full range, two 32-bit draws per element), so
  `grad_cache.RandContext` replays the masks exactly.
* `WrittenOutAttention` replaces `model.ScaledDotProductAttention`. With dropout on, CPU SDPA leaves its fused
  kernel for the unfused "math" one (which also spends passes on a NaN-safe softmax), so training-mode attention is
  written out, softmax(q kᵀ/√Dh + mask) · m/(1 − p) · v, with `BitsDropout`'s masks.

Both fall back to the plain computation wherever they would not help: CUDA tensors, eval mode, p = 0. So `encode`
(eval mode) gives the same numbers with or without them, and they hold no parameters: state-dict keys are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import ScaledDotProductAttention
from . import replace_modules


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """A bool tensor of `shape` (CPU), True with probability 1 − p, from the default CPU generator."""
    n = 1
    for s in shape:
        n *= s
    bits = torch.empty((n + 1) // 2, dtype=torch.int64).random_(-(2**63), None)  # 64 uniform bits each
    u = bits.view(torch.int32)[:n].view(shape)  # uniform in [−2³¹, 2³¹)
    return u >= round(p * 2**32) - 2**31


def _active(module: nn.Module, p: float, x: torch.Tensor) -> bool:
    return module.training and p > 0 and x.device.type == "cpu"


class BitsDropout(nn.Dropout):
    """`nn.Dropout` with the keep-mask drawn from 32 random bits per element on CPU tensors (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _active(self, self.p, x) or self.p >= 1:
            return super().forward(x)
        return x.mul(keep_mask(x.shape, self.p)).mul_(1.0 / (1.0 - self.p))


class WrittenOutAttention(ScaledDotProductAttention):
    """`ScaledDotProductAttention` with CPU training-mode attention written out around a `BitsDropout`."""

    def __init__(self, dropout: float):
        super().__init__(dropout)
        self.dropout = BitsDropout(dropout)  # on the attention probabilities

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        if not _active(self, self.p, q):
            return super().forward(q, k, v, keep)
        scores = (q @ k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)  # (B, H, L, L)
        if keep is not None:
            scores.masked_fill_(~keep, float("-inf"))  # every row keeps [CLS]: never all -inf
        return self.dropout(scores.softmax(dim=-1)) @ v  # (B, H, L, Dh)


def install_cpu_dropout(model: nn.Module) -> int:
    """Replace every `nn.Dropout` with `BitsDropout` and every `ScaledDotProductAttention` with
    `WrittenOutAttention` (same p); returns how many modules were replaced."""
    def replace(name: str, m: nn.Module) -> nn.Module | None:
        if type(m) is nn.Dropout:
            return BitsDropout(m.p)
        if type(m) is ScaledDotProductAttention:
            return WrittenOutAttention(m.p)
        return None

    return replace_modules(model, replace)

