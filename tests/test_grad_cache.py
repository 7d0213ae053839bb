"""GradCache is the full-batch gradient: every parameter, fp32 and float64, dropout off and on, MNRL and CoSENT.

Batch: B = 7 rows; retrieval rows have 4 columns (query, positive, 2 hard negatives) → T = 28 texts, cut into
mini-batches of 5 (which does not divide 28). Matryoshka is on. The loss is multiplied by 1024, as a GradScaler does.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_distilbert

from bertino import SentenceEncoder
from bertino.grad_cache import RandContext, forward_no_grad, grad_cache_step, make_mini_batches, pad_batch
from bertino.objectives import Objective

B, C, SCALE = 7, 5, 1024.0
WORDS = "il gatto cane casa libro tabella testo pagina documento formato cella roma milano acqua sole mare".split()


def random_texts(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (int(torch.randint(1, 12, (1,), generator=g)),),
                                                          generator=g)) + f" {j}" for j in range(n)]


def retrieval_case(enc):
    texts = random_texts(4 * B, seed=0)  # column after column: queries, positives, neg_1, neg_2
    objective = Objective("cached_mnrl", dims=[32, 16, 8], weights=[1.0, 0.4, 0.2])
    return texts, (lambda reps: objective(reps, n_columns=4))


def cosent_case(enc):
    texts = random_texts(2 * B, seed=1)
    scores = torch.tensor([0.1, 0.5, 0.5, 0.9, 0.0, 0.3, 1.0], dtype=torch.float64)
    objective = Objective("cosent", dims=[32, 16, 8], weights=[1.0, 0.4, 0.2])
    return texts, (lambda reps: objective(reps, n_columns=2, scores=scores))


CASES = {"mnrl_2_hard_negatives": retrieval_case, "cosent": cosent_case}


def grads(enc) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}
    enc.zero_grad(set_to_none=True)
    return out


def max_rel_error(a: dict, b: dict) -> float:
    """max over parameters of ‖a_p − b_p‖ / ‖b_p‖.

    One exception: the key-projection biases (k_lin.bias) have an analytically zero gradient — adding q·b to every
    key's score is a constant shift inside each softmax row — so their computed gradients are rounding noise in both
    runs. Their error is measured relative to 1e-6 · the whole gradient's norm instead of their own ~0 norm.
    """
    assert a.keys() == b.keys() and len(a) > 0
    total = torch.sqrt(sum(g.double().norm() ** 2 for g in b.values()))
    return max(((a[n] - b[n]).norm() / torch.maximum(b[n].norm(), 1e-6 * total)).item() for n in a)


def run_grad_cache(enc, texts, loss_fn, keep_graphs=0):
    mbs = make_mini_batches(enc.token_ids(texts), C, enc.tokenizer.pad_token_id)
    grad_cache_step(enc, enc, mbs, loss_fn, scale_fn=lambda loss: loss * SCALE, keep_graphs=keep_graphs)
    return grads(enc)


def full_batch_plain(enc, texts, loss_fn):
    """One forward of the whole batch (one padded tensor), one backward."""
    reps = enc(pad_batch(enc.token_ids(texts), range(len(texts)), enc.tokenizer.pad_token_id))  # (T, D)
    (loss_fn(reps) * SCALE).backward()
    return grads(enc)


def full_batch_from_mini_batch_forwards(enc, texts, loss_fn):
    """One autograd graph over the same mini-batch forwards GradCache runs (same RNG draws, in the same order)."""
    mbs = make_mini_batches(enc.token_ids(texts), C, enc.tokenizer.pad_token_id)
    outs = torch.cat([enc(f) for f in mbs.features])  # (T, D), mini-batch order
    reps = torch.empty_like(outs)
    reps[mbs.order] = outs
    (loss_fn(reps) * SCALE).backward()
    return grads(enc)


@pytest.fixture(scope="module")
def no_dropout_dir(tmp_path_factory):
    return make_distilbert(tmp_path_factory.mktemp("nodrop"), dropout=0.0)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_dropout_off_equals_one_full_batch_forward(no_dropout_dir, case, dtype, tol):
    enc = SentenceEncoder.from_pretrained(no_dropout_dir).to(dtype).train()
    texts, loss_fn = CASES[case](enc)
    want = full_batch_plain(enc, texts, loss_fn)
    for keep in (0, 2):
        err = max_rel_error(run_grad_cache(enc, texts, loss_fn, keep_graphs=keep), want)
        print(f"GradCache vs full batch, dropout off, {case}, {dtype}, keep_graphs={keep}: max rel err {err:.2e}")
        assert err <= tol


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_dropout_on_equals_full_batch_graph_of_the_same_masks(tiny_model_dir, case, dtype, tol):
    enc = SentenceEncoder.from_pretrained(tiny_model_dir).to(dtype).train()
    assert enc.model.config.dropout > 0
    texts, loss_fn = CASES[case](enc)
    torch.manual_seed(123)
    want = full_batch_from_mini_batch_forwards(enc, texts, loss_fn)
    for keep in (0, 2):
        torch.manual_seed(123)
        err = max_rel_error(run_grad_cache(enc, texts, loss_fn, keep_graphs=keep), want)
        print(f"GradCache vs same-mask full batch, dropout on, {case}, {dtype}, keep_graphs={keep}: {err:.2e}")
        assert err <= tol
    # and dropout really is active: a different seed gives a different gradient
    torch.manual_seed(7)
    assert max_rel_error(run_grad_cache(enc, texts, loss_fn), want) > 1e-3


def test_rng_replay_is_bitwise(tiny_model_dir):
    enc = SentenceEncoder.from_pretrained(tiny_model_dir).train()
    texts, _ = retrieval_case(enc)
    mbs = make_mini_batches(enc.token_ids(texts), C, enc.tokenizer.pad_token_id)
    torch.manual_seed(0)
    first = forward_no_grad(enc, mbs)
    first_outputs = first.reps[mbs.order].split(mbs.sizes)
    after_pass_1 = torch.get_rng_state()
    for i, features in enumerate(mbs.features):
        with first.rng_states[i]:
            again = enc(features)  # with autograd, as in pass 3
        assert torch.equal(again, first_outputs[i]), f"mini-batch {i} differs after RNG replay"
        # without the replay the masks differ
        assert not torch.equal(enc(features), first_outputs[i])
    torch.set_rng_state(after_pass_1)
    # replay leaves the caller's RNG stream where it was
    ctx = RandContext(torch.device("cpu"))
    before = torch.rand(3)
    with ctx:
        torch.rand(100)
    assert not torch.equal(torch.rand(3), before)  # stream continued from `before`, not rewound


def test_bf16_autocast_grad_cache_matches_bf16_full_batch(no_dropout_dir):
    enc = SentenceEncoder.from_pretrained(no_dropout_dir).train()
    texts, loss_fn = retrieval_case(enc)
    amp = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    with amp():
        reps = enc(pad_batch(enc.token_ids(texts), range(len(texts)), enc.tokenizer.pad_token_id))
    (loss_fn(reps) * SCALE).backward()
    want = grads(enc)
    mbs = make_mini_batches(enc.token_ids(texts), C, enc.tokenizer.pad_token_id)
    grad_cache_step(enc, enc, mbs, loss_fn, scale_fn=lambda loss: loss * SCALE, autocast=amp)
    got = grads(enc)
    fp32 = full_batch_plain(enc, texts, loss_fn)
    # bf16 has 8 mantissa bits, and mini-batches pad differently from one big batch, so rounding differs. The claim
    # is "same math": GradCache-bf16 is no further from the fp32 gradient than a full-batch bf16 step is.
    err_gc, err_full = global_rel_error(got, fp32), global_rel_error(want, fp32)
    print(f"bf16 vs fp32 gradient, global rel err: GradCache {err_gc:.2e}, full batch {err_full:.2e}; "
          f"GradCache vs full batch (both bf16): {global_rel_error(got, want):.2e}")
    assert err_gc <= 2 * err_full + 1e-3
    assert global_rel_error(got, want) <= 2e-2


def global_rel_error(a: dict, b: dict) -> float:
    """‖a − b‖ / ‖b‖ over all parameters' gradients as one vector."""
    num = sum((a[n].double() - b[n].double()).norm() ** 2 for n in b)
    return torch.sqrt(num / sum(b[n].double().norm() ** 2 for n in b)).item()
