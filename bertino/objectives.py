"""From a batch's embeddings to its training loss: columns → loss function → Matryoshka → (optional) cross-rank gather.

Shapes: B rows in this rank's batch, n columns of text per row, T = n·B texts, D dim, W world size, k = n − 2.

The encoder embeds all T texts of a batch at once (GradCache mini-batches mix columns freely); the texts are laid
out column after column, so `reps.view(n, B, D)[c]` is column c. For retrieval rows (query, positive, neg_1..neg_k)
the anchors are column 0 and the candidates cat(columns 1..n-1) (B(1+k), D): positive i sits at index i.

Gathering across ranks (`gather_across_devices`): every rank's candidates are all-gathered WITH autograd
(`torch.distributed.nn.functional.all_gather`), anchors stay local and labels are offset by rank · B(1+k), so every
anchor is scored against every rank's positives and hard negatives. The gather's backward sums the gradients that
all ranks' losses send to a rank's candidates; DDP then averages over ranks, which turns the mean of the W local
losses into exactly the single-process loss over W·B anchors: no world-size factor is needed. Pair losses (CoSENT,
CosineSimilarity) gather both sides and the scores, so every rank computes the same loss over all W·B pairs; the
gather's backward then sums W identical contributions into each slice, and DDP's average divides them by W again:
no factor there either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .distributed import gather_with_grad, world_info
from .losses import Loss
from .matryoshka import matryoshka_loss


def column_major(rows: Sequence[Sequence[str]]) -> list[str]:
    """B rows of n texts → the T = n·B texts column after column, the layout `Objective` reads: text c·B + i is
    column c of row i (all queries, then all positives, then each negative column)."""
    return [row[c] for c in range(len(rows[0])) for row in rows]


@dataclass(frozen=True)
class Objective:
    """How one task turns its embeddings into a loss."""

    loss: Loss  # an entry of losses.LOSSES
    scale: float | None = None  # the similarity scale; None: the loss's default
    dims: Sequence[int] | None = None  # Matryoshka dims (None: plain loss on the full embedding)
    weights: Sequence[float] | None = None
    gather: bool = False  # gather candidates / pairs across ranks

    def __call__(self, reps: torch.Tensor, n_columns: int, scores: torch.Tensor | None = None,
                 parts: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """reps (n·B, D), column after column; scores (B,) for pair losses → loss (). `parts` receives the
        unweighted loss at each Matryoshka dim (`matryoshka_loss`)."""
        columns = list(reps.view(n_columns, -1, reps.shape[-1]))  # n × (B, D)
        B = columns[0].shape[0]
        rank, world = world_info() if self.gather else (0, 1)
        scale = {} if self.loss.default_scale is None else {
            "scale": self.loss.default_scale if self.scale is None else self.scale}

        if not self.loss.rows.scored:  # retrieval rows (anchor, positive, negatives...)
            anchors, candidates = columns[0], torch.cat(columns[1:])  # (B, D), (B(1+k), D)
            labels = torch.arange(B, device=reps.device)  # (B,)
            if world > 1:
                candidates = torch.cat(gather_with_grad(candidates))  # (W·B(1+k), D)
                labels = labels + rank * B * (n_columns - 1)
            return self._combine([anchors, candidates], parts, labels=labels, **scale)

        e1, e2 = columns[0], columns[1]  # (B, D) each
        if world > 1:
            # Every rank evaluates the same loss L over all W·B pairs. The gather's backward sends each rank's slice
            # ∂L/∂e from all W ranks' copies of L (W ∂L/∂e), and DDP's average divides by W: exactly the
            # single-process gradient, as for MNRL. (Dividing L by W here would make it W times too small.)
            e1, e2 = torch.cat(gather_with_grad(e1)), torch.cat(gather_with_grad(e2))  # (W·B, D)
            scores = torch.cat(gather_with_grad(scores.float()))  # (W·B,)
        return self._combine([e1, e2], parts, gold=scores, **scale)

    def _combine(self, embeddings: list[torch.Tensor], parts, **kwargs) -> torch.Tensor:
        if self.dims is None:
            return self.loss.fn(*embeddings, **kwargs)
        return matryoshka_loss(self.loss.fn, embeddings, self.dims, self.weights, parts=parts, **kwargs)
