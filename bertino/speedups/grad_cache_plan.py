"""Faster GradCache plans: keep some autograd graphs, sparse embedding gradients, replay the linear tape.

Shapes: n mini-batches in a step, m of them keeping their graph.

A `grad_cache.Plan` says, for each mini-batch, how pass 1 runs it and how pass 3 gets its graph back, and the
order of pass 3. Classic GradCache (`grad_cache.classic_plan`) recomputes every mini-batch in text order.
`GradCacheSpeedups` builds the plan `train.py` uses:

* **Kept graphs** (`KeepGraph`). The last m mini-batches of pass 1 run WITH autograd and keep their graph; pass 3
  backpropagates them first, then recomputes the others. A kept graph lives from the end of pass 1 to the first
  backwards of pass 3, so it costs memory only while it lives:
    - the free last graph (`keep_last`, on): pass 1 ends with a full mini-batch of the longest texts
      (`grad_cache.make_mini_batches`), and classic GradCache would hold exactly that graph while recomputing it.
      Keeping it adds no live tensors to the peak and spares one of the n recomputations.
    - the memory budget (`keep_graphs`, config `train.grad_cache_memory_budget`): m more graphs, trading memory
      back for time; m = n − 1 is the full batch computed over length-sorted chunks.
  Under DistributedDataParallel at least one mini-batch is recomputed through the wrapper, whatever the budget:
  only a backward through the wrapper all-reduces, and it must be the last one.
* **Sparse embedding gradients** (`SparseGrads`, sparse_embeddings.py): every backward but the last.
* **The linear tape** (`TapeReplay`, linear_tape.py): the recomputed mini-batches replay pass 1's linear outputs.
* **Keyed dropout masks** (`keys`, bertino/keyed_dropout.py): each mini-batch's forwards run with its texts' keys,
  and nothing is replayed (`Recompute(replay_rng=False)`): the masks are the same by construction. Then pass 1 may
  also run in other, larger chunks than pass 3 (`larger_first_pass_step`).
* **Empty rows** (`trim_rows`, static_shapes.py): mini-batches padded with empty rows have their outputs cut to
  their real texts (`TrimRows`).
* **CUDA graphs** (`graphs`, cuda_graphs.py): every mini-batch's passes are graph replays (`GraphedChunks.plan`);
  the levers above do not combine with it (the config refuses them).

Each of these gives the gradient of classic GradCache: tests/test_speedups.py compares every combination with
`classic_plan` (float64, 1e-10).
"""

from __future__ import annotations

from torch import nn

from ..grad_cache import MiniBatch, Plan, Recompute, build_cache, forward_backward, forward_no_grad
from ..keyed_dropout import DropoutKeys, WithDropoutKeys
from .cuda_graphs import GraphedChunks
from .linear_tape import TapeDeck, TapeReplay
from .sparse_embeddings import SparseGradSwitch
from .static_shapes import TrimRows


class KeepGraph(Recompute):
    """Pass 1 runs this mini-batch WITH autograd and keeps the graph; pass 3 backpropagates it as it is."""

    def first(self, module, batch):
        self.out = module(batch.features)  # (C, D), graph kept
        return self.out

    def again(self, model, batch):
        out, self.out = self.out, None  # the graph is freed by this backward
        return out


class SparseGrads(Recompute):
    """Any `Recompute`, its forwards recording sparse-gradient embedding lookups."""

    def __init__(self, inner: Recompute, switch: SparseGradSwitch):
        self.inner, self.switch = inner, switch

    def first(self, module, batch):
        with self.switch.sparse_for(batch.features):
            return self.inner.first(module, batch)

    def again(self, model, batch):
        with self.switch.sparse_for(batch.features):
            return self.inner.again(model, batch)


class GradCacheSpeedups:
    """A plan factory for `grad_cache.grad_cache_step`: `plan = GradCacheSpeedups(...)`; `plan(n, distributed)`."""

    def __init__(self, keep_graphs: int = 0, keep_last: bool = True, sparse: SparseGradSwitch | None = None,
                 tape: TapeDeck | None = None, keys: DropoutKeys | None = None, trim_rows: bool = False,
                 graphs: GraphedChunks | None = None):
        self.keep_graphs, self.keep_last, self.sparse, self.tape, self.keys = keep_graphs, keep_last, sparse, tape, keys
        self.trim_rows, self.graphs = trim_rows, graphs

    def kept(self, n: int, distributed: bool) -> int:
        """How many of the n mini-batches keep their pass-1 graph."""
        keep = min(self.keep_graphs + int(self.keep_last), n)
        return min(keep, n - 1) if distributed else keep  # ≥ 1 recomputed through the wrapper: it all-reduces

    def __call__(self, n: int, distributed: bool = False) -> Plan:
        if self.graphs is not None:
            return self.graphs.plan(n, distributed)
        m = self.kept(n, distributed)
        order = [*range(n - m, n), *range(n - m)]  # the kept graphs first: freed before anything is recomputed
        steps: list[Recompute] = []
        for i in range(n):
            step = KeepGraph() if i >= n - m else Recompute(replay_rng=self.keys is None)
            if self.tape is not None and i < n - m:
                step = TapeReplay(step, self.tape)
            if self.sparse is not None and i != order[-1]:  # the last backward stays dense
                step = SparseGrads(step, self.sparse)
            if self.keys is not None:
                step = WithDropoutKeys(step, self.keys)
            if self.trim_rows:
                step = TrimRows(step)
            steps.append(step)
        return Plan(steps, order)


def larger_first_pass_step(model, batches: list[MiniBatch], first_pass: list[MiniBatch], loss_fn, scale_fn,
                           autocast, plan: GradCacheSpeedups):
    """GradCache with pass 1 over `first_pass` — the same texts in other (larger) chunks — and pass 3 over
    `batches`. Exact only when a text's dropout masks do not depend on its chunk: keyed masks, or no dropout.

    Fewer, larger no-grad chunks cost fewer kernel launches (the GPU's bottleneck); pass 3's chunks stay small,
    which is what bounds the memory. `plan` must recompute every mini-batch (no kept graph, no tape): pass 3 then
    needs nothing from pass 1 but the cache.
    """
    if plan.keep_graphs or plan.keep_last or plan.tape is not None:
        raise ValueError("a larger first pass needs a plan that recomputes every mini-batch (no kept graph, no tape)")
    distributed = isinstance(model, nn.parallel.DistributedDataParallel)
    module = model.module if distributed else model
    reps = forward_no_grad(module, first_pass, plan(len(first_pass), False), autocast)
    loss, cache = build_cache(loss_fn, reps, scale_fn)
    forward_backward(model, batches, cache, plan(len(batches), distributed), autocast)
    return loss
