"""The linear tape: GradCache's pass 3 without re-running the encoder's matrix multiplications.

Shapes: C texts in a mini-batch, L its length, D_in / D_out a linear layer's input / output dims.

GradCache's pass 3 re-runs every mini-batch's forward only to rebuild the autograd graph that pass 1 threw away.
Most of that forward is matrix multiplications, y = x Wᵀ + b, and a linear layer's backward needs only x and W:

    ∂L/∂x = g W,    ∂L/∂W = gᵀ x,    ∂L/∂b = Σ_rows g,      g = ∂L/∂y  (C·L, D_out)

so its output y need not be recomputed if pass 1 kept it. The tape keeps, per mini-batch, the outputs of the
linear layers it is told to record, in call order; pass 3 replays them: each taped layer returns its recorded
output at once, attached to x, W and b by `_LinearFromTape`, whose backward is the three products above. The
cheap operations between linears (embeddings, LayerNorm, softmax, GELU, dropout with the replayed RNG) are
recomputed as usual, so x in pass 3 is bit-for-bit the x of pass 1, and the gradient is the same.

It is selective activation checkpointing with the policy "save the matmul outputs". Its memory is the recorded
outputs of ALL mini-batches: with q, k, v, out_lin and lin2 taped (`DEFAULT_TAPED`), 5·D floats per token and
layer — measured, a sixth of what a full autograd graph holds (8 vs 49 MiB per row of 4 texts, benchmarks/README.md)
— and it removes 16/24 of the FLOPs of pass 3's forward (lin1's 4·D
output would remove the rest for 4·D more floats per token and layer).

How it is wired: `install_linear_tape(model, names)` replaces the named `nn.Linear` layers with `TapedLinear`
layers sharing their parameters and one `TapeDeck` (tapes.py); the fast GradCache passes (fast_grad_cache.py)
record each recomputed mini-batch into a fresh `Tape` in pass 1 (`TapeDeck.recording`) and replay it in pass 3
(`TapeDeck.replaying`). With no tape on the deck a `TapedLinear` is an `nn.Linear`.

Autocast: the recorded outputs are in the autocast dtype; the replay casts x, W and b to that dtype itself (as
F.linear under autocast would), so backward sees the same low-precision operands.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import replace_modules
from .onednn_linear import OneDNNLinear, linear as onednn_linear, onednn_applies, onednn_mm
from .tapes import TapeDeck

DEFAULT_TAPED = ("q_lin", "k_lin", "v_lin", "out_lin", "lin2")  # not lin1: its output is 4·D wide
ALL_LINEARS = DEFAULT_TAPED + ("lin1",)


class TapedLinear(nn.Linear):
    """An `nn.Linear` (the same parameters) that records its output into, or replays it from, its deck's tape.
    `onednn`: its products go through oneDNN where that applies (it replaced a `OneDNNLinear`)."""

    def __init__(self, linear: nn.Linear, name: str, deck: TapeDeck, onednn: bool = False):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.tape_name, self.deck, self.onednn = name, deck, onednn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        deck = self.deck
        linear = onednn_linear if self.onednn and self.training else F.linear
        if not deck.replaying_now:
            y = linear(x, self.weight, self.bias)  # (..., D_out)
            if deck.recording_now:
                deck.record(y)
            return y
        y = deck.next_output(self.tape_name)  # (..., D_out), recorded in pass 1
        if y.shape[:-1] != x.shape[:-1]:
            raise RuntimeError(f"linear tape: {self.tape_name} recorded {tuple(y.shape)} but its input is "
                               f"{tuple(x.shape)}")
        w, b = self.weight, self.bias
        if torch.is_autocast_enabled(x.device.type):  # operands as F.linear under autocast would see them
            dtype = torch.get_autocast_dtype(x.device.type)
            x, w, b = x.to(dtype), w.to(dtype), (b.to(dtype) if b is not None else None)
        return _LinearFromTape.apply(x, w, b, y, self.onednn)


class _LinearFromTape(torch.autograd.Function):
    """y = x Wᵀ + b, with y given: forward returns y, backward is the linear layer's backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor,
                onednn: bool = False):
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.onednn = bias is not None, onednn
        return y.view_as(y)  # a fresh tensor object for autograd to attach its node to

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, weight = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])  # (C·L, D_out)
        x2 = x.reshape(-1, x.shape[-1])  # (C·L, D_in)
        if ctx.onednn and onednn_applies(g2, weight) and x2.dtype == torch.float32:
            def mm(a, b):  # a b, by oneDNN (onednn_linear.py)
                return onednn_mm(a, b.t())
        else:
            mm = torch.mm
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = mm(g2, weight).view(x.shape)  # (..., D_in)
        if ctx.needs_input_grad[1]:
            grad_w = mm(g2.t(), x2)  # (D_out, D_in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)  # (D_out,)
        return grad_x, grad_w, grad_b, None, None


def install_linear_tape(model: nn.Module, names: tuple[str, ...] = DEFAULT_TAPED) -> TapeDeck:
    """Replace the `nn.Linear` layers (or `OneDNNLinear`s, whose kernel they keep) whose attribute name is in
    `names` with `TapedLinear`s on one new deck."""
    deck = TapeDeck("linear tape")
    count = replace_modules(model, lambda name, m: TapedLinear(m, name, deck, onednn=type(m) is OneDNNLinear)
                            if name in names and type(m) in (nn.Linear, OneDNNLinear) else None)
    if count == 0:
        raise ValueError(f"linear tape: the model has no nn.Linear named any of {names}")
    return deck
