"""Each loss against a naive loop written straight from its formula; Matryoshka against the bare loss."""

from __future__ import annotations

import math

import pytest
import torch

from bertino.losses import (DEFAULT_SCALE, LOSSES, PAIR_SCORE, RETRIEVAL, cosent_loss, cosine_similarity_loss,
                            mnrl_loss)
from bertino.matryoshka import matryoshka_loss
from bertino.objectives import Objective


def cos(a, b) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def naive_mnrl(anchors, candidates, scale):
    total = 0.0
    for i in range(len(anchors)):
        logits = [scale * cos(anchors[i], c) for c in candidates]
        total += -(logits[i] - math.log(sum(math.exp(x) for x in logits)))
    return total / len(anchors)


def naive_cosent(e1, e2, gold, scale):
    s = [scale * cos(a, b) for a, b in zip(e1, e2)]
    acc = 1.0
    for i in range(len(s)):
        for j in range(len(s)):
            if gold[i] > gold[j]:
                acc += math.exp(s[j] - s[i])
    return math.log(acc)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [0, 1, 2])
def test_mnrl_equals_naive_loop(seed, k):
    g = torch.Generator().manual_seed(seed)
    B, D = 6, 8
    anchors = torch.randn(B, D, generator=g, dtype=torch.float64)
    candidates = torch.randn(B * (1 + k), D, generator=g, dtype=torch.float64)
    got = mnrl_loss(anchors, candidates, scale=20.0).item()
    assert got == pytest.approx(naive_mnrl(anchors, candidates, 20.0), rel=1e-5)


def test_mnrl_labels_select_the_positive():
    g = torch.Generator().manual_seed(0)
    anchors, candidates = torch.randn(3, 4, generator=g), torch.randn(9, 4, generator=g)
    perm = torch.randperm(9, generator=g)
    labels = torch.argsort(perm)[:3]  # where candidates 0..2 went after the permutation
    assert mnrl_loss(anchors, candidates[perm], labels=labels).item() == pytest.approx(
        mnrl_loss(anchors, candidates).item(), rel=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_cosent_equals_naive_loop(seed):
    g = torch.Generator().manual_seed(seed)
    B, D = 7, 8
    e1, e2 = torch.randn(B, D, generator=g, dtype=torch.float64), torch.randn(B, D, generator=g, dtype=torch.float64)
    gold = torch.randint(0, 4, (B,), generator=g).double()  # ties on purpose
    got = cosent_loss(e1, e2, gold, scale=20.0).item()
    assert got == pytest.approx(naive_cosent(e1, e2, gold, 20.0), rel=1e-5)


def test_cosent_all_equal_gold_is_exactly_zero_with_zero_gradient():
    e1 = torch.randn(5, 8, requires_grad=True)
    e2 = torch.randn(5, 8)
    loss = cosent_loss(e1, e2, torch.full((5,), 3.0))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(e1.grad, torch.zeros_like(e1)) and not torch.isnan(e1.grad).any()


def test_cosent_runs_in_fp32_from_fp16_inputs():
    e1, e2 = torch.randn(4, 8).half(), torch.randn(4, 8).half()
    gold = torch.tensor([0.0, 1.0, 2.0, 3.0])
    loss = cosent_loss(e1, e2, gold)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(cosent_loss(e1.float(), e2.float(), gold).item(), rel=1e-6)


def test_cosine_similarity_loss_equals_naive():
    g = torch.Generator().manual_seed(3)
    e1, e2 = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    gold = torch.rand(5, generator=g)
    naive = sum((cos(a, b) - float(s)) ** 2 for a, b, s in zip(e1, e2, gold)) / 5
    assert cosine_similarity_loss(e1, e2, gold).item() == pytest.approx(naive, rel=1e-5)


def test_matryoshka_single_dim_weight_one_is_the_bare_loss():
    g = torch.Generator().manual_seed(4)
    a, c = torch.randn(4, 16, generator=g), torch.randn(12, 16, generator=g)
    assert matryoshka_loss(mnrl_loss, [a, c], dims=[16], weights=[1.0]).item() == pytest.approx(
        mnrl_loss(a, c).item(), rel=1e-6)


def test_matryoshka_is_the_weighted_sum_over_truncations_not_renormalised():
    g = torch.Generator().manual_seed(5)
    e1, e2, gold = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g), torch.rand(6, generator=g)
    dims, weights = [16, 8, 4], [1.0, 0.4, 0.2]
    want = sum(w * cosent_loss(e1[:, :d], e2[:, :d], gold).item() for d, w in zip(dims, weights))
    got = matryoshka_loss(cosent_loss, [e1, e2], dims, weights, gold=gold).item()
    assert got == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="differ in length"):
        matryoshka_loss(cosent_loss, [e1, e2], [16, 8], [1.0], gold=gold)


def test_the_registry_names_each_loss_and_what_it_takes():
    assert {name: (loss.fn, loss.rows, loss.grad_cache) for name, loss in LOSSES.items()} == {
        "mnrl": (mnrl_loss, RETRIEVAL, False), "cached_mnrl": (mnrl_loss, RETRIEVAL, True),
        "cosent": (cosent_loss, PAIR_SCORE, False), "cosine": (cosine_similarity_loss, PAIR_SCORE, False)}
    assert LOSSES["cosine"].default_scale is None and LOSSES["mnrl"].default_scale == DEFAULT_SCALE == 20.0
    # the row shapes: the one place the config, the readers and the objectives ask what a row holds
    assert RETRIEVAL.text_columns(("q", "p", "n")) == ("q", "p", "n") and not RETRIEVAL.scored
    assert PAIR_SCORE.text_columns(("a", "b", "score")) == ("a", "b") and PAIR_SCORE.scored
    assert RETRIEVAL.column_problem(("q", "p")) is None and PAIR_SCORE.column_problem(("a", "b", "s")) is None
    assert "needs ≥ 2 columns (anchor, positive, negatives...), found 1" in RETRIEVAL.column_problem(("q",))
    assert "needs exactly 3 columns (sentence1, sentence2, score), found 2" in PAIR_SCORE.column_problem(("a", "b"))


def test_objective_lays_out_columns_and_applies_scale_and_matryoshka():
    g = torch.Generator().manual_seed(6)
    B, D = 4, 16
    q, p, n = (torch.randn(B, D, generator=g) for _ in range(3))
    reps = torch.cat([q, p, n])  # column after column: (3B, D)
    assert Objective(LOSSES["cached_mnrl"])(reps, 3).item() == pytest.approx(
        mnrl_loss(q, torch.cat([p, n]), scale=20.0).item(), rel=1e-6)
    assert Objective(LOSSES["mnrl"], scale=7.0)(reps, 3).item() == pytest.approx(
        mnrl_loss(q, torch.cat([p, n]), scale=7.0).item(), rel=1e-6)
    e1, e2, gold = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g), torch.rand(B, generator=g)
    got = Objective(LOSSES["cosent"], dims=[16, 4], weights=[1.0, 0.5])(torch.cat([e1, e2]), 2, gold)
    assert got.item() == pytest.approx(matryoshka_loss(cosent_loss, [e1, e2], [16, 4], [1.0, 0.5], gold=gold,
                                                       scale=20.0).item(), rel=1e-6)
    assert Objective(LOSSES["cosine"])(torch.cat([e1, e2]), 2, gold).item() == pytest.approx(
        cosine_similarity_loss(e1, e2, gold).item(), rel=1e-6)  # no scale argument reaches the cosine loss


def test_objective_on_column_major_rows_is_the_naive_mnrl_with_every_hard_negative():
    """A batch of rows (query, positive, neg_1, neg_2), laid out as train.py lays it out (`column_major`), gives
    the naive formula's loss: each query against every positive AND every hard negative of the batch."""
    from bertino.objectives import column_major

    g = torch.Generator().manual_seed(9)
    B, D = 5, 12
    rows = [tuple(torch.randn(D, generator=g, dtype=torch.float64) for _ in range(4)) for _ in range(B)]
    reps = torch.stack(column_major(rows))  # (4B, D)
    candidates = [r[1] for r in rows] + [r[2] for r in rows] + [r[3] for r in rows]  # positive i is candidate i
    want = naive_mnrl([r[0] for r in rows], candidates, 20.0)
    assert Objective(LOSSES["cached_mnrl"])(reps, 4).item() == pytest.approx(want, rel=1e-6)  # fp32 inside
    assert column_major([("a", "b"), ("c", "d")]) == ["a", "c", "b", "d"]
