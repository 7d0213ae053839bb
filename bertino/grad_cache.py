"""GradCache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup",
arXiv:2101.06983): the gradient of a batch-level contrastive loss with the activation memory of one mini-batch.

Shapes: T texts in the logical batch (all columns together), C texts per mini-batch, L a mini-batch's longest
sequence, D embedding dim, θ the encoder's parameters.

A contrastive loss couples every example of the batch, so it cannot be split into per-mini-batch losses. But it
depends on θ only through the embeddings e = f_θ(x) (T, D). The chain rule splits the gradient there:

    ∂L/∂θ = Σ_t (∂e_t/∂θ)ᵀ · ∂L/∂e_t = Σ_chunks ∂/∂θ ⟨ f_θ(x_chunk), g_chunk ⟩,   g = ∂L/∂e  (the "cache")

so three passes give the exact full-batch gradient:

  1. `forward_no_grad`  — embed every mini-batch without autograd (no activations kept); snapshot the RNG first.
  2. `build_cache`      — evaluate the loss on the detached embeddings (T, D) and backpropagate to them only:
                          g = ∂(scale · L)/∂e. Everything the loss does is inside g: Matryoshka weights (g = Σ_m
                          w_m ∂L_m/∂e), a GradScaler's loss scale, the all-gather of candidates across ranks.
  3. `forward_backward` — re-run each mini-batch WITH autograd, replaying its RNG snapshot so dropout draws the same
                          masks, and backpropagate ⟨e_chunk, g_chunk⟩: its gradient is J_chunkᵀ g_chunk.

Cost: pass 1 ≈ one forward, pass 3 ≈ forward + backward (≈ 3 forwards): ≈ 4 forward-equivalents against ≈ 3 for
a full-batch step, a floor of ≈ 1.33×. Pass 1's LAST mini-batch keeps its graph, which adds no live tensors to the
peak (it is backpropagated first in pass 3, where classic GradCache would rebuild the same graph), so n − 1 chunks
are recomputed. `keep_graphs=m` trades memory back for time: m more mini-batches keep their autograd graph from pass 1
and are not recomputed (m = 0: classic GradCache's peak memory).

`tape_linears` (off by default) trades a little memory for much of pass 3's forward: pass 1 records the outputs of
the named linear layers, pass 3 replays them instead of multiplying again (see linear_tape.py for the argument).

A cost the full batch pays once and GradCache once per mini-batch: the dense gradient of an embedding table, a
zero-filled (V, D) tensor per backward then added into `.grad` (47 MB each for MiniLM's 30522 × 384 word table).
So every backward but the last produces SPARSE gradients for the tables (the rows of the mini-batch's tokens, when
they are fewer than the table's rows: `_sparse_for`); the last backward is dense, and autograd's accumulation of
dense + sparse gives a dense `.grad` again, so the optimizer, clipping and DDP (whose all-reduce happens in that
last backward) see a plain dense gradient. `sparse_embeddings=()` turns this off.

Dropout: masks depend on how the batch is chunked (each mini-batch draws its own random numbers), so with dropout
on, GradCache computes exactly the gradient of the loss under the masks its mini-batch forwards drew — the same
function of the same masks as a full-batch graph built from those mini-batch forwards — not the masks one big
forward would draw. With dropout off it equals one plain full-batch forward/backward.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, ContextManager, Sequence

import torch
from torch import nn

from .linear_tape import LinearTape


# ------------------------------------------------------------------------------------------------ mini-batches
@dataclass
class MiniBatches:
    """A logical batch of T texts cut into mini-batches.

    features[i]: `input_ids`/`attention_mask` (C_i, L_i), padded to that mini-batch's own longest text.
    order (T,): mini-batch outputs concatenated give the texts `order[0], order[1], ...`, so
    `reps[order] = cat(outputs)` puts the embeddings back in text order.
    """

    features: list[dict[str, torch.Tensor]]
    order: torch.Tensor

    def __len__(self) -> int:
        return len(self.features)

    @property
    def sizes(self) -> list[int]:
        return [f["input_ids"].shape[0] for f in self.features]


def pad_batch(token_ids: Sequence[Sequence[int]], rows: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """The texts `rows` of `token_ids`, padded to their own longest → input_ids, attention_mask (C, L)."""
    L = max(len(token_ids[r]) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)  # (C, L)
    mask = torch.zeros((len(rows), L), dtype=torch.long)  # (C, L)
    for i, r in enumerate(rows):
        ids[i, : len(token_ids[r])] = torch.as_tensor(token_ids[r])
        mask[i, : len(token_ids[r])] = 1
    return {"input_ids": ids, "attention_mask": mask}


def length_order(token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """Text indices sorted by token count, shortest first, ties in text order → (T,)."""
    lengths = torch.tensor([len(t) for t in token_ids])  # (T,)
    return torch.argsort(lengths, stable=True)


def make_mini_batches(
    token_ids: Sequence[Sequence[int]],
    mini_batch_size: int,
    pad_id: int,
    device: torch.device | str = "cpu",
    sort_by_length: bool = True,
) -> MiniBatches:
    """Token id lists of T texts → mini-batches of at most `mini_batch_size` texts.

    With `sort_by_length`, texts are grouped by token count (length-aware chunking): a mini-batch of short queries
    pads to a short length instead of to the longest passage of the batch. The loss never sees this order.
    Shortest first, with the one smaller mini-batch (when C does not divide T) first too, so the LAST mini-batch is
    a full one of the longest texts: the one whose graph `grad_cache_step` keeps for free (`keep_last`).
    """
    T = len(token_ids)
    order = length_order(token_ids) if sort_by_length else torch.arange(T)  # (T,)
    first = T - (math.ceil(T / mini_batch_size) - 1) * mini_batch_size  # size of the first mini-batch
    features = []
    for start, end in zip([0, *range(first, T, mini_batch_size)], [*range(first, T, mini_batch_size), T]):
        batch = pad_batch(token_ids, order[start:end].tolist(), pad_id)
        features.append({k: v.to(device, non_blocking=True) for k, v in batch.items()})
    return MiniBatches(features, order.to(device))


# ------------------------------------------------------------------------------------------------ RNG replay
class RandContext:
    """Snapshot the RNG at construction; `with ctx:` replays that state and restores the outer stream afterwards.

    Why: pass 3 must see the dropout masks that pass 1 drew. The snapshot includes the CUDA generator of the device
    the MODEL runs on. Snapshotting only the devices of the input tensors misses GPU dropout when inputs sit
    on the CPU, and silently gives wrong gradients.
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
        assert self._fork is not None
        self._fork.__exit__(*exc)
        self._fork = None


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ------------------------------------------------------------------------------------------------ the three passes
@dataclass
class FirstPass:
    """What pass 1 hands to passes 2 and 3."""

    reps: torch.Tensor  # (T, D) detached embeddings, text order
    rng_states: list[RandContext | None]  # one per mini-batch; None where the graph was kept
    kept: list[torch.Tensor | None]  # (C_i, D) outputs WITH autograd graph for the last `keep_graphs` mini-batches
    tapes: list[LinearTape | None]  # recorded linear outputs per recomputed mini-batch (None: no tape)


def forward_no_grad(
    model: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    batches: MiniBatches,
    keep_graphs: int = 0,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
    tape_linears: Sequence[str] = (),
    sparse_embeddings: Sequence[nn.Embedding] = (),
) -> FirstPass:
    """Pass 1: embed every mini-batch; no autograd except for the LAST `keep_graphs` mini-batches.

    The kept ones come last so that their graphs live only from the end of pass 1 to the start of pass 3, which
    backpropagates them first: one kept graph holds no more live memory than classic GradCache's recomputation.
    `model` is the bare encoder (not a DDP wrapper). One `autocast()` context spans the whole pass, so autocast
    casts each weight to low precision once per pass rather than once per mini-batch.
    `tape_linears`: names of the linear layers whose outputs are recorded for pass 3 (linear_tape.py).
    `sparse_embeddings`: as in `forward_backward`, for the kept graphs (dense for the one pass 3 ends with).
    """
    device = _device_of(model)
    n = len(batches)
    outputs, rng_states, kept, tapes = [], [], [], []
    with autocast():
        for i, features in enumerate(batches.features):
            if i >= n - keep_graphs:
                last_backward = keep_graphs >= n and i == n - 1  # see forward_backward's order
                with _sparse_grads(_sparse_for(sparse_embeddings, features, not last_backward)):
                    out = model(features)  # (C, D), graph kept: pass 3 backpropagates it directly
                kept.append(out)
                rng_states.append(None)
                tapes.append(None)
                outputs.append(out.detach())
            else:
                rng_states.append(RandContext(device))  # snapshot BEFORE the forward that draws dropout masks
                tape = LinearTape(tuple(tape_linears)) if tape_linears else None
                with torch.no_grad(), (tape.recording() if tape else contextlib.nullcontext()):
                    outputs.append(model(features))  # (C, D)
                kept.append(None)
                tapes.append(tape)
    sorted_reps = torch.cat(outputs)  # (T, D), mini-batch order
    reps = torch.empty_like(sorted_reps)
    reps[batches.order] = sorted_reps  # (T, D), text order
    return FirstPass(reps, rng_states, kept, tapes)


def build_cache(
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    reps: torch.Tensor,
    scale_fn: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 2: loss on the detached embeddings reps (T, D) and the cache g = ∂ scale_fn(loss) / ∂reps (T, D).

    `scale_fn` is where a GradScaler enters (`scaler.scale`): the cache then carries the loss scale, so every
    parameter gradient of pass 3 is scaled exactly as one scaled full-batch backward would scale it.
    Returns the unscaled loss (detached) and the cache.
    """
    reps = reps.detach().requires_grad_()
    loss = loss_fn(reps)  # ()
    scale_fn(loss).backward()
    return loss.detach(), reps.grad  # (), (T, D)


def forward_backward(
    model: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    batches: MiniBatches,
    cache: torch.Tensor,
    first: FirstPass,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
    sparse_embeddings: Sequence[nn.Embedding] = (),
) -> None:
    """Pass 3: accumulate Σ_chunks J_chunkᵀ g_chunk into the parameters' `.grad`.

    Order: the kept graphs first (freeing them), then the recomputed mini-batches.
    `model` may be a DDP wrapper: every backward but the last runs under `no_sync()`, so gradients are all-reduced
    once, in the last backward (one all-reduce per step instead of one per mini-batch).
    `sparse_embeddings`: tables whose gradient is accumulated sparsely until the last backward (module docstring);
    a table stays dense for a mini-batch with at least as many tokens as it has rows (sparse would not be smaller).
    """
    n = len(batches)
    caches = cache[batches.order].split(batches.sizes)  # (C_i, D) each, mini-batch order
    no_sync = getattr(model, "no_sync", None)
    order = [i for i in range(n) if first.kept[i] is not None] + [i for i in range(n) if first.kept[i] is None]
    with autocast():  # one context for the pass: weight casts are cached across mini-batches
        for step, i in enumerate(order):
            last = step == n - 1
            sync = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
            with sync:
                if first.kept[i] is not None:
                    out = first.kept[i]  # graph from pass 1
                    first.kept[i] = None  # the graph is freed by this backward
                else:
                    sparse = _sparse_for(sparse_embeddings, batches.features[i], not last)
                    tape = first.tapes[i].replaying() if first.tapes[i] else contextlib.nullcontext()
                    with first.rng_states[i], tape, _sparse_grads(sparse):
                        out = model(batches.features[i])  # (C, D), same dropout masks as pass 1
                # ∂⟨out, g⟩/∂θ = J_θᵀ g: backward with the cached gradient as the output gradient.
                out.backward(gradient=caches[i].to(out.dtype))
    first.kept.clear()  # free the kept graphs' references
    first.tapes.clear()


def _sparse_for(embeddings: Sequence[nn.Embedding], features: dict[str, torch.Tensor], allowed: bool):
    """The tables whose gradient this mini-batch makes sparse: fewer tokens than rows, and not the last backward."""
    tokens = features["input_ids"].numel()
    return [e for e in embeddings if tokens < e.num_embeddings] if allowed else []


@contextlib.contextmanager
def _sparse_grads(embeddings: Sequence[nn.Embedding]):
    """Within the block, these embeddings' forwards record sparse-gradient backwards (`nn.Embedding.sparse`)."""
    before = [e.sparse for e in embeddings]
    for e in embeddings:
        e.sparse = True
    try:
        yield
    finally:
        for e, flag in zip(embeddings, before):
            e.sparse = flag


def embedding_tables(encoder: nn.Module) -> list[nn.Embedding]:
    """The encoder's `nn.Embedding` modules (word and position tables)."""
    return [m for m in encoder.modules() if isinstance(m, nn.Embedding)]


def grad_cache_step(
    encoder: nn.Module,
    model: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    batches: MiniBatches,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    scale_fn: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss,
    keep_graphs: int = 0,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
    sparse_embeddings: Sequence[nn.Embedding] | None = None,
    tape_linears: Sequence[str] = (),
    keep_last: bool = True,
) -> torch.Tensor:
    """The three passes in order. `encoder` is the bare module (pass 1), `model` the (possibly DDP) one (pass 3).

    `keep_graphs`: the memory budget, in mini-batch graphs kept beyond classic GradCache's peak.
    `keep_last`: also keep the graph of pass 1's last mini-batch (the longest texts). It adds no live tensors to
    the peak: it lives from the end of pass 1 to the first backward of pass 3, and classic GradCache holds the same
    graph while recomputing that chunk. So keep_graphs=0 recomputes n − 1 chunks at classic GradCache's peak
    (measured RSS: +10% at C=8 from allocator fragmentation, none at C=32; docs/gradcache.md §6.6).
    Under DDP at least one mini-batch is recomputed through the wrapper, so that the last backward syncs.
    `sparse_embeddings`: None picks every `nn.Embedding` of the encoder; () turns the sparse accumulation off.
    `tape_linears`: linear layers whose pass-1 outputs pass 3 replays (e.g. `linear_tape.DEFAULT_TAPED`); () = off.
    Returns the loss (detached, unscaled).
    """
    n = len(batches)
    keep = min(keep_graphs + int(keep_last), n)
    if model is not encoder:
        keep = min(keep, n - 1)
    if sparse_embeddings is None:
        sparse_embeddings = embedding_tables(encoder)
    first = forward_no_grad(encoder, batches, keep, autocast, tape_linears, sparse_embeddings)
    loss, cache = build_cache(loss_fn, first.reps, scale_fn)
    forward_backward(model, batches, cache, first, autocast, sparse_embeddings)
    return loss
