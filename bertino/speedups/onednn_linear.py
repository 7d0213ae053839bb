"""fp32 linear layers through oneDNN on CPUs where torch's own fp32 GEMM is slow.

Shapes: N = C·L token rows of a mini-batch, D_in / D_out a linear layer's input / output dims.

torch's CPU `nn.Linear` in fp32 multiplies with the BLAS it was built with — MKL for the official wheels — and MKL
takes its AVX-512 kernels on Intel CPUs only: on an AMD EPYC with AVX-512 (Zen 4/5) its SGEMM runs the AVX2 path,
≈ 95 GFLOP/s per core, where oneDNN's brgemm kernels (bundled with torch, used for its bf16 GEMMs) run the same
fp32 products at ≈ 215–240 (benchmarks/README.md, "The step's profile"). A linear layer is three GEMMs, and all
three are products oneDNN's inner-product primitive computes directly, operands given as (transposed) views:

    forward        y  = x Wᵀ + b              (N, D_out)    oneDNN(x, W, b)
    backward       gx = g W                   (N, D_in)     oneDNN(g, Wᵀ)
                   gW = gᵀ x                  (D_out, D_in) oneDNN(gᵀ, xᵀ)
                   gb = Σ_rows g              (D_out,)

`OneDNNLinear` replaces `nn.Linear` (the same parameters) and computes these in `_OneDNNLinearFunction`, an
autograd function whose backward is the three lines above: the same products as `nn.Linear`'s, summed by another
kernel in another order — fp32 rounding apart (≈ 1e-6 relative), the same gradient. It steps aside (plain
`F.linear`) wherever it would not apply or not help: eval mode (so `encode` keeps torch's numbers), autocast (bf16
linears already run through oneDNN), other dtypes (oneDNN has no float64: the float64 tests see the plain layer),
other devices, a torch built without oneDNN. tests/test_onednn_linear.py checks the function's formulas in float64
(with torch's kernel in oneDNN's place), the kernel against torch's in fp32, and GradCache with it against the
textbook.

Installed by `install_speedups` for `speedups.onednn_linear` (bertino/speedups/settings.py: what it costs).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import replace_modules


def onednn_available() -> bool:
    """Does this torch have oneDNN's linear kernel (`torch.ops.mkldnn._linear_pointwise`)?"""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def amd_with_avx512(cpuinfo: str | None = None) -> bool:
    """Is this CPU an AMD x86 with AVX-512 — where MKL's SGEMM runs its AVX2 path (module docstring)?"""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text(errors="replace") if path.exists() else ""
    vendor = re.search(r"^vendor_id\s*:\s*(\S+)", cpuinfo, re.M)
    flags = re.search(r"^flags\s*:(.*)$", cpuinfo, re.M)
    return bool(vendor and vendor.group(1) == "AuthenticAMD" and flags and " avx512f" in f" {flags.group(1)} ")


# Below this many multiply-adds (N · D_in · D_out) the autograd function's Python costs more than oneDNN saves:
# forward + backward of a 16 × 384 × 384 product 196 µs against torch's 242, of 1024 × 32 × 32 155 against 111.
AUTO_MIN_MULTIPLY_ADDS = 2**21


def onednn_wanted(setting: bool | str, cpuinfo: str | None = None) -> int | None:
    """`speedups.onednn_linear` → the smallest product to run through oneDNN, or None: not installed. true: every
    product (0); "auto": where it was measured faster — an AMD CPU with AVX-512 (2.2× per GEMM on a Zen 5 EPYC; on
    an AVX2-only EPYC MKL and oneDNN ran alike; on Intel CPUs MKL has its AVX-512 kernels and oneDNN has not been
    measured against it) and products of at least `AUTO_MIN_MULTIPLY_ADDS`. Never without oneDNN."""
    if not onednn_available() or setting is False or (setting == "auto" and not amd_with_avx512(cpuinfo)):
        return None
    return AUTO_MIN_MULTIPLY_ADDS if setting == "auto" else 0


def onednn_mm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a bᵀ + bias by oneDNN's fp32 inner product: a (M, K), b (N, K), either may be a transposed view → (M, N)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


class _OneDNNLinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b and its backward, every product by `mm` (oneDNN's; the tests pass torch's)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mm) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (N, D_in)
        ctx.save_for_backward(x2, weight)
        ctx.mm, ctx.has_bias, ctx.in_shape = mm, bias is not None, x.shape
        return mm(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])  # (..., D_out)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x2, weight = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])  # (N, D_out)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = ctx.mm(g2, weight.t()).view(ctx.in_shape)  # g W  (..., D_in)
        if ctx.needs_input_grad[1]:
            grad_w = ctx.mm(g2.t(), x2.t())  # gᵀ x  (D_out, D_in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)  # (D_out,)
        return grad_x, grad_w, grad_b, None


def onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """fp32 CPU tensors outside autocast (module docstring)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu"))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear`, through oneDNN where it applies: x (..., D_in) → (..., D_out)."""
    if onednn_applies(x, weight):
        return _OneDNNLinearFunction.apply(x, weight, bias, onednn_mm)
    return F.linear(x, weight, bias)


class OneDNNLinear(nn.Linear):
    """`nn.Linear` (the same parameters) through oneDNN in training mode, for products of at least
    `min_multiply_adds` (N · D_in · D_out; module docstring)."""

    def __init__(self, linear_layer: nn.Linear, min_multiply_adds: int = 0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear_layer.in_features, linear_layer.out_features
        self.weight, self.bias = linear_layer.weight, linear_layer.bias
        self.min_multiply_adds = min_multiply_adds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.numel() * self.out_features < self.min_multiply_adds:
            return F.linear(x, self.weight, self.bias)
        return linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, min_multiply_adds={self.min_multiply_adds}"


def install_onednn_linear(model: nn.Module, min_multiply_adds: int = 0) -> int:
    """Replace every `nn.Linear` of `model` with `OneDNNLinear`; returns how many (0 without oneDNN)."""
    if not onednn_available():
        return 0
    return replace_modules(model, lambda name, m: OneDNNLinear(m, min_multiply_adds) if type(m) is nn.Linear
                           else None)
