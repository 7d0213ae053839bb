"""GradCache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup",
arXiv:2101.06983): the gradient of a batch-level contrastive loss with the activation memory of one mini-batch.

Shapes: T texts in the logical batch (all columns together), C texts per mini-batch, L a mini-batch's longest
sequence, D embedding dim, θ the encoder's parameters.

A contrastive loss couples every text of the batch, so it cannot be split into per-mini-batch losses. But it
depends on θ only through the embeddings e = f_θ(x) (T, D), and the chain rule splits the gradient there:

    ∂L/∂θ = Σ_t (∂e_t/∂θ)ᵀ · ∂L/∂e_t = Σ_chunks ∂/∂θ ⟨ f_θ(x_chunk), g_chunk ⟩,   g = ∂L/∂e  (the "cache")

so three passes give the exact full-batch gradient:

  1. `forward_no_grad`  — embed every mini-batch without autograd; snapshot the RNG first (`RandContext`) and
                          return the snapshots: they are what pass 3 needs from pass 1.
  2. `build_cache`      — the loss on the detached embeddings, backpropagated to them only: g = ∂(scale · L)/∂e.
                          Everything the loss does ends up in g: Matryoshka weights, a GradScaler's loss scale,
                          the all-gather of candidates across ranks.
  3. `forward_backward` — re-run each mini-batch WITH autograd, replaying its RNG snapshot so dropout draws the
                          same masks, and backpropagate ⟨e_chunk, g_chunk⟩: its gradient is J_chunkᵀ g_chunk.

This file is the textbook and nothing else. The speed-ups (keep some graphs instead of recomputing them, sparse
embedding gradients, replay recorded linear outputs, CUDA graphs, a larger first pass) are the same three passes
with switches, written out side by side with these in bertino/speedups/fast_grad_cache.py.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
from torch import nn

from .batching import PackedTokenIds, length_sorted_batches

LossFn = Callable[[torch.Tensor], torch.Tensor]  # embeddings (T, D) → loss (), or a loss → its scaled value
Autocast = Callable[[], ContextManager]  # e.g. partial(torch.autocast, "cuda", dtype=torch.float16)


@dataclass
class MiniBatch:
    features: dict[str, torch.Tensor]  # input_ids, attention_mask (C, L), padded to this mini-batch's longest text;
    #                                    with keyed dropout masks also dropout_keys (C,) (keyed_dropout.py)
    texts: torch.Tensor  # (C,) which texts of the logical batch these are


def make_mini_batches(ids: PackedTokenIds, size: int, pad_id: int, device="cpu",
                      text_keys: torch.Tensor | None = None) -> list[MiniBatch]:
    """The T texts of `ids` in mini-batches of at most `size`, grouped by token count, shortest first.

    A mini-batch of short queries then pads to a short length, not to the longest passage of the batch. The one
    smaller mini-batch (when size does not divide T) comes first, so the LAST one is a full one of the longest
    texts: the graph the fast path can keep for free. The loss never sees this order (`texts` maps it back).
    `text_keys` (T,): the texts' keyed-dropout keys, if the masks are keyed; each mini-batch carries its own.
    """
    batches = []
    for rows in length_sorted_batches(ids.lengths, size, shortest_first=True):
        features = {k: v.to(device, non_blocking=True) for k, v in ids.pad(rows, pad_id).items()}
        texts = torch.as_tensor(rows, device=device)
        if text_keys is not None:
            features["dropout_keys"] = text_keys.to(device)[texts]  # (C,)
        batches.append(MiniBatch(features, texts))
    return batches


class RandContext:
    """Snapshot the RNG at construction; `with ctx:` replays that state and restores the outer stream afterwards.

    Why: pass 3 must see the dropout masks that pass 1 drew. The snapshot includes the CUDA generator of the device
    the MODEL runs on: snapshotting only the devices of the input tensors misses GPU dropout when inputs sit on the
    CPU, and silently gives wrong gradients (sentence-transformers PR #3862).
    """

    def __init__(self, device: torch.device):
        self.cpu_state = torch.get_rng_state()
        self.cuda_devices = [device] if device.type == "cuda" else []
        self.cuda_states = [torch.cuda.get_rng_state(d) for d in self.cuda_devices]
        self._fork: contextlib.AbstractContextManager | None = None

    def __enter__(self) -> None:
        # fork_rng saves the current states and restores them on exit: replaying does not disturb the caller's RNG.
        self._fork = torch.random.fork_rng(devices=self.cuda_devices)
        self._fork.__enter__()
        torch.set_rng_state(self.cpu_state)
        for d, state in zip(self.cuda_devices, self.cuda_states):
            torch.cuda.set_rng_state(state, d)

    def __exit__(self, *exc) -> None:
        self._fork.__exit__(*exc)
        self._fork = None


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (pass 1 runs it: no gradient to synchronise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def no_sync(model: nn.Module, skip: bool) -> ContextManager:
    """DDP's `no_sync()` when `skip` (gradients accumulate locally, no all-reduce), else nothing."""
    return model.no_sync() if skip and hasattr(model, "no_sync") else contextlib.nullcontext()


def in_text_order(outputs: list[torch.Tensor], batches: list[MiniBatch]) -> torch.Tensor:
    """The mini-batches' outputs (each (C, D)) → one (T, D) tensor whose row t is text t."""
    stacked = torch.cat(outputs)  # (T, D), mini-batch order
    reps = torch.empty_like(stacked)
    reps[torch.cat([b.texts for b in batches])] = stacked
    return reps


def forward_no_grad(module: nn.Module, batches: list[MiniBatch], autocast: Autocast = contextlib.nullcontext
                    ) -> tuple[torch.Tensor, list[RandContext]]:
    """Pass 1: every mini-batch's embeddings, detached, in text order (T, D), and the RNG state each forward
    started from (one per mini-batch: pass 3 replays them).

    One `autocast()` context spans the pass, so autocast casts each weight to low precision once per pass.
    """
    device = next(module.parameters()).device
    outputs, rng_states = [], []
    with autocast(), torch.no_grad():
        for batch in batches:
            rng_states.append(RandContext(device))  # BEFORE the forward that draws the masks
            outputs.append(module(batch.features))  # (C, D)
    return in_text_order(outputs, batches), rng_states


def build_cache(loss_fn: LossFn, reps: torch.Tensor, scale_fn: LossFn = lambda loss: loss
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 2: the loss on reps (T, D) and the cache g = ∂ scale_fn(loss) / ∂reps (T, D).

    `scale_fn` is where a GradScaler enters (`scaler.scale`): the cache then carries the loss scale, so every
    parameter gradient of pass 3 is scaled exactly as one scaled full-batch backward would scale it.
    Returns the unscaled loss (detached) and the cache.
    """
    reps = reps.detach().requires_grad_()
    loss = loss_fn(reps)  # ()
    scale_fn(loss).backward()
    return loss.detach(), reps.grad  # (), (T, D)


def forward_backward(model: nn.Module, batches: list[MiniBatch], cache: torch.Tensor,
                     rng_states: list[RandContext], autocast: Autocast = contextlib.nullcontext) -> None:
    """Pass 3: accumulate Σ_chunks J_chunkᵀ g_chunk into the parameters' `.grad`.

    `model` may be a DistributedDataParallel wrapper: every backward but the last runs under `no_sync()`, so the
    gradients are all-reduced once, in the last backward (not once per mini-batch: slow, and it can hang).
    """
    with autocast():
        for i, (batch, rng) in enumerate(zip(batches, rng_states)):
            with no_sync(model, i < len(batches) - 1):
                with rng:  # pass 1's RNG state: dropout draws pass 1's masks
                    out = model(batch.features)  # (C, D), with autograd
                # ∂⟨out, g⟩/∂θ = J_θᵀ g: backward with the cached gradient as the output gradient.
                out.backward(gradient=cache[batch.texts].to(out.dtype))


def grad_cache_step(model: nn.Module, batches: list[MiniBatch], loss_fn: LossFn,
                    scale_fn: LossFn = lambda loss: loss, autocast: Autocast = contextlib.nullcontext
                    ) -> torch.Tensor:
    """The three passes → the loss (detached, unscaled); the gradient is left in the parameters' `.grad`.

    `model`: the encoder, or DistributedDataParallel around it (pass 1 runs the module inside it).
    """
    reps, rng_states = forward_no_grad(unwrap(model), batches, autocast)  # pass 1
    loss, cache = build_cache(loss_fn, reps, scale_fn)  # pass 2
    forward_backward(model, batches, cache, rng_states, autocast)  # pass 3
    return loss
