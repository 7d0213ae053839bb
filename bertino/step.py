"""One training step's gradient: a batch of one task → its loss, and the gradient in the parameters' `.grad`.

Shapes: B rows in this rank's batch, n columns of text per row, T = n·B texts, C texts per mini-batch, D dim.

    rows of one task ─TaskData.batch→ texts (T,) ─tokenize once→ PackedTokenIds ─→
        a loss trained with GradCache (`cached_mnrl`):
            mini-batches of C texts → grad_cache.grad_cache_step                   (`fast` None: the textbook)
                                    → fast.grad_cache_step, the same passes with the speed-ups' switches
        any other loss: `full_batch`, one padded forward of all T texts → loss → scaled backward

With keyed dropout masks every text carries its key (seed, step, its place in the GLOBAL batch: keyed_dropout.py)
into the features, so its masks are the same in any mini-batch, in the full batch and on any rank.

`train.py` and `python -m bertino.check` get their `Step` from the same builder (bertino/build.py), so what the
check proves is what training runs; the check's full-batch reference is `loss_and_gradient(..., full_batch=True)`
of the same Step: the same loss from the registry (bertino/losses.py), computed in one plain forward/backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .batching import PackedTokenIds
from .encoder import SentenceEncoder
from .grad_cache import Autocast, LossFn, MiniBatch, grad_cache_step, make_mini_batches
from .keyed_dropout import DropoutKeys, global_text_index, text_keys
from .objectives import Objective


@dataclass(frozen=True)
class Step:
    """What a step needs besides its batch; built once per run by `build.build_step`."""

    encoder: SentenceEncoder
    model: nn.Module  # the encoder, or DistributedDataParallel around it
    objectives: dict[str, Objective]  # task name → its loss (the cross-rank gather included)
    grad_cache_tasks: frozenset[str]  # the tasks trained with GradCache
    device: torch.device
    autocast: Autocast  # around every forward; a no-op in fp32
    scaler: torch.amp.GradScaler  # fp16's loss scaling; disabled (the identity) otherwise
    mini_batch_size: int  # texts per GradCache mini-batch (train.mini_batch_size, or the one that fits the GPU)
    seed: int  # train.seed: the keyed masks' seed
    dropout_keys: DropoutKeys | None = None  # keyed dropout masks are installed (keyed_dropout.py), or None
    fast: object | None = None  # the speed-ups: a FastGradCache (bertino/speedups/fast_grad_cache.py); None: the textbook
    rank: int = 0
    world_size: int = 1

    def loss_and_gradient(self, task_name: str, data, rows: Sequence[int], step: int, parts: dict | None = None,
                          full_batch: bool = False) -> torch.Tensor:
        """Encode the batch `rows` of one task (its `TaskData`) at optimizer step `step`, compute its loss and
        backpropagate the scaled loss → the loss () (detached, unscaled). `parts` receives the unweighted loss at
        each Matryoshka dim. `full_batch`: one plain forward/backward even for a GradCache task (the reference)."""
        texts, scores = data.batch(rows)  # (T,) column after column, the layout Objective reads; (B,) or None
        scores = None if scores is None else torch.as_tensor(scores, device=self.device)  # (B,)
        ids = PackedTokenIds.tokenize(self.encoder, texts)
        return self.loss_and_gradient_of_tokens(task_name, ids, len(data.columns), scores, step, parts, full_batch)

    def loss_and_gradient_of_tokens(self, task_name: str, ids: PackedTokenIds, n_columns: int,
                                    scores: torch.Tensor | None, step: int, parts: dict | None = None,
                                    full_batch: bool = False) -> torch.Tensor:
        """`loss_and_gradient` of a batch already tokenized: T = n_columns · B texts, column after column."""
        keys = self.text_keys(n_columns, len(ids) // n_columns, step)  # (T,) or None

        def loss_fn(reps: torch.Tensor) -> torch.Tensor:  # reps (T, D) → ()
            return self.objectives[task_name](reps, n_columns, scores, parts)

        if full_batch or task_name not in self.grad_cache_tasks:
            return self.full_batch(ids, keys, loss_fn)
        batches = self.mini_batches(ids, keys)
        if self.fast is None:  # the textbook: bertino/grad_cache.py
            return grad_cache_step(self.model, batches, loss_fn, self.scaler.scale, self.autocast)
        first_pass = self.fast.first_pass_batches(ids, self.pad_id, self.device, keys)
        return self.fast.grad_cache_step(self.model, batches, loss_fn, self.scaler.scale, self.autocast, first_pass)

    @property
    def pad_id(self) -> int:
        return self.encoder.tokenizer.pad_token_id

    def text_keys(self, n_columns: int, rows: int, step: int) -> torch.Tensor | None:
        """Keyed masks: each text's key (T,), by its place in the GLOBAL batch (on the host); else None."""
        if self.dropout_keys is None:
            return None
        return text_keys(self.seed, step, global_text_index(n_columns, rows, self.rank, self.world_size))

    def mini_batches(self, ids: PackedTokenIds, keys: torch.Tensor | None) -> list[MiniBatch]:
        """The GradCache mini-batches of a batch's texts (pass 3's; the speed-ups may cut them otherwise)."""
        if self.fast is None:
            return make_mini_batches(ids, self.mini_batch_size, self.pad_id, self.device, text_keys=keys)
        return self.fast.mini_batches(ids, self.mini_batch_size, self.pad_id, self.device, keys)

    def full_batch(self, ids: PackedTokenIds, keys: torch.Tensor | None, loss_fn: LossFn) -> torch.Tensor:
        """The plain path: one forward of all T texts padded together, the loss, one scaled backward → loss ()."""
        features = {k: v.to(self.device) for k, v in ids.pad(range(len(ids)), self.pad_id).items()}  # (T, L)
        if keys is not None:
            features["dropout_keys"] = keys.to(self.device)  # (T,)
        with self.autocast():
            reps = self.model(features)  # (T, D)
        loss = loss_fn(reps)
        self.scaler.scale(loss).backward()
        return loss.detach()
