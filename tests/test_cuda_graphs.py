"""The CUDA-graph path of GradCache (bertino/speedups/cuda_graphs.py) on the CPU, where it runs uncaptured: the same
static buffers, accumulators, flush and plan (fast_grad_cache.plan_step) as on a GPU. It gives one plain full batch's gradient with dropout on
(keyed masks, float64, 1e-10), pass 3 sees pass 1's masks, each shape gets one pair of graphs, the accumulators
reach `.grad` once per step, and under DDP the last mini-batch runs through the wrapper after the flush, so the
one all-reduce carries every mini-batch's gradient. (scripts/cuda_checks.py checks the captured graphs on a GPU.)
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist
from helpers import CASES, SCALE, fast_path, full_batch_plain, grads, max_rel_error, token_ids

from bertino import SentenceEncoder
from bertino.keyed_dropout import install_keyed_dropout, text_keys
from bertino.speedups.cuda_graphs import GraphedChunks
from bertino.speedups.fast_grad_cache import FastGradCache, plan_step
from bertino.speedups.settings import SpeedupsConfig
from bertino.speedups.static_shapes import StaticShapes, static_mini_batches


def graphed(folder, dtype=torch.float64):
    enc = SentenceEncoder.from_pretrained(folder).to(dtype).train()
    keys = install_keyed_dropout(enc.model)
    chunks = GraphedChunks(enc, keys, enc.max_seq_length)
    settings = SpeedupsConfig(cuda_graphs=True, length_multiple=4, cpu_dropout=False, sparse_embedding_grads=False)
    return enc, keys, chunks, FastGradCache(settings, enc.max_seq_length, keys, graphs=chunks)


def step(model, batches, loss_fn, fast, scale_fn=lambda x: x, autocast=contextlib.nullcontext):
    return fast.grad_cache_step(model, batches, loss_fn, scale_fn, autocast)


def batches_of(enc, texts, tk, C=5, tokens=None):
    shapes = StaticShapes(enc.max_seq_length, C, length_multiple=4, mini_batch_tokens=tokens, pad_rows=True)
    return static_mini_batches(token_ids(enc, texts), shapes, enc.tokenizer.pad_token_id, text_keys=tk)


@pytest.mark.parametrize("case", CASES)
def test_the_graph_path_gives_the_full_batch_s_gradient_with_dropout_on(dropout_model_dir, case):
    enc, keys, chunks, fast = graphed(dropout_model_dir)
    assert chunks.capture is None  # decided at the first chunk: on a CPU, no capture
    texts, loss_fn = CASES[case]()
    tk = text_keys(0, 2, torch.arange(len(texts)))
    want = full_batch_plain(enc, texts, loss_fn, text_keys=tk)
    empty_rows = 0
    for C, tokens in ((8, None), (5, None), (5, 40)):
        batches = batches_of(enc, texts, tk, C, tokens)
        empty_rows += sum(b.features["input_ids"].shape[0] - len(b.texts) for b in batches)
        step(enc, batches, loss_fn, fast, lambda x: x * SCALE)
        err = max_rel_error(grads(enc), want)
        print(f"{case}, C={C}, tokens={tokens}: graph path vs one full batch, dropout on: {err:.2e}")
        assert err <= 1e-10, (C, tokens)
    assert chunks.capture is False and empty_rows > 0
    with keys.use(text_keys(0, 3, torch.arange(len(texts)))):  # dropout is on: another step's masks differ
        assert max_rel_error(full_batch_plain(enc, texts, loss_fn), want) > 1e-3


def test_pass_3_replays_pass_1_s_masks_and_one_graph_pair_serves_each_shape(dropout_model_dir):
    enc, keys, chunks, fast = graphed(dropout_model_dir)
    texts, loss_fn = CASES["mnrl_2_hard_negatives"]()
    tk = text_keys(0, 2, torch.arange(len(texts)))
    batches = batches_of(enc, texts, tk)
    for b in batches:  # pass 1's embeddings = an autograd forward of the same chunk with its keys, bitwise
        eager = enc(b.features)[: len(b.texts)]  # the features carry the texts' keys
        assert torch.equal(chunks.forward(b), eager.detach())
    flushes = []
    original = chunks.flush
    chunks.flush = lambda: (flushes.append(1), original())[1]
    step(enc, batches, loss_fn, fast)
    shapes = {tuple(b.features["input_ids"].shape) for b in batches}
    assert {k[:2] for k in chunks.first_graphs} == {k[:2] for k in chunks.again_graphs} == shapes
    assert len(shapes) < len(batches)  # shapes repeat within a step: one graph pair serves several chunks
    assert flushes == [1] and all(a.abs().max() == 0 for a in chunks.acc)  # flushed once, accumulators zeroed
    once = grads(enc)
    for _ in range(2):  # two steps without zero_grad: the flush adds onto the existing .grad
        step(enc, batches, loss_fn, fast)
    twice = grads(enc)
    assert max_rel_error(twice, {n: 2 * g for n, g in once.items()}) <= 1e-12


def test_a_shape_reused_with_fewer_texts_gives_its_empty_rows_no_gradient(dropout_model_dir):
    """A graph's static buffers outlive the step: a (C, L) shape first filled by C texts, then by C − 1 (one empty
    row), must not let the empty row backpropagate the cache row the last text of the earlier step left there."""
    enc, keys, chunks, fast = graphed(dropout_model_dir)
    texts, _ = CASES["mnrl_2_hard_negatives"]()
    weights = torch.linspace(0.5, 2.0, 32, dtype=torch.float64)

    def loss_fn(reps):  # any differentiable function of the embeddings will do
        return (reps.pow(2).sum(-1) * weights[: len(reps)]).sum()

    one_bucket = StaticShapes(enc.max_seq_length, 4, length_multiple=enc.max_seq_length, pad_rows=True)
    for n in (8, 7):  # 2 chunks of 4 texts; then a chunk of 3 texts in 4 rows, and one of 4
        tk = text_keys(0, n, torch.arange(n))
        batches = static_mini_batches(token_ids(enc, texts[:n]), one_bucket, enc.tokenizer.pad_token_id,
                                      text_keys=tk)
        step(enc, batches, loss_fn, fast, lambda x: x * SCALE)
        got = grads(enc)
        want = full_batch_plain(enc, texts[:n], loss_fn, text_keys=tk)
        assert max_rel_error(got, want) <= 1e-10, n
    assert len(chunks.again_graphs) == 1  # one shape served both steps


def test_the_graph_path_under_bf16_autocast(dropout_model_dir):
    """bf16 autocast on the CPU: the graph path (weight-cast cache off) equals the same static chunks eagerly."""
    enc, keys, chunks, fast = graphed(dropout_model_dir, torch.float32)
    texts, loss_fn = CASES["mnrl_2_hard_negatives"]()
    tk = text_keys(0, 2, torch.arange(len(texts)))
    amp = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    step(enc, batches_of(enc, texts, tk), loss_fn, fast_path(enc, keys=keys, keep_last=False), autocast=amp)
    eager = grads(enc)
    step(enc, batches_of(enc, texts, tk), loss_fn, fast, autocast=amp)
    err = max_rel_error(grads(enc), eager)
    print(f"graph path vs eager, bf16 autocast: {err:.2e}")
    assert err <= 1e-6
    assert {k[3] for k in chunks.first_graphs} == {torch.bfloat16}  # captured under the pass's autocast dtype


def test_under_ddp_the_last_mini_batch_all_reduces_every_gradient(dropout_model_dir, tmp_path):
    """DDP (gloo, one process): every mini-batch but the last is graphed; the last runs through the wrapper,
    outside no_sync, after the flush — so the one all-reduce of the step carries the whole gradient."""
    enc, keys, chunks, fast = graphed(dropout_model_dir)
    plan = plan_step(fast, 4, distributed=True)
    assert plan.graphed == {0, 1, 2} and plan.order == (0, 1, 2, 3) and not plan.kept and not plan.replay_rng
    assert plan_step(fast, 4, distributed=False).graphed == {0, 1, 2, 3}
    texts, loss_fn = CASES["mnrl_2_hard_negatives"]()
    tk = text_keys(0, 2, torch.arange(len(texts)))
    want = full_batch_plain(enc, texts, loss_fn, text_keys=tk)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(enc)
        reduced = []

        def hook(state, bucket):  # what the all-reduce carries, bucket by bucket
            reduced.append(bucket.buffer().clone())
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        ddp.register_comm_hook(None, hook)
        step(ddp, batches_of(enc, texts, tk), loss_fn, fast, lambda x: x * SCALE)
        got = {n: p.grad.clone() for n, p in enc.named_parameters()}
        enc.zero_grad(set_to_none=True)
    finally:
        dist.destroy_process_group()
    assert max_rel_error(got, want) <= 1e-10
    carried = torch.cat(reduced)  # one all-reduce per step: as many numbers as parameters, equal to the .grad
    assert carried.numel() == sum(p.numel() for p in enc.parameters())
    assert torch.allclose(carried.sort().values, torch.cat([g.flatten() for g in got.values()]).sort().values,
                          atol=0, rtol=0)
