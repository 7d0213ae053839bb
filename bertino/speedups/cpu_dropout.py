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

Bytes, not bools, where torch's CPU kernels treat them differently: a comparison writes its result into a uint8
tensor 2–10× faster than into a bool one (`as_bytes`), a mask multiplies as bytes (a bool operand is first converted
to x's dtype in a slow loop), and the padded keys get −∞ by adding a (B, 1, 1, L) bias rather than by a masked fill.
Each gives the bits of the plain formula (tests/test_speedups.py, bf16, fp32, float64), so they are not switches.

Both fall back to the plain computation wherever they would not help: CUDA tensors, eval mode, p = 0. So `encode`
(eval mode) gives the same numbers with or without them, and they hold no parameters: state-dict keys are unchanged.

Lazy bits (`speedups.lazy_mask_bits`): the same variable from about a quarter of the random bits
(`lazy_keep_mask`): 8 bits decide an element unless they tie with the threshold's top 8 bits (1 in 256), and only
those elements draw 24 more. Other bits than the 32-bit draw's, so other masks: runs are not bitwise those without.

Kept masks (`speedups.keep_dropout_masks`): GradCache's pass 3 needs pass 1's masks again, and drawing them again
(the RNG replay) is half of the step's random bits, the dominant cost of these masks (mt19937 is serial: ≈ 1.3 ns
per 32-bit draw on the machine of benchmarks/README.md). With a `TapeDeck` (tapes.py), every `BitsDropout` records
its mask in pass 1 and takes it back in pass 3: the same masks, so the same numbers, for one byte per mask element
of every recomputed mini-batch, held from pass 1 to pass 3.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import ScaledDotProductAttention
from . import replace_modules
from .tapes import TapeDeck


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """A bool tensor of `shape` (CPU), True with probability 1 − p, from the default CPU generator."""
    n = 1
    for s in shape:
        n *= s
    bits = torch.empty((n + 1) // 2, dtype=torch.int64).random_(-(2**63), None)  # 64 uniform bits each
    u = bits.view(torch.int32)[:n].view(shape)  # uniform in [−2³¹, 2³¹)
    return as_bytes(torch.ge, u, round(p * 2**32) - 2**31)


def lazy_keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """`keep_mask`'s Bernoulli variable from a quarter of the random bits (`speedups.lazy_mask_bits`).

    keep_mask keeps u ≥ t for a 32-bit uniform u and t = round(p · 2³²). Write u = 2²⁴·a + b with a the top 8 bits and
    b the low 24: u ≥ t ⇔ a > t_a, or a = t_a and b ≥ t_b (t = 2²⁴·t_a + t_b). So draw a for every element and b only
    for the elements whose a ties with t_a (1 in 256): u is uniform on [0, 2³²) all the same, and P(drop) = t / 2³²
    exactly as with 32 bits per element, for about 8.1 bits per element instead of 32.
    """
    n = 1
    for s in shape:
        n *= s
    t_a, t_b = divmod(round(p * 2**32), 2**24)
    a = torch.empty((n + 7) // 8, dtype=torch.int64).random_(-(2**63), None).view(torch.uint8)[:n]  # 8 bits each
    keep = as_bytes(torch.gt, a, t_a)  # t_a ≤ 255 for p < 1
    ties = as_bytes(torch.eq, a, t_a).nonzero().squeeze(1)
    if ties.numel():
        b = torch.empty(ties.numel(), dtype=torch.int64).random_(0, 2**24)  # the low 24 bits, for the ties only
        keep[ties] = b >= t_b
    return keep.view(shape)


def as_bytes(compare, a: torch.Tensor, t: int) -> torch.Tensor:
    """compare(a, t) (torch.ge, torch.gt, torch.eq) as a bool tensor, written as bytes: torch's CPU comparisons
    write a uint8 result 2–10× faster than a bool one (a 393k-element mask: 0.005 against 0.065 ms from uint8, 0.026
    against 0.058 from int32; benchmarks/README.md), and a {0, 1} byte is a valid bool."""
    return compare(a, t, out=torch.empty(a.shape, dtype=torch.uint8)).view(torch.bool)


def _active(module: nn.Module, p: float, x: torch.Tensor) -> bool:
    return module.training and p > 0 and x.device.type == "cpu"


class BitsDropout(nn.Dropout):
    """`nn.Dropout` with the keep-mask drawn from 32 random bits per element on CPU tensors (module docstring).
    `masks`: the deck its masks are recorded on in pass 1 and replayed from in pass 3 (None: always drawn);
    `lazy`: the same variable from ≈ 8 bits per element (`lazy_keep_mask`)."""

    def __init__(self, p: float, masks: TapeDeck | None = None, lazy: bool = False):
        super().__init__(p)
        self.masks, self.lazy = masks, lazy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _active(self, self.p, x) or self.p >= 1:
            return super().forward(x)
        # the mask multiplies as bytes: a bool operand is converted to x's dtype first, in a loop 2–3× as slow as
        # the multiplication itself (bf16 (8, 12, 64, 64): 0.19 against 0.05 ms); 0 and 1 either way, the same result
        return x.mul(self.keep(x.shape).view(torch.uint8)).mul_(1.0 / (1.0 - self.p))

    def keep(self, shape: torch.Size) -> torch.Tensor:
        """The keep-mask of this call: drawn, or pass 1's from the deck in pass 3."""
        deck = self.masks
        if deck is not None and deck.replaying_now:
            m = deck.next_output("dropout")
            if m.shape != shape:
                raise RuntimeError(f"dropout-mask tape: recorded {tuple(m.shape)} but this call needs "
                                   f"{tuple(shape)}")
            return m
        m = (lazy_keep_mask if self.lazy else keep_mask)(shape, self.p)
        if deck is not None and deck.recording_now:
            deck.record(m)
        return m


class WrittenOutAttention(ScaledDotProductAttention):
    """`ScaledDotProductAttention` with CPU training-mode attention written out around a `BitsDropout`."""

    def __init__(self, dropout: float, masks: TapeDeck | None = None, lazy: bool = False):
        super().__init__(dropout)
        self.dropout = BitsDropout(dropout, masks, lazy)  # on the attention probabilities

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        if not _active(self, self.p, q):
            return super().forward(q, k, v, keep)
        scores = (q @ k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)  # (B, H, L, L)
        if keep is not None:
            scores.add_(key_bias(keep, scores.dtype))  # −∞ on padded keys; every row keeps [CLS]: never all −∞
        return self.dropout(scores.softmax(dim=-1)) @ v  # (B, H, L, Dh)


def key_bias(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive key mask: keep (B, 1, 1, L) bool → (B, 1, 1, L) of 0 (a real key) and −∞ (padding). Added to
    the scores it gives what `masked_fill_(~keep, −∞)` gives (s + 0 = s, s + −∞ = −∞), in a vectorised add rather
    than a masked fill: bf16 (8, 12, 64, 64) 0.03 against 0.09 ms."""
    return torch.zeros(keep.shape, dtype=dtype).masked_fill_(~keep, float("-inf"))


def install_cpu_dropout(model: nn.Module, masks: TapeDeck | None = None, lazy: bool = False) -> int:
    """Replace every `nn.Dropout` with `BitsDropout` and every `ScaledDotProductAttention` with
    `WrittenOutAttention` (same p), all on the deck `masks` if given and drawing lazily if `lazy`; returns how many
    modules were replaced."""
    def replace(name: str, m: nn.Module) -> nn.Module | None:
        if type(m) is nn.Dropout:
            return BitsDropout(m.p, masks, lazy)
        if type(m) is ScaledDotProductAttention:
            return WrittenOutAttention(m.p, masks, lazy)
        return None

    return replace_modules(model, replace)

