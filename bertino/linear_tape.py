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

It is selective activation checkpointing with the policy "save the matmul outputs": the memory of the tape is
the recorded outputs of ALL mini-batches (for DistilBERT with q, k, v, out_lin and lin2 taped: 5·D floats per
token and layer, about a sixth of a full autograd graph), and it removes 16/24 of the FLOPs of pass 3's forward
(lin1's 4·D output would remove the rest for 4·D more floats per token and layer). `tape_names` picks the layers.

Autocast: the recorded outputs are in the autocast dtype; the replay casts x, W and b to that dtype itself (as
F.linear under autocast would), so backward sees the same low-precision operands.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_TAPED = ("q_lin", "k_lin", "v_lin", "out_lin", "lin2")  # not lin1: its output is 4·D wide

_ACTIVE: contextvars.ContextVar["LinearTape | None"] = contextvars.ContextVar("linear_tape", default=None)


class LinearTape:
    """The recorded outputs of the taped `Linear` layers of one mini-batch's forward, in call order."""

    def __init__(self, names: tuple[str, ...] = DEFAULT_TAPED):
        self.names = frozenset(names)
        self.outputs: list[torch.Tensor] = []
        self._replay_at: int | None = None  # None while recording

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.outputs)

    @contextlib.contextmanager
    def recording(self) -> Iterator["LinearTape"]:
        """Pass 1: taped layers compute as usual and append their (detached) outputs."""
        with _activate(self):
            yield self

    @contextlib.contextmanager
    def replaying(self) -> Iterator["LinearTape"]:
        """Pass 3: taped layers return their recorded outputs, in the same order; the tape is then emptied."""
        self._replay_at = 0
        try:
            with _activate(self):
                yield self
            if self._replay_at != len(self.outputs):
                raise RuntimeError(f"linear tape: {len(self.outputs)} outputs recorded but {self._replay_at} "
                                   f"replayed; pass 3 must run the same forward as pass 1")
        finally:
            self.outputs, self._replay_at = [], None  # free the recorded outputs

    def _next(self, name: str, shape: torch.Size) -> torch.Tensor:
        assert self._replay_at is not None
        if self._replay_at >= len(self.outputs):
            raise RuntimeError(f"linear tape: {name} asked for output {self._replay_at + 1} of "
                               f"{len(self.outputs)} recorded; pass 3 must run the same forward as pass 1")
        y = self.outputs[self._replay_at]
        if y.shape[:-1] != shape[:-1]:
            raise RuntimeError(f"linear tape: {name} recorded {tuple(y.shape)} but its input is {tuple(shape)}")
        self._replay_at += 1
        return y


@contextlib.contextmanager
def _activate(tape: LinearTape) -> Iterator[None]:
    token = _ACTIVE.set(tape)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same state-dict keys) that a `LinearTape` can record and replay by `name`."""

    def __init__(self, in_features: int, out_features: int, name: str):
        super().__init__(in_features, out_features)
        self.tape_name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tape = _ACTIVE.get()
        if tape is None or self.tape_name not in tape.names:
            return F.linear(x, self.weight, self.bias)
        if tape._replay_at is None:
            y = F.linear(x, self.weight, self.bias)  # (..., D_out)
            tape.outputs.append(y.detach())
            return y
        y = tape._next(self.tape_name, x.shape)  # (..., D_out), recorded in pass 1
        w, b = self.weight, self.bias
        if torch.is_autocast_enabled(x.device.type):  # operands as F.linear under autocast would see them
            dtype = torch.get_autocast_dtype(x.device.type)
            x, w, b = x.to(dtype), w.to(dtype), (b.to(dtype) if b is not None else None)
        return _LinearFromTape.apply(x, w, b, y)


class _LinearFromTape(torch.autograd.Function):
    """y = x Wᵀ + b, with y given: forward returns y, backward is the linear layer's backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return y.view_as(y)  # a fresh tensor object for autograd to attach its node to

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, weight = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])  # (C·L, D_out)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g2 @ weight).view(x.shape)  # (..., D_in)
        if ctx.needs_input_grad[1]:
            grad_w = g2.t() @ x.reshape(-1, x.shape[-1])  # (D_out, D_in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)  # (D_out,)
        return grad_x, grad_w, grad_b, None
