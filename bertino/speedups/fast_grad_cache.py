"""GradCache with its speed-ups: the textbook's three passes (bertino/grad_cache.py) with every switch written out.

Shapes: n mini-batches in a step, C rows of a mini-batch, r ≤ C its texts, T texts in the step, D embedding dim.

Read it beside grad_cache.py: `forward_no_grad`, `forward_backward` and `grad_cache_step` here have the textbook's
structure line for line. What differs is decided once per step, as data, by `plan_step` (a `Plan`: which
mini-batches keep their graph, pass 3's order, which backwards are sparse, which run as CUDA graphs), and what one
pass leaves for the other is a `Carry` per mini-batch, returned by pass 1 and handed to pass 3 — as the textbook's
pass 1 returns its RNG snapshots. The switches (settings.py names them and their costs):

    switch                     pass 1, mini-batch i                     pass 3, mini-batch i (in plan.order)
    ─────────────────────────  ───────────────────────────────────────  ─────────────────────────────────────────
    (none: the textbook)       RNG snapshot, no-grad forward            replay the snapshot, forward, backward
    keep_last_graph,           i kept: forward WITH autograd, keep      i kept: backward of the kept output,
      memory_budget              the output (no snapshot)                 first (nothing recomputed)
    linear_tape                record the linear layers' outputs        replay them (no matmul recomputed)
    keep_dropout_masks         record the dropout masks (cpu_dropout)   replay them (no random bits drawn again)
    sparse_embedding_grads     i ≠ last backward: sparse lookups        i ≠ last backward: sparse lookups
    embedding_grad_buffer      (the last one too)                       dense .grad buffers attached first; every
                                                                          backward sparse (the last one too)
    keyed dropout masks        no RNG snapshot (masks are the texts')   nothing replayed
    length_multiple /          mini-batches of repeating shapes, with   the same; the empty rows' outputs cut off
      mini_batch_tokens          empty rows (static_shapes.py)            (`real_rows`): zero gradient
    cuda_graphs                replay the shape's no-grad graph         replay its forward + backward graph into
                                                                          accumulators; flush into .grad after
                                                                          the last one (cuda_graphs.py)
    first_pass_mini_batch_size pass 1 over larger chunks of the same    (nothing carried: keyed masks)
                                 texts
    cpu_dropout,               (module replacement: the masks' draws, installed by `install_speedups`)
      lazy_mask_bits

Why each gives the textbook's gradient: ∂L/∂θ = Σ_chunks J_chunkᵀ g_chunk holds for any partition of the texts and
any order of the sum (docs/gradcache.md §1); a kept graph IS the graph pass 3 would rebuild; a replayed linear
output equals the recomputed one bit for bit; a sparse and a dense gradient of an embedding lookup are the same
numbers, and so is a replayed dropout mask the mask the RNG replay would draw. tests/test_speedups.py compares every
combination with grad_cache.grad_cache_step (float64, 1e-10).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from ..batching import PackedTokenIds
from ..grad_cache import (Autocast, LossFn, MiniBatch, RandContext, build_cache, in_text_order, make_mini_batches,
                          no_sync, unwrap)
from ..keyed_dropout import DropoutKeys
from .cpu_dropout import install_cpu_dropout
from .cuda_graphs import GraphedChunks
from .heap import keep_freed_memory
from .linear_tape import install_linear_tape
from .onednn_linear import install_onednn_linear, onednn_wanted
from .settings import SpeedupsConfig
from .sparse_embeddings import SparseGradSwitch, install_sparse_embedding_grads
from .static_shapes import StaticShapes, static_mini_batches
from .tapes import Tape, TapeDeck


@dataclass
class FastGradCache:
    """The speed-ups installed into one encoder, and their settings: what `grad_cache_step` switches on."""

    settings: SpeedupsConfig
    max_length: int  # the encoder's max_seq_length: the longest length bucket
    dropout_keys: DropoutKeys | None  # keyed masks (no RNG to replay), or None: torch's stream
    sparse: SparseGradSwitch | None = None  # sparse_embedding_grads
    tape: TapeDeck | None = None  # linear_tape
    graphs: GraphedChunks | None = None  # cuda_graphs
    masks: TapeDeck | None = None  # keep_dropout_masks: the deck of the installed BitsDropouts

    def shapes(self, mini_batch_size: int) -> StaticShapes:
        s = self.settings
        return StaticShapes(self.max_length, mini_batch_size, s.length_multiple, s.mini_batch_tokens,
                            pad_rows=s.cuda_graphs)

    def mini_batches(self, ids: PackedTokenIds, size: int, pad_id: int, device: torch.device,
                     text_keys: torch.Tensor | None) -> list[MiniBatch]:
        """Pass 3's mini-batches: static shapes when asked for (static_shapes.py), else the textbook's."""
        shapes = self.shapes(size)
        if shapes.active:
            return static_mini_batches(ids, shapes, pad_id, device, text_keys=text_keys)
        return make_mini_batches(ids, size, pad_id, device, text_keys=text_keys)

    def first_pass_batches(self, ids: PackedTokenIds, pad_id: int, device: torch.device,
                           text_keys: torch.Tensor | None) -> list[MiniBatch] | None:
        """Pass 1's own (larger) mini-batches with `first_pass_mini_batch_size`; None: pass 3's."""
        size = self.settings.first_pass_mini_batch_size
        return None if size is None else make_mini_batches(ids, size, pad_id, device, text_keys=text_keys)

    def describe(self, device: torch.device) -> list[str]:
        """The switches that are on, in words (the check's header)."""
        s, on = self.settings, []
        if self.graphs is not None:
            on.append("CUDA graphs" + ("" if device.type == "cuda" else " (uncaptured on CPU)"))
        elif s.first_pass_mini_batch_size is None:
            kept = s.memory_budget + int(s.keep_last_graph)
            on.append(f"{kept} kept graph(s)" if kept else "every mini-batch recomputed")
        on += [name for name, flag in (("sparse embedding gradients", self.sparse is not None),
                                       ("linear tape", self.tape is not None)) if flag]
        if s.first_pass_mini_batch_size is not None:
            on.append(f"pass 1 in chunks of {s.first_pass_mini_batch_size}")
        if s.length_multiple:
            on.append(f"lengths padded to multiples of {s.length_multiple}")
        if s.mini_batch_tokens:
            on.append(f"{s.mini_batch_tokens} tokens per mini-batch")
        return on

    def grad_cache_step(self, model: nn.Module, batches: list[MiniBatch], loss_fn: LossFn, scale_fn: LossFn,
                        autocast: Autocast, first_pass: list[MiniBatch] | None = None) -> torch.Tensor:
        return grad_cache_step(model, batches, loss_fn, scale_fn, autocast, self, first_pass)


def install_speedups(encoder: nn.Module, settings: SpeedupsConfig, dropout_keys: DropoutKeys | None
                     ) -> FastGradCache:
    """Install the module replacements `settings` asks for into `encoder.model` (in place; each keeps the
    parameters and computes like the module it replaces in eval mode, so `encode` never sees it) → the switches."""
    model = encoder.model
    if settings.keep_freed_memory:
        keep_freed_memory()  # process-wide: malloc keeps what a step frees for the next step (heap.py)
    masks = None
    if dropout_keys is None and settings.cpu_dropout:
        masks = TapeDeck("dropout-mask tape") if settings.keep_dropout_masks else None
        install_cpu_dropout(model, masks, settings.lazy_mask_bits)  # the stream's masks drawn faster on CPU tensors
    graphs = GraphedChunks(encoder, dropout_keys, encoder.max_seq_length) if settings.cuda_graphs else None
    sparse = install_sparse_embedding_grads(model) if settings.sparse_embedding_grads else None
    smallest = onednn_wanted(settings.onednn_linear)
    if smallest is not None:
        install_onednn_linear(model, smallest)  # before the tape, whose layers then keep oneDNN's kernel
    tape = install_linear_tape(model) if settings.linear_tape else None
    return FastGradCache(settings, encoder.max_seq_length, dropout_keys, sparse, tape, graphs, masks)


# ────────────────────────────────────────────────────────────────────────────────────────────── the plan of a step
@dataclass(frozen=True)
class Plan:
    """What the switches decide for one step of n mini-batches: plain data that pass 1 and pass 3 read."""

    kept: frozenset[int]  # mini-batches whose pass-1 graph is kept instead of recomputed
    order: tuple[int, ...]  # pass 3's order: the kept graphs first, freed before anything is recomputed
    sparse: frozenset[int]  # mini-batches whose backward makes sparse embedding gradients: all but the last
    #                         (every one, into dense buffers, with embedding_grad_buffer)
    graphed: frozenset[int]  # mini-batches whose passes are CUDA-graph replays
    replay_rng: bool  # stream masks: pass 3 replays pass 1's RNG snapshots (keyed masks need none)
    tape: bool  # recomputed mini-batches replay pass 1's linear outputs
    masks: bool  # recomputed mini-batches replay pass 1's dropout masks (CPU stream masks)


def plan_step(fast: FastGradCache, n: int, distributed: bool, separate_first_pass: bool = False) -> Plan:
    """The plan of a step of n mini-batches. Under DDP the last backward goes through the wrapper (only such a
    backward all-reduces), so at least one mini-batch is recomputed, or, with graphs, run eagerly."""
    s = fast.settings
    if fast.graphs is not None:  # every mini-batch graphed; under DDP the last one eager
        return Plan(frozenset(), tuple(range(n)), frozenset(), frozenset(range(n - int(distributed))),
                    replay_rng=False, tape=False, masks=False)
    # a kept graph must be the graph of pass 3's chunk: not with a separate first pass
    m = 0 if separate_first_pass else min(s.memory_budget + int(s.keep_last_graph), n - int(distributed))
    kept = range(n - m, n)  # the last m: pass 1 ends with a full mini-batch of the longest texts
    order = (*kept, *range(n - m))
    sparse = frozenset() if fast.sparse is None else frozenset(order if s.embedding_grad_buffer else order[:-1])
    return Plan(frozenset(kept), order, sparse, frozenset(), replay_rng=fast.dropout_keys is None,
                tape=fast.tape is not None, masks=fast.masks is not None)


@dataclass
class Carry:
    """What pass 3 needs from pass 1 for one mini-batch."""

    graph: torch.Tensor | None = None  # a kept output (C, D), with its autograd graph
    rng: RandContext | None = None  # the RNG state its forward started from (stream masks)
    tape: Tape | None = field(default=None)  # its recorded linear outputs (linear_tape)
    masks: Tape | None = field(default=None)  # its recorded dropout masks (keep_dropout_masks)


def real_rows(out: torch.Tensor, batch: MiniBatch) -> torch.Tensor:
    """A mini-batch's outputs (C, D) without its empty rows (static shapes) → (r, D)."""
    r = len(batch.texts)
    return out if out.shape[0] == r else out[:r]


# ────────────────────────────────────────────────────────────────────────────────────────────── the three passes
def forward_no_grad(module: nn.Module, batches: list[MiniBatch], autocast: Autocast, fast: FastGradCache,
                    plan: Plan) -> tuple[torch.Tensor, list[Carry]]:
    """Pass 1 → every mini-batch's embeddings, detached, in text order (T, D), and each one's `Carry`."""
    device = next(module.parameters()).device
    outputs, carried = [], []
    with autocast():
        for i, batch in enumerate(batches):
            carry = Carry()
            if i in plan.graphed:
                out = fast.graphs.forward(batch)  # (r, D): a CUDA graph's replay, no autograd
            else:
                with contextlib.ExitStack() as stack:
                    if i in plan.sparse:
                        stack.enter_context(fast.sparse.sparse_for(batch.features))
                    if i in plan.kept:
                        out = carry.graph = module(batch.features)  # (C, D) WITH autograd: pass 3 backpropagates it
                    else:
                        if plan.replay_rng:
                            carry.rng = RandContext(device)  # BEFORE the forward that draws the masks
                        if plan.tape:
                            carry.tape = stack.enter_context(fast.tape.recording(Tape()))
                        if plan.masks:
                            carry.masks = stack.enter_context(fast.masks.recording(Tape()))
                        stack.enter_context(torch.no_grad())
                        out = module(batch.features)  # (C, D)
            outputs.append(real_rows(out, batch).detach())
            carried.append(carry)
    return in_text_order(outputs, batches), carried


def recompute(model: nn.Module, batch: MiniBatch, carry: Carry, fast: FastGradCache, sparse: bool) -> torch.Tensor:
    """Pass 3's forward of one mini-batch, with autograd: pass 1's masks (and linear outputs) → (C, D)."""
    with contextlib.ExitStack() as stack:
        if sparse:
            stack.enter_context(fast.sparse.sparse_for(batch.features))
        if carry.tape is not None:
            stack.enter_context(fast.tape.replaying(carry.tape))
        if carry.masks is not None:
            stack.enter_context(fast.masks.replaying(carry.masks))
        if carry.rng is not None:
            stack.enter_context(carry.rng)
        return model(batch.features)


def forward_backward(model: nn.Module, batches: list[MiniBatch], cache: torch.Tensor, carried: list[Carry],
                     autocast: Autocast, fast: FastGradCache, plan: Plan) -> None:
    """Pass 3: accumulate Σ_chunks J_chunkᵀ g_chunk into `.grad`, in `plan.order`; under DDP every backward but
    the last under `no_sync()`."""
    last = plan.order[-1]
    if last in plan.sparse:
        fast.sparse.attach_buffers()  # dense `.grad`s first: every sparse backward adds into them in place
    with autocast():
        for i in plan.order:
            batch, carry = batches[i], carried[i]
            grad = cache[batch.texts]  # (r, D)
            if i in plan.graphed:
                fast.graphs.backward(batch, grad)  # forward + backward replayed, into the accumulators
                if i == max(plan.graphed):
                    fast.graphs.flush()  # into .grad, before a DDP backward all-reduces it
                continue
            with no_sync(model, i != last):
                out, carry.graph = carry.graph, None  # a kept graph is freed by this backward
                if out is None:
                    out = recompute(model, batch, carry, fast, i in plan.sparse)
                out = real_rows(out, batch)  # (r, D)
                out.backward(gradient=grad.to(out.dtype))


def grad_cache_step(model: nn.Module, batches: list[MiniBatch], loss_fn: LossFn, scale_fn: LossFn,
                    autocast: Autocast, fast: FastGradCache, first_pass: list[MiniBatch] | None = None
                    ) -> torch.Tensor:
    """The three passes with `fast`'s switches → the loss (detached, unscaled); the gradient in `.grad`.
    `first_pass`: pass 1's own chunks of the same texts (`first_pass_mini_batch_size`, keyed masks only)."""
    distributed = isinstance(model, nn.parallel.DistributedDataParallel)
    plan = plan_step(fast, len(batches), distributed, separate_first_pass=first_pass is not None)
    if first_pass is None:
        reps, carried = forward_no_grad(unwrap(model), batches, autocast, fast, plan)  # pass 1
    else:  # pass 1 in other chunks: a text's keyed masks do not depend on its chunk, so nothing is carried
        first = plan_step(fast, len(first_pass), False, separate_first_pass=True)
        reps, _ = forward_no_grad(unwrap(model), first_pass, autocast, fast, first)
        carried = [Carry() for _ in batches]
    loss, cache = build_cache(loss_fn, reps, scale_fn)  # pass 2
    forward_backward(model, batches, cache, carried, autocast, fast, plan)  # pass 3
    return loss


def with_settings(fast: FastGradCache, **changes) -> FastGradCache:
    """The same installed speed-ups with some settings changed (the memory fit's mini-batch token budget)."""
    return dataclasses.replace(fast, settings=dataclasses.replace(fast.settings, **changes))
