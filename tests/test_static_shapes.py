"""Static mini-batch shapes (bertino/speedups/static_shapes.py): length buckets, a token budget and empty rows cut the
batch into a small fixed set of shapes, hold every text exactly once with its own tokens, and give GradCache the
gradient of one plain full batch with dropout on (keyed masks, float64, 1e-10).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
from helpers import CASES, SCALE, fast_path, full_batch_plain, grads, max_rel_error, token_ids

from bertino import SentenceEncoder
from bertino.grad_cache import grad_cache_step
from bertino.keyed_dropout import install_keyed_dropout, text_keys
from bertino.speedups.fast_grad_cache import real_rows
from bertino.speedups.static_shapes import StaticShapes, static_mini_batches

OPTIONS = {"buckets of 4": dict(length_multiple=4), "buckets + 40 tokens": dict(length_multiple=4, mini_batch_tokens=40),
           "40 tokens, no buckets": dict(mini_batch_tokens=40), "buckets + empty rows": dict(length_multiple=4, pad_rows=True),
           "buckets + 40 tokens + empty rows": dict(length_multiple=4, mini_batch_tokens=40, pad_rows=True)}


def random_lengths(n: int, seed: int) -> np.ndarray:
    """Token counts like a retrieval batch: short queries, long passages (some at the maximum, 64)."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.integers(3, 12, n // 4), np.minimum(rng.integers(10, 90, n - n // 4), 64)])


@pytest.mark.parametrize("name", OPTIONS)
def test_every_text_once_in_a_small_set_of_shapes_that_repeats(name):
    shapes = StaticShapes(max_length=64, mini_batch_size=6, **OPTIONS[name])
    seen = set()
    for seed in range(20):  # twenty steps
        lengths = random_lengths(200, seed)
        chunks = shapes.chunks(lengths)
        texts = [t for rows, _, _ in chunks for t in rows]
        assert sorted(texts) == list(range(200))  # every text exactly once
        for rows, L, C in chunks:
            assert C >= len(rows) and L >= max(lengths[rows])
            assert C <= shapes.texts_per_chunk(L)
            if shapes.length_multiple:  # one bucket per chunk: L = min(4 ⌈n/4⌉, 64) for each of its texts
                assert {shapes.bucket(int(n)) for n in lengths[rows]} == {L}
            if shapes.mini_batch_tokens and not shapes.pad_rows and len(rows) > 1:
                assert len(rows) * L <= shapes.mini_batch_tokens
            if shapes.pad_rows:  # full, or a power of two
                assert C == shapes.texts_per_chunk(L) or C == 1 << (C - 1).bit_length()
        assert [L for _, L, _ in chunks] == sorted(L for _, L, _ in chunks)  # shortest first
        seen |= {(C, L) for _, L, C in chunks}
    if shapes.length_multiple and shapes.pad_rows:
        per_bucket = {L: shapes.texts_per_chunk(L) for L in range(4, 65, 4)}
        bound = sum(2 + int(math.log2(c)) for c in per_bucket.values())
        print(f"{name}: {len(seen)} shapes over 20 steps (bound {bound})")
        assert len(seen) <= bound
    if not shapes.length_multiple:  # without buckets, lengths wander: shapes do not repeat (why graphs need them)
        assert len(seen) > 40


def test_a_bucket_never_exceeds_the_longest_length():
    """max_length 50 is no multiple of 16: texts of 49 and 50 tokens share a bucket of 50, never one of 64 (a
    (C, 64) chunk of a 50-position model would index past its position table)."""
    shapes = StaticShapes(max_length=50, mini_batch_size=6, length_multiple=16, pad_rows=True)
    assert [shapes.bucket(n) for n in (1, 16, 17, 33, 48, 49, 50)] == [16, 16, 32, 48, 48, 50, 50]
    lengths = np.array([3, 20, 49, 50, 50, 47])
    assert max(L for _, L, _ in shapes.chunks(lengths)) == 50


def test_a_mini_batch_holds_its_texts_then_padding_then_empty_rows(dropout_model_dir):
    enc = SentenceEncoder.from_pretrained(dropout_model_dir)
    texts, _ = CASES["mnrl_2_hard_negatives"]()
    ids, keys = token_ids(enc, texts), text_keys(0, 1, torch.arange(len(texts)))
    shapes = StaticShapes(enc.max_seq_length, 8, length_multiple=4, pad_rows=True)
    batches = static_mini_batches(ids, shapes, enc.tokenizer.pad_token_id, text_keys=keys)
    assert any(b.features["input_ids"].shape[0] > len(b.texts) for b in batches)  # empty rows do occur
    for b in batches:
        C, L = b.features["input_ids"].shape
        assert L % 4 == 0 and b.features["dropout_keys"].shape == (C,)
        for i in range(C):
            ids_row, mask_row = b.features["input_ids"][i], b.features["attention_mask"][i]
            if i < len(b.texts):
                t = int(b.texts[i])
                n = int(ids.lengths[t])
                own = ids.flat[ids.offsets[t] : ids.offsets[t] + n]
                assert ids_row[:n].tolist() == own.tolist() and mask_row.tolist() == [1] * n + [0] * (L - n)
                assert ids_row[n:].eq(enc.tokenizer.pad_token_id).all() and b.features["dropout_keys"][i] == keys[t]
            else:  # an empty row: pad tokens, attention on position 0 only (never an all-masked row)
                assert ids_row.eq(enc.tokenizer.pad_token_id).all() and mask_row.tolist() == [1] + [0] * (L - 1)
                assert b.features["dropout_keys"][i] == 0


def keyed_encoder(folder):
    enc = SentenceEncoder.from_pretrained(folder).double().train()
    return enc, install_keyed_dropout(enc.model)


@pytest.mark.parametrize("case", CASES)
def test_static_shapes_give_the_full_batch_s_gradient_with_dropout_on(dropout_model_dir, case):
    """float64, keyed masks, dropout 0.3: every option, with and without the free last graph, equals ONE plain
    full-batch forward/backward — the gradient of today's mini-batching (test_keyed_dropout.py) — to 1e-10."""
    enc, keys = keyed_encoder(dropout_model_dir)
    texts, loss_fn = CASES[case]()
    tk = text_keys(0, 2, torch.arange(len(texts)))
    want = full_batch_plain(enc, texts, loss_fn, text_keys=tk)
    ids = token_ids(enc, texts)
    for name, options in OPTIONS.items():
        shapes = StaticShapes(enc.max_seq_length, 5, **options)
        for keep_last in (False, True):
            batches = static_mini_batches(ids, shapes, enc.tokenizer.pad_token_id, text_keys=tk)
            fast = fast_path(enc, keys=keys, keep_last=keep_last)
            loss = fast.grad_cache_step(enc, batches, loss_fn, lambda x: x * SCALE, contextlib.nullcontext)
            err = max_rel_error(grads(enc), want)
            print(f"{case}, {name}, keep_last={keep_last}: {err:.2e}, loss {float(loss):.6f}")
            assert err <= 1e-10, (name, keep_last)


def test_empty_rows_add_nothing_and_are_cut_off(dropout_model_dir):
    """An empty row's output is not in the cache (`real_rows`): without the cut (the textbook's passes, which never
    see empty rows) the loss sees more rows and fails."""
    enc, keys = keyed_encoder(dropout_model_dir)
    texts, loss_fn = CASES["mnrl_2_hard_negatives"]()
    tk = text_keys(0, 2, torch.arange(len(texts)))
    shapes = StaticShapes(enc.max_seq_length, 8, length_multiple=4, pad_rows=True)
    batches = static_mini_batches(token_ids(enc, texts), shapes, enc.tokenizer.pad_token_id, text_keys=tk)
    padded = [b for b in batches if b.features["input_ids"].shape[0] > len(b.texts)]
    assert padded and all(real_rows(torch.zeros(b.features["input_ids"].shape[0], 3), b).shape == (len(b.texts), 3)
                          for b in padded)
    with pytest.raises(RuntimeError):
        grad_cache_step(enc, batches, loss_fn)  # no cut
