"""GradCache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup",
arXiv:2101.06983): the gradient of a batch-level contrastive loss with the activation memory of one mini-batch.

Shapes: T texts in the logical batch (all columns together), C texts per mini-batch, L a mini-batch's longest
sequence, D embedding dim, θ the encoder's parameters.

A contrastive loss couples every text of the batch, so it cannot be split into per-mini-batch losses. But it
depends on θ only through the embeddings e = f_θ(x) (T, D), and the chain rule splits the gradient there:

    ∂L/∂θ = Σ_t (∂e_t/∂θ)ᵀ · ∂L/∂e_t = Σ_chunks ∂/∂θ ⟨ f_θ(x_chunk), g_chunk ⟩,   g = ∂L/∂e  (the "cache")

so three passes give the exact full-batch gradient:

  1. `forward_no_grad`  — embed every mini-batch without autograd; snapshot the RNG first (`RandContext`).
  2. `build_cache`      — the loss on the detached embeddings, backpropagated to them only: g = ∂(scale · L)/∂e.
                          Everything the loss does ends up in g: Matryoshka weights, a GradScaler's loss scale,
                          the all-gather of candidates across ranks.
  3. `forward_backward` — re-run each mini-batch WITH autograd, replaying its RNG snapshot so dropout draws the
                          same masks, and backpropagate ⟨e_chunk, g_chunk⟩: its gradient is J_chunkᵀ g_chunk.

The seam: how pass 1 runs a mini-batch and how pass 3 gets its graph back is a `Recompute` object, one per
mini-batch, gathered with the order of pass 3 in a `Plan`. This file holds the classic one (recompute everything);
bertino/speedups/grad_cache_plan.py holds the faster ones (keep some graphs, sparse embedding gradients, replay
recorded linear outputs), each proven to give the same gradient.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
from torch import nn

from .batching import PackedTokenIds, length_sorted_batches

LossFn = Callable[[torch.Tensor], torch.Tensor]  # embeddings (T, D) → loss (), or a loss → its scaled value


@dataclass
class MiniBatch:
    features: dict[str, torch.Tensor]  # input_ids, attention_mask (C, L), padded to this mini-batch's longest text
    texts: torch.Tensor  # (C,) which texts of the logical batch these are
    dropout_keys: torch.Tensor | None = None  # (C,) their keyed-dropout keys (keyed_dropout.py), if masks are keyed


def make_mini_batches(ids: PackedTokenIds, size: int, pad_id: int, device="cpu",
                      text_keys: torch.Tensor | None = None) -> list[MiniBatch]:
    """The T texts of `ids` in mini-batches of at most `size`, grouped by token count, shortest first.

    A mini-batch of short queries then pads to a short length, not to the longest passage of the batch. The one
    smaller mini-batch (when size does not divide T) comes first, so the LAST one is a full one of the longest
    texts: the graph a plan can keep for free. The loss never sees this order (`texts` maps it back).
    """
    batches = []
    for rows in length_sorted_batches(ids.lengths, size, shortest_first=True):
        features = {k: v.to(device, non_blocking=True) for k, v in ids.pad(rows, pad_id).items()}
        texts = torch.as_tensor(rows, device=device)
        batches.append(MiniBatch(features, texts, None if text_keys is None else text_keys.to(device)[texts]))
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


class Recompute:
    """Classic GradCache for one mini-batch: pass 1 keeps no graph, pass 3 runs the forward again. With dropout
    drawn from the random stream, pass 1 snapshots the RNG and pass 3 replays it, so both see the same masks; with
    keyed masks (keyed_dropout.py) the masks are the same by construction and `replay_rng=False` skips it."""

    def __init__(self, replay_rng: bool = True):
        self.replay_rng = replay_rng

    def first(self, module: nn.Module, batch: MiniBatch) -> torch.Tensor:
        if self.replay_rng:
            self.rng = RandContext(next(module.parameters()).device)  # BEFORE the forward that draws the masks
        with torch.no_grad():
            return module(batch.features)  # (C, D)

    def again(self, model: nn.Module, batch: MiniBatch) -> torch.Tensor:
        with self.rng if self.replay_rng else contextlib.nullcontext():
            return model(batch.features)  # (C, D), with autograd, the same dropout masks as pass 1


@dataclass
class Plan:
    recompute: list[Recompute]  # one per mini-batch
    backward_order: list[int]  # the order in which pass 3 visits the mini-batches


def classic_plan(n: int, distributed: bool = False) -> Plan:
    return Plan([Recompute() for _ in range(n)], list(range(n)))


def forward_no_grad(module: nn.Module, batches: list[MiniBatch], plan: Plan, autocast=contextlib.nullcontext
                    ) -> torch.Tensor:
    """Pass 1: every mini-batch's embeddings, detached, back in text order → (T, D).

    One `autocast()` context spans the pass, so autocast casts each weight to low precision once per pass.
    """
    with autocast():
        outputs = torch.cat([r.first(module, b).detach() for r, b in zip(plan.recompute, batches)])  # (T, D)
    reps = torch.empty_like(outputs)  # (T, D), text order
    reps[torch.cat([b.texts for b in batches])] = outputs
    return reps


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


def forward_backward(model: nn.Module, batches: list[MiniBatch], cache: torch.Tensor, plan: Plan,
                     autocast=contextlib.nullcontext) -> None:
    """Pass 3: accumulate Σ_chunks J_chunkᵀ g_chunk into the parameters' `.grad`.

    `model` may be a DistributedDataParallel wrapper: every backward but the last runs under `no_sync()`, so the
    gradients are all-reduced once, in the last backward (not once per mini-batch: slow, and it can hang).
    """
    last = plan.backward_order[-1]
    with autocast():
        for i in plan.backward_order:
            with model.no_sync() if i != last and hasattr(model, "no_sync") else contextlib.nullcontext():
                out = plan.recompute[i].again(model, batches[i])  # (C, D)
                # ∂⟨out, g⟩/∂θ = J_θᵀ g: backward with the cached gradient as the output gradient.
                out.backward(gradient=cache[batches[i].texts].to(out.dtype))


def grad_cache_step(model: nn.Module, batches: list[MiniBatch], loss_fn: LossFn, scale_fn: LossFn = lambda loss: loss,
                    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
                    plan: Callable[[int, bool], Plan] = classic_plan) -> torch.Tensor:
    """The three passes → the loss (detached, unscaled); the gradient is left in the parameters' `.grad`.

    `model`: the encoder, or DistributedDataParallel around it (pass 1 runs the module inside it: no gradient
    to synchronise). `plan(n_mini_batches, distributed)` says how each mini-batch is recomputed.
    """
    distributed = isinstance(model, nn.parallel.DistributedDataParallel)
    module = model.module if distributed else model
    steps = plan(len(batches), distributed)
    reps = forward_no_grad(module, batches, steps, autocast)
    loss, cache = build_cache(loss_fn, reps, scale_fn)
    forward_backward(model, batches, cache, steps, autocast)
    return loss
