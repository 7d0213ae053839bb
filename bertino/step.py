"""One training step's gradient: a batch of one task → its loss, and the gradient in the parameters' `.grad`.

`train.py` builds a `Step` once and calls `Step.forward_backward` every step; `python -m bertino.check` calls the
very same code to prove, on the user's own config, that it equals one plain full-batch forward/backward. So what
the check proves is what training does.

    rows of one task ─column_major→ texts (n·B) ─tokenize once→ PackedTokenIds ─`Step.forward_backward_ids`→
        cached loss:  mini-batches of train.mini_batch_size texts → grad_cache_step (or larger_first_pass_step);
                      with static shapes (train.grad_cache_length_multiple / _mini_batch_tokens) the mini-batches
                      of speedups/static_shapes.py, and with CUDA graphs every loss takes this branch
        plain loss:   one padded forward of all texts → loss → scaled backward
    with keyed dropout masks, every forward runs with its texts' keys (seed, step, global index: keyed_dropout.py)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .batching import PackedTokenIds
from .encoder import SentenceEncoder
from .grad_cache import grad_cache_step, make_mini_batches
from .keyed_dropout import DropoutKeys, global_text_index, install_keyed_dropout, text_keys
from .losses import LOSSES
from .objectives import Objective
from .plumbing.config import Config
from .plumbing.data import TaskData
from .speedups.cpu_dropout import install_cpu_dropout
from .speedups.cuda_graphs import GraphedChunks
from .speedups.grad_cache_plan import GradCacheSpeedups, larger_first_pass_step
from .speedups.linear_tape import install_linear_tape
from .speedups.sparse_embeddings import install_sparse_embedding_grads
from .speedups.static_shapes import StaticShapes, static_mini_batches


def install_training_modules(encoder: SentenceEncoder, cfg: Config) -> tuple[GradCacheSpeedups, DropoutKeys | None]:
    """The dropout masks and the speed-ups `cfg` asks for, installed into the encoder's model (in place) →
    (GradCache's plan, the keyed masks' state or None). None of them changes `encode` (eval mode)."""
    train = cfg.train
    # dropout masks: keyed (a function of each text: keyed_dropout.py), or torch's random stream
    keys = install_keyed_dropout(encoder.model) if cfg.model.dropout_masks == "keyed" else None
    if keys is None:
        install_cpu_dropout(encoder.model)  # the stream's masks, drawn faster on CPU tensors (torch's own on CUDA)
    # training-time speed-ups (speedups/): the same gradients, less time
    graphs = GraphedChunks(encoder, keys, encoder.max_seq_length) if train.grad_cache_cuda_graphs else None
    plan = GradCacheSpeedups(keep_graphs=train.grad_cache_memory_budget,
                             keep_last=train.grad_cache_first_pass_mini_batch_size is None,
                             sparse=install_sparse_embedding_grads(encoder.model),
                             tape=install_linear_tape(encoder.model) if train.grad_cache_linear_tape else None,
                             keys=keys, trim_rows=train.grad_cache_cuda_graphs, graphs=graphs)
    return plan, keys


def static_shapes(cfg: Config, max_length: int) -> StaticShapes:
    """The mini-batch shapes the config asks for (`StaticShapes.active` is False unless it asks for static ones)."""
    t = cfg.train
    return StaticShapes(max_length, t.mini_batch_size, t.grad_cache_length_multiple, t.grad_cache_mini_batch_tokens,
                        pad_rows=t.grad_cache_cuda_graphs)


def make_objectives(cfg: Config) -> dict[str, Objective]:
    """Each task's loss: its function, scale, the Matryoshka dims and weights, the cross-rank gather."""
    m = cfg.matryoshka
    return {name: Objective(LOSSES[t.loss], t.scale, m and m.dims, m and m.weights,
                            gather=cfg.train.gather_across_devices) for name, t in cfg.tasks.items()}


@dataclass
class Step:
    """What a step needs besides its batch; built once per run."""

    cfg: Config
    encoder: SentenceEncoder
    model: nn.Module  # the encoder, or DistributedDataParallel around it
    objectives: dict[str, Objective]
    plan: GradCacheSpeedups
    dropout_keys: DropoutKeys | None
    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager]
    scale: Callable[[torch.Tensor], torch.Tensor]  # the GradScaler's `scale` (the identity unless fp16)
    rank: int = 0
    world_size: int = 1

    def forward_backward(self, task_name: str, data: TaskData, rows: list[int], step: int,
                         parts: dict | None = None) -> torch.Tensor:
        """Encode the batch `rows` of one task at optimizer step `step`, compute its loss, backpropagate the scaled
        loss → the loss () (detached). `parts` receives the unweighted loss at each Matryoshka dim."""
        n_columns = len(data.columns)
        texts, scores = data.batch(rows)  # (n_columns·B,) column after column, the layout Objective reads; (B,)
        scores = None if scores is None else torch.as_tensor(scores, device=self.device)  # (B,)
        ids = PackedTokenIds.tokenize(self.encoder, texts)
        return self.forward_backward_ids(task_name, ids, n_columns, scores, step, parts)

    def forward_backward_ids(self, task_name: str, ids: PackedTokenIds, n_columns: int, scores: torch.Tensor | None,
                             step: int, parts: dict | None = None) -> torch.Tensor:
        """`forward_backward` from the batch's token ids (T texts, column after column; scores (B,) or None)."""
        train = self.cfg.train

        def loss_fn(reps: torch.Tensor) -> torch.Tensor:  # reps (n_columns·B, D) → ()
            return self.objectives[task_name](reps, n_columns, scores, parts)

        pad_id = self.encoder.tokenizer.pad_token_id
        keys = host_keys = None
        if self.dropout_keys is not None:  # keyed masks: each text's own, by its place in the GLOBAL batch
            index = global_text_index(n_columns, len(ids) // n_columns, self.rank, self.world_size)  # (T,)
            host_keys = text_keys(train.seed, step, index)
        shapes = static_shapes(self.cfg, self.encoder.max_seq_length)
        if shapes.active and (LOSSES[self.cfg.tasks[task_name].loss].grad_cache or train.grad_cache_cuda_graphs):
            batches = static_mini_batches(ids, shapes, pad_id, self.device, text_keys=host_keys)
            return grad_cache_step(self.model, batches, loss_fn, self.scale, self.autocast, self.plan)
        keys = None if host_keys is None else host_keys.to(self.device)
        if LOSSES[self.cfg.tasks[task_name].loss].grad_cache:
            batches = make_mini_batches(ids, train.mini_batch_size, pad_id, self.device, text_keys=keys)
            if train.grad_cache_first_pass_mini_batch_size is None:
                return grad_cache_step(self.model, batches, loss_fn, self.scale, self.autocast, self.plan)
            first_pass = make_mini_batches(ids, train.grad_cache_first_pass_mini_batch_size, pad_id, self.device,
                                           text_keys=keys)
            return larger_first_pass_step(self.model, batches, first_pass, loss_fn, self.scale, self.autocast,
                                          self.plan)
        features = {k: v.to(self.device) for k, v in ids.pad(range(len(ids)), pad_id).items()}
        with self.autocast(), self.dropout_keys.use(keys) if keys is not None else contextlib.nullcontext():
            reps = self.model(features)  # (n_columns·B, D)
        loss = loss_fn(reps)
        self.scale(loss).backward()
        return loss.detach()
