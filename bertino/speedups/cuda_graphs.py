"""GradCache's passes 1 and 3 as captured CUDA graphs, one pair per mini-batch shape; the same code runs eagerly on
a CPU (the exact fallback the tests prove).

Shapes: C rows of a mini-batch (its texts, then empty rows), r ≤ C its texts, L its padded length, D embedding dim,
P the encoder's parameters.

Why. On a GPU a small encoder's GradCache step is launch-bound: ≈ 19,000 kernel launches per step at the card's
shape, each costing the host more than the GPU (docs/gradcache.md §6). A CUDA graph records a whole forward (or
forward + backward) once and replays it with ONE launch. Graphs need static shapes and static memory, so:

* the mini-batches come from `static_shapes.StaticShapes` with `pad_rows`: every (C, L) repeats, and each shape is
  captured the first time it appears (`ShapeGraph`: a warm-up on a side stream, then the capture) into one memory
  pool shared by every graph (replays run one after another, never concurrently, and every graph's outputs stay
  referenced, so no graph ever reads memory another one wrote);
* pass 1 per shape: copy the chunk into static input buffers, replay the no-grad forward, copy the r real rows out;
* pass 3 per shape: copy the chunk and its cache rows g (r, D) into static buffers (the empty rows' gradient is
  zero), replay forward + `torch.autograd.grad(out, P, g)`, and the graph itself adds the parameter gradients into
  persistent accumulators (no launch per parameter): `GraphedChunks.backward`, which fast_grad_cache.py's pass 3
  calls in place of `out.backward(gradient=g)`;
* after the last graphed chunk the accumulators are added into the parameters' `.grad` once (`GraphedChunks.flush`).

What stays exact (each checked: tests/test_cuda_graphs.py on the CPU, scripts/cuda_checks.py on a GPU):
* dropout: keyed masks only (config: model.dropout_masks "keyed"). A keyed mask is a function of the texts' keys —
  a static input buffer — and holds no generator state, so pass 3's replay draws pass 1's masks by construction.
  The masks' position hashes are computed before the first capture, at the longest length, and held, so no graph
  ever points at a freed cache;
* the loss scale: it lives in the cache g (grad_cache.build_cache), which pass 3 copies in: nothing to capture;
* autocast: each graph runs under the pass's autocast dtype with the weight-cast cache off (a cached cast made
  during a capture would be read outside it before any replay filled it);
* DDP: graphs run the module inside the wrapper and return gradients to accumulators, not through autograd's
  accumulation, so DDP's hooks do not see them. Under DDP the fast path therefore keeps the LAST mini-batch of pass
  3 eager, through the wrapper, outside `no_sync`, after the flush: its backward all-reduces the whole accumulated
  `.grad` once, as every other last backward does (fast_grad_cache.plan_step).

On a CPU (or with `capture=False`) the same static buffers, accumulators and flush run without a capture: the
option works everywhere and changes nothing but the speed.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..grad_cache import MiniBatch
from ..keyed_dropout import DropoutKeys

WARMUP = 2  # eager runs on a side stream before a capture (cuBLAS handles, the allocator's state)


class ShapeGraph:
    """`fn()` run as a CUDA graph (captured at construction, after `WARMUP` eager runs), or eagerly."""

    def __init__(self, fn: Callable[[bool], object], capture: bool, pool=None):
        self.fn, self.graph, self.out = fn, None, None
        if capture:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP):
                    fn(False)  # warm-up: computes, but pass 3 does not accumulate
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self.out = fn(True)

    def run(self):
        if self.graph is None:
            return self.fn(True)
        self.graph.replay()
        return self.out


class GraphedChunks:
    """The graphs of one encoder: per (C, L, autocast) a pass-1 and a pass-3 `ShapeGraph`, the static buffers, the
    gradient accumulators (one per parameter) and the flush into `.grad`."""

    def __init__(self, encoder: nn.Module, keys: DropoutKeys, max_length: int, capture: bool | None = None):
        self.encoder, self.keys, self.max_length = encoder, keys, max_length
        self.params = [p for p in encoder.parameters() if p.requires_grad]
        self.capture = capture
        self.first_graphs: dict[tuple, tuple[ShapeGraph, dict]] = {}
        self.again_graphs: dict[tuple, tuple[ShapeGraph, dict]] = {}
        self.acc: list[torch.Tensor] | None = None  # Σ of the graphed chunks' parameter gradients, this step
        self.pool = None
        self.held: list[torch.Tensor] = []  # tensors the captured graphs read and nothing else may free

    # ------------------------------------------------------------------------------------------ set-up
    def _capturing(self, device: torch.device) -> bool:
        if self.capture is None:
            self.capture = device.type == "cuda"
        if self.capture and self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
            cfg = self.encoder.model.config  # the position hashes at the longest length, before any capture
            self.held += [self.keys.counters("hidden", self.max_length, cfg.dim, device),
                          self.keys.counters("attention", self.max_length, cfg.n_heads, device)]
        return self.capture

    def _buffers(self, batch: MiniBatch, grad_dtype=None) -> dict:
        f = batch.features
        C, L = f["input_ids"].shape
        buf = {"input_ids": torch.empty_like(f["input_ids"]), "attention_mask": torch.empty_like(f["attention_mask"]),
               "keys": torch.zeros(C, dtype=torch.int64, device=f["input_ids"].device)}
        if grad_dtype is not None:
            buf["grad"] = torch.zeros((C, self.encoder.dim), dtype=grad_dtype, device=f["input_ids"].device)
        return buf

    @staticmethod
    def _load(buf: dict, batch: MiniBatch) -> None:
        buf["input_ids"].copy_(batch.features["input_ids"])
        buf["attention_mask"].copy_(batch.features["attention_mask"])
        keys = batch.features["dropout_keys"]  # (r or C,)
        buf["keys"][: len(keys)].copy_(keys)

    @staticmethod
    def _shape(batch: MiniBatch) -> tuple:
        device = batch.features["input_ids"].device.type
        return (*batch.features["input_ids"].shape, torch.is_autocast_enabled(device),
                torch.get_autocast_dtype(device))

    def _autocast(self, device: torch.device):
        """The current autocast state, without the weight-cast cache."""
        return torch.autocast(device.type, dtype=torch.get_autocast_dtype(device.type),
                              enabled=torch.is_autocast_enabled(device.type), cache_enabled=False)

    def _features(self, buf: dict) -> dict:
        return {"input_ids": buf["input_ids"], "attention_mask": buf["attention_mask"], "dropout_keys": buf["keys"]}

    # ------------------------------------------------------------------------------------------ pass 1
    def forward(self, batch: MiniBatch) -> torch.Tensor:
        """Pass 1: the chunk's embeddings without autograd → (r, D), a fresh tensor."""
        key = self._shape(batch)
        if key not in self.first_graphs:
            device = batch.features["input_ids"].device
            buf = self._buffers(batch)
            self._load(buf, batch)
            autocast = self._autocast(device)

            def fn(_accumulate: bool) -> torch.Tensor:
                with torch.no_grad(), autocast:
                    return self.encoder(self._features(buf))  # (C, D)

            self.first_graphs[key] = (ShapeGraph(fn, self._capturing(device), self.pool), buf)
        graph, buf = self.first_graphs[key]
        self._load(buf, batch)
        return graph.run()[: len(batch.texts)].clone()  # (r, D): the next replay overwrites the static output

    # ------------------------------------------------------------------------------------------ pass 3
    def backward(self, batch: MiniBatch, grad: torch.Tensor) -> None:
        """Pass 3 for the chunk: forward with autograd, then the backward of ⟨out, g⟩ for its cache rows g (r, D),
        replayed from the graph of its shape (captured now if new), adding the parameter gradients into the
        accumulators; the empty rows get no gradient. Call it under pass 3's autocast."""
        graph, buf = self._backward_graph(batch, grad.dtype)
        self._load(buf, batch)
        r = len(batch.texts)
        buf["grad"][:r].copy_(grad)
        buf["grad"][r:].zero_()
        graph.run()

    def _backward_graph(self, batch: MiniBatch, dtype: torch.dtype) -> tuple[ShapeGraph, dict]:
        key = self._shape(batch)
        if self.acc is None:
            self.acc = [torch.zeros_like(p) for p in self.params]
        if key not in self.again_graphs:
            device = batch.features["input_ids"].device
            buf = self._buffers(batch, dtype)
            self._load(buf, batch)
            autocast = self._autocast(device)

            def fn(accumulate: bool) -> None:
                with torch.enable_grad(), autocast:
                    out = self.encoder(self._features(buf))  # (C, D)
                grads = torch.autograd.grad(out, self.params, buf["grad"].to(out.dtype), allow_unused=True)
                if accumulate:
                    used = [(a, g) for a, g in zip(self.acc, grads) if g is not None]
                    torch._foreach_add_([a for a, _ in used], [g for _, g in used])

            self.again_graphs[key] = (ShapeGraph(fn, self._capturing(device), self.pool), buf)
        return self.again_graphs[key]

    def flush(self) -> None:
        """Add the accumulators into the parameters' `.grad` (creating it where there is none), then zero them."""
        if self.acc is None:
            return
        existing = [(p, a) for p, a in zip(self.params, self.acc) if p.grad is not None]
        if existing:
            torch._foreach_add_([p.grad for p, _ in existing], [a for _, a in existing])
        for p, a in zip(self.params, self.acc):
            if p.grad is None:
                p.grad = a.clone()
        torch._foreach_zero_(self.acc)
