"""Classic GradCache (bertino/grad_cache.py) is the full-batch gradient: every parameter, fp32 and float64, dropout
off and on, MNRL with hard negatives and CoSENT, Matryoshka, a scaled loss, a mini-batch size that does not divide
the batch. The fast passes (speedups/fast_grad_cache.py) are compared with this one in tests/test_speedups.py.

The model here is the plain DistilBERT (torch's dropout, SDPA attention): no speed-up is installed.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import (CASES, SCALE, full_batch_from_mini_batch_forwards, full_batch_plain, global_rel_error,
                     grad_cache_grads, grads, max_rel_error, mini_batches, retrieval_case, token_ids)

from bertino import SentenceEncoder

from bertino.grad_cache import RandContext, build_cache, forward_backward, forward_no_grad, grad_cache_step


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_dropout_off_equals_one_full_batch_forward(nodrop_model_dir, case, dtype, tol):
    enc = SentenceEncoder.from_pretrained(nodrop_model_dir).to(dtype).train()
    texts, loss_fn = CASES[case]()
    want = full_batch_plain(enc, texts, loss_fn)
    err = max_rel_error(grad_cache_grads(enc, texts, loss_fn), want)
    print(f"classic GradCache vs full batch, dropout off, {case}, {dtype}: max rel err {err:.2e}")
    assert err <= tol


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_dropout_on_equals_full_batch_graph_of_the_same_masks(tiny_model_dir, case, dtype, tol):
    enc = SentenceEncoder.from_pretrained(tiny_model_dir).to(dtype).train()
    assert enc.model.config.dropout > 0
    texts, loss_fn = CASES[case]()
    torch.manual_seed(123)
    want = full_batch_from_mini_batch_forwards(enc, texts, loss_fn)
    err = max_rel_error(grad_cache_grads(enc, texts, loss_fn, seed=123), want)
    print(f"classic GradCache vs same-mask full batch, dropout on, {case}, {dtype}: {err:.2e}")
    assert err <= tol
    # and dropout really is active: a different seed gives a different gradient
    assert max_rel_error(grad_cache_grads(enc, texts, loss_fn, seed=7), want) > 1e-3


def test_without_the_rng_replay_the_gradient_is_wrong(tiny_model_dir, monkeypatch):
    """Pass 3 without RandContext (dropout draws new masks) no longer matches: the replay is what makes it exact."""
    enc = SentenceEncoder.from_pretrained(tiny_model_dir).double().train()
    texts, loss_fn = retrieval_case()
    torch.manual_seed(123)
    want = full_batch_from_mini_batch_forwards(enc, texts, loss_fn)
    assert max_rel_error(grad_cache_grads(enc, texts, loss_fn), want) < 1e-10
    monkeypatch.setattr(RandContext, "__enter__", lambda self: None)  # pass 3 keeps drawing from the stream
    monkeypatch.setattr(RandContext, "__exit__", lambda self, *exc: None)
    assert max_rel_error(grad_cache_grads(enc, texts, loss_fn), want) > 1e-3


def test_rng_replay_is_bitwise_and_leaves_the_callers_stream_untouched(tiny_model_dir):
    enc = SentenceEncoder.from_pretrained(tiny_model_dir).train()
    texts, _ = retrieval_case()
    batches = mini_batches(enc, texts)
    torch.manual_seed(0)
    reps, rng_states = forward_no_grad(enc, batches)
    assert len(rng_states) == len(batches)
    for i, (b, rng) in enumerate(zip(batches, rng_states)):
        with rng:
            again = enc(b.features)  # with autograd, as in pass 3
        assert torch.equal(again, reps[b.texts]), f"mini-batch {i} differs after the RNG replay"
        assert not torch.equal(enc(b.features), reps[b.texts])  # without the replay the masks differ

    torch.manual_seed(1)
    ctx = RandContext(torch.device("cpu"))
    first_draw = torch.rand(4)  # what the snapshot's stream gives first
    torch.rand(10)  # the caller's stream moves on
    before = torch.get_rng_state()
    with ctx:
        assert torch.equal(torch.rand(4), first_draw)  # replayed from the snapshot
        torch.rand(100)
    assert torch.equal(torch.get_rng_state(), before)  # neither rewound nor advanced by the replay


def test_the_cache_carries_the_loss_scale(nodrop_model_dir):
    """The GradScaler's scale reaches the parameters through the cache only: with scale_fn = ×1024 every
    gradient is exactly 1024 × the unscaled one (fp64), and the returned loss is the unscaled loss."""
    enc = SentenceEncoder.from_pretrained(nodrop_model_dir).double().train()
    texts, loss_fn = retrieval_case()
    batches = mini_batches(enc, texts)
    loss = grad_cache_step(enc, batches, loss_fn)
    plain = grads(enc)
    scaled_loss = grad_cache_step(enc, batches, loss_fn, scale_fn=lambda l: l * SCALE)
    scaled = grads(enc)
    assert torch.equal(loss, scaled_loss)
    assert max_rel_error({n: g / SCALE for n, g in scaled.items()}, plain) < 1e-12


def test_mini_batches_are_length_sorted_and_end_with_a_full_one_of_the_longest_texts(tiny_model_dir):
    enc = SentenceEncoder.from_pretrained(tiny_model_dir)
    texts, _ = retrieval_case()  # 28 texts, C = 5: sizes 3, 5, 5, 5, 5, 5
    ids = token_ids(enc, texts)
    batches = mini_batches(enc, texts)
    assert [len(b.texts) for b in batches] == [3, 5, 5, 5, 5, 5]
    order = torch.cat([b.texts for b in batches]).tolist()
    assert sorted(order) == list(range(len(texts)))  # every text exactly once
    lengths = [int(ids.lengths[i]) for i in order]
    assert lengths == sorted(lengths)  # shortest first
    for b in batches:  # each padded to its own longest text
        assert b.features["input_ids"].shape[1] == max(int(ids.lengths[i]) for i in b.texts)


class RecordsSync(torch.nn.Module):
    """A stand-in for DistributedDataParallel: records which forwards ran under `no_sync()`."""

    def __init__(self, module):
        super().__init__()
        self.module, self.synced, self.in_no_sync = module, [], False

    @contextlib.contextmanager
    def no_sync(self):
        self.in_no_sync = True
        try:
            yield
        finally:
            self.in_no_sync = False

    def forward(self, features):
        self.synced.append(not self.in_no_sync)
        return self.module(features)


def test_pass_3_syncs_only_its_last_backward(nodrop_model_dir):
    enc = SentenceEncoder.from_pretrained(nodrop_model_dir).train()
    texts, loss_fn = retrieval_case()
    wrapper = RecordsSync(enc)
    batches = mini_batches(enc, texts)
    reps, rng_states = forward_no_grad(enc, batches)
    _, cache = build_cache(loss_fn, reps)
    forward_backward(wrapper, batches, cache, rng_states)
    assert wrapper.synced == [False] * (len(batches) - 1) + [True]  # one all-reduce per step, in the last backward


def test_bf16_autocast_grad_cache_matches_bf16_full_batch(nodrop_model_dir):
    enc = SentenceEncoder.from_pretrained(nodrop_model_dir).train()
    texts, loss_fn = retrieval_case()
    amp = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    want = full_batch_plain(enc, texts, loss_fn, autocast=amp)
    got = grad_cache_grads(enc, texts, loss_fn, autocast=amp)
    fp32 = full_batch_plain(enc, texts, loss_fn)
    # bf16 has 8 mantissa bits, and mini-batches pad differently from one big batch, so rounding differs. The claim
    # is "same math": GradCache-bf16 is no further from the fp32 gradient than a full-batch bf16 step is.
    err_gc, err_full = global_rel_error(got, fp32), global_rel_error(want, fp32)
    print(f"bf16 vs fp32 gradient, global rel err: GradCache {err_gc:.2e}, full batch {err_full:.2e}; "
          f"GradCache vs full batch (both bf16): {global_rel_error(got, want):.2e}")
    assert err_gc <= 2 * err_full + 1e-3
    assert global_rel_error(got, want) <= 2e-2
