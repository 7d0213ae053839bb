"""Contrastive and similarity losses, as pure functions of embeddings, and the registry of the config's loss names.

Shapes: B pairs/anchors, k hard negatives per anchor, D embedding dim.
None of these functions knows the encoder: that is what lets GradCache (grad_cache.py) evaluate them on cached
embeddings and Matryoshka (matryoshka.py) evaluate them on truncated ones. All math runs in fp32, whatever dtype
the embeddings arrive in (under fp16 a scaled cosine's exp overflows, and a -1e12 mask is -inf).

Multiple negatives ranking loss (MNRL, InfoNCE with in-batch negatives; Henderson et al. 2017):
    candidates = [p_1..p_B, n_{1,1}..n_{B,1}, ..., n_{1,k}..n_{B,k}]          (B(1+k), D)
    s_ij = scale · cos(a_i, c_j)                                              (B, B(1+k))
    L = mean_i  −log softmax_j(s_i·)[label_i],  label_i = i (its own positive)

CoSENT (Su 2022): with s_i = scale · cos(u_i, v_i),
    L = log(1 + Σ_{(i,j): gold_i > gold_j} exp(s_j − s_i))
i.e. every pair ranked wrongly by cosine costs. Pairs with equal gold add nothing; all-equal gold gives log 1 = 0.

CosineSimilarityLoss (the V4 STS loss): L = mean_i (cos(u_i, v_i) − gold_i)², gold scaled to [0, 1].

`LOSSES` maps each config name (`tasks.NAME.loss`) to its function and what the rest of bertino needs to know:
which rows it takes, its default scale, whether training computes it with GradCache, and its name on a model card.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

DEFAULT_SCALE = 20.0  # sentence-transformers' default for MNRL and CoSENT (= 1 / temperature 0.05)


def cos_sim_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (B, D), b (M, D) → cosine similarities (B, M) in fp32."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def pairwise_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (B, D), b (B, D) → row-wise cosine similarity (B,) in fp32."""
    return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(dim=-1)


def mnrl_loss(anchors: torch.Tensor, candidates: torch.Tensor, scale: float = DEFAULT_SCALE,
              labels: torch.Tensor | None = None) -> torch.Tensor:
    """anchors (B, D), candidates (M, D) with M = B(1+k) → mean cross-entropy ().

    `labels` (B,) index each anchor's positive among the candidates; default `arange(B)` (positives come first).
    Under DDP with gathered candidates, the caller passes labels offset by rank · M_local.
    """
    scores = scale * cos_sim_matrix(anchors, candidates)  # (B, M)
    if labels is None:
        labels = torch.arange(anchors.shape[0], device=anchors.device)  # (B,)
    return F.cross_entropy(scores, labels)


def cosent_loss(e1: torch.Tensor, e2: torch.Tensor, gold: torch.Tensor, scale: float = DEFAULT_SCALE) -> torch.Tensor:
    """e1, e2 (B, D), gold (B,) → CoSENT loss ()."""
    s = scale * pairwise_cos(e1, e2)  # (B,)
    diff = s[None, :] - s[:, None]  # (B, B): [i, j] = s_j − s_i
    wrong_if_positive = gold.float()[:, None] > gold.float()[None, :]  # (B, B): gold_i > gold_j
    # -inf (not -1e12) leaves no finite junk in fp32 and gives those pairs exactly zero weight and gradient.
    diff = diff.masked_fill(~wrong_if_positive, float("-inf")).flatten()  # (B·B,)
    zero = torch.zeros(1, dtype=diff.dtype, device=diff.device)  # the "1 +" inside the log
    return torch.logsumexp(torch.cat([zero, diff]), dim=0)


def cosine_similarity_loss(e1: torch.Tensor, e2: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """e1, e2 (B, D), gold (B,) in [0, 1] → mean squared error of cosine vs gold ()."""
    return F.mse_loss(pairwise_cos(e1, e2), gold.float())


@dataclass(frozen=True)
class RowShape:
    """What one row of a loss's data holds: the one place that says it (config checks, readers, objectives)."""

    name: str
    columns: str  # how the columns read, for messages
    scored: bool  # the last column is a gold score, not a text
    min_columns: int
    max_columns: int | None  # None: any number of hard-negative columns may follow

    def text_columns(self, columns: tuple[str, ...]) -> tuple[str, ...]:
        """The columns that hold texts (not the score)."""
        return columns[:-1] if self.scored else columns

    def column_problem(self, columns: tuple[str, ...]) -> str | None:
        """Why `columns` cannot be this shape's columns, or None."""
        n, hi = len(columns), self.max_columns
        if n < self.min_columns or (hi is not None and n > hi):
            count = f"exactly {hi}" if hi == self.min_columns else f"≥ {self.min_columns}"
            return f"needs {count} columns ({self.columns}), found {n}: {list(columns)}"
        return None


RETRIEVAL = RowShape("retrieval", "anchor, positive, negatives...", scored=False, min_columns=2, max_columns=None)
PAIR_SCORE = RowShape("pair_score", "sentence1, sentence2, score", scored=True, min_columns=3, max_columns=3)


@dataclass(frozen=True)
class Loss:
    """One config loss name, and what it means."""

    fn: Callable[..., torch.Tensor]
    rows: RowShape  # RETRIEVAL (anchor, positive, negatives...) or PAIR_SCORE (sentence1, sentence2, score)
    default_scale: float | None  # the similarity scale when `tasks.NAME.scale` is unset; None: the loss has none
    grad_cache: bool  # training computes it with GradCache (train.mini_batch_size texts through the encoder at once)
    card_name: str  # the sentence-transformers class it reimplements, as the model card names it
    needs_varied_scores: bool = False  # learns only from pairs whose gold scores differ (all equal: no gradient)


LOSSES = {
    "mnrl": Loss(mnrl_loss, RETRIEVAL, DEFAULT_SCALE, False, "MultipleNegativesRankingLoss"),
    "cached_mnrl": Loss(mnrl_loss, RETRIEVAL, DEFAULT_SCALE, True,
                        "CachedMultipleNegativesRankingLoss (GradCache)"),
    "cosent": Loss(cosent_loss, PAIR_SCORE, DEFAULT_SCALE, False, "CoSENTLoss", needs_varied_scores=True),
    "cosine": Loss(cosine_similarity_loss, PAIR_SCORE, None, False, "CosineSimilarityLoss"),
}
