"""Sparse embedding gradients: a cost GradCache pays once per mini-batch, and the full batch once per step.

Shapes: V table rows, D dim, C·L tokens in a mini-batch.

The backward of an embedding lookup materialises a dense (V, D) gradient: for MiniLM's 30522 × 384 word table a
47 MB zero-fill, then a 47 MB add into `.grad`, per backward — 16 times per step at C = 8 (≈ 0.3 s of a ≈ 5 s step
on a 2-core CPU, measured). A sparse gradient holds only the rows of the mini-batch's tokens.

So GradCache's pass 3 makes the tables' gradients sparse for every backward but the last (`fast_grad_cache.py`
decides which), and only where the mini-batch has fewer tokens than the table has rows (else sparse is no
smaller). The last backward is dense, and autograd accumulates dense + sparse into a dense `.grad`: AdamW,
clipping and DDP (whose all-reduce happens in that last backward) see an ordinary dense gradient.

That still makes two (V, D) tensors per step (the last backward's dense gradient, and the sum autograd makes of
it and the sparse rows), and each is fresh memory: on the 2-core machine of benchmarks/README.md, a fresh 47 MB
tensor costs ≈ 12k page faults, 10–60 ms. With a gradient buffer (`speedups.embedding_grad_buffer`), pass 3 first
gives every table whose `.grad` is None a dense zeroed buffer kept from step to step (`attach_buffers`), and then
every backward, the last too, is sparse: autograd adds each mini-batch's rows into that dense `.grad` in place. The
optimizer, clipping and DDP see the same dense `.grad`; the sum runs in another order (fp32 rounding).

How it is wired: `install_sparse_embedding_grads(model)` replaces the model's `nn.Embedding`s with
`SwitchableEmbedding`s (the same weights) that consult one `SparseGradSwitch`; the switch is off except inside
`switch.sparse_for(features)`, so everywhere else (plain training, `encode`) they are `nn.Embedding`s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import replace_modules


class SparseGradSwitch:
    """The installed tables, and which of them produce sparse gradients right now (none, outside `sparse_for`)."""

    def __init__(self):
        self.tables: list[SwitchableEmbedding] = []
        self.on: tuple[nn.Embedding, ...] = ()
        self.buffers: dict[int, torch.Tensor] = {}  # per table (its id): the dense gradient buffer, once made

    def attach_buffers(self) -> None:
        """Make every table's `.grad` dense before pass 3: a table without one gets its buffer, zeroed (made on the
        first call, then the same memory every step); a sparse one is added into it. Every backward may then be
        sparse: autograd adds sparse rows into a dense `.grad` in place."""
        for table in self.tables:
            w = table.weight
            if w.grad is not None and not w.grad.is_sparse:
                continue  # already dense (an earlier task's gradient in this step): add into it
            buffer = self.buffers.get(id(table))
            if buffer is None or buffer.shape != w.shape or buffer.dtype != w.dtype or buffer.device != w.device:
                buffer = self.buffers[id(table)] = torch.zeros_like(w, memory_format=torch.contiguous_format)
            else:
                buffer.zero_()
            if w.grad is not None:  # sparse
                buffer.add_(w.grad)
            w.grad = buffer

    @contextlib.contextmanager
    def sparse_for(self, features: dict[str, torch.Tensor]) -> Iterator[None]:
        """Within the block, the tables with more rows than this mini-batch has tokens make sparse gradients."""
        tokens = features["input_ids"].numel()
        before, self.on = self.on, tuple(e for e in self.tables if tokens < e.num_embeddings)
        try:
            yield
        finally:
            self.on = before


class SwitchableEmbedding(nn.Embedding):
    """`nn.Embedding` (the same weight) whose backward is sparse while its switch names it."""

    def __init__(self, embedding: nn.Embedding, switch: SparseGradSwitch):
        nn.Module.__init__(self)
        for attr in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                     "scale_grad_by_freq", "sparse"):
            setattr(self, attr, getattr(embedding, attr))
        self.weight = embedding.weight
        self.switch = switch

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        sparse = self.sparse or any(e is self for e in self.switch.on)
        return F.embedding(input, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, sparse)


def install_sparse_embedding_grads(model: nn.Module) -> SparseGradSwitch:
    """Replace every `nn.Embedding` of `model` with a `SwitchableEmbedding` on one new switch (off)."""
    switch = SparseGradSwitch()

    def replace(name: str, m: nn.Module) -> nn.Module | None:
        if type(m) is not nn.Embedding:
            return None
        switch.tables.append(SwitchableEmbedding(m, switch))
        return switch.tables[-1]

    replace_modules(model, replace)
    return switch
