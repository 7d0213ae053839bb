"""Keyed dropout masks (bertino/keyed_dropout.py): a text's masks do not depend on its chunk, its padding or its
rank; they are Bernoulli(1 − p) with no measurable correlation; and with them GradCache equals ONE plain
full-batch forward/backward with dropout on.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import C, CASES, SCALE, fast_path, full_batch_plain, grads, max_rel_error, retrieval_case, token_ids

from bertino import SentenceEncoder
from bertino.grad_cache import forward_no_grad, grad_cache_step, make_mini_batches
from bertino.keyed_dropout import (DropoutKeys, GAMMA, KeyedAttention, KeyedDropout, global_text_index,
                                   install_keyed_dropout, keep_mask, mix, mix_int, text_keys)
from bertino.speedups.linear_tape import DEFAULT_TAPED


# ================================================================================================ the hash
def test_int64_multiplication_wraps_and_mix_is_splitmix64():
    """The hash relies on int64 products wrapping modulo 2⁶⁴ (two's complement), as CPU and CUDA kernels do."""
    big = torch.tensor([GAMMA, -GAMMA, 2**62], dtype=torch.int64)
    want = [((int(v) * 0xBF58476D1CE4E5B9) % 2**64) for v in big]
    got = [int(v) % 2**64 for v in big * (0xBF58476D1CE4E5B9 - 2**64)]
    assert got == want
    values = torch.randint(-2**63, 2**63 - 1, (1000,), dtype=torch.int64, generator=torch.Generator().manual_seed(0))
    assert [int(v) for v in mix(values.clone())] == [mix_int(int(v)) for v in values]
    # SplitMix64's first output for seed 0 (its reference implementation): mix(0 + γ)
    assert mix_int(0x9E3779B97F4A7C15) % 2**64 == 0xE220A8397B1DCDAF
    assert len(set(mix(torch.arange(100_000, dtype=torch.int64)).tolist())) == 100_000  # a bijection: no repeats


def masks_of(text: int, site: int, L: int, D: int = 8, step: int = 0, seed: int = 1, p: float = 0.5,
             kind: str = "hidden", others: int = 0, position: int = 0):
    """The keep-mask of one text (global index `text`) as computed inside a batch of `others` + 1 texts, at
    `position` in that batch, padded to L."""
    keys = DropoutKeys(max_positions=64)
    index = torch.tensor([100 + i for i in range(others + 1)])
    index[position] = text
    with keys.use(text_keys(seed, step, index)):
        counters = keys.counters(kind, L, D, torch.device("cpu"))
        return keep_mask(keys.site_keys(site, torch.device("cpu")), counters, p)[position]


@pytest.mark.parametrize("kind", ["hidden", "attention"])
def test_a_text_s_masks_do_not_depend_on_its_batch_padding_or_place(kind):
    alone = masks_of(7, 3, L=5, kind=kind)
    for L, others, position in ((5, 0, 0), (9, 3, 2), (20, 15, 15), (33, 4, 0)):
        m = masks_of(7, 3, L=L, kind=kind, others=others, position=position)
        assert torch.equal(m[..., :5, :5] if kind == "attention" else m[:5], alone)  # its own positions: the same
    assert not torch.equal(masks_of(8, 3, L=5, kind=kind), alone)  # another text
    assert not torch.equal(masks_of(7, 4, L=5, kind=kind), alone)  # another site (layer)
    assert not torch.equal(masks_of(7, 3, L=5, kind=kind, step=1), alone)  # another step
    assert not torch.equal(masks_of(7, 3, L=5, kind=kind, seed=2), alone)  # another seed


def test_global_indices_are_the_same_on_any_rank_as_in_one_process():
    one = global_text_index(n_columns=3, rows=4, rank=0, world_size=1).view(3, 4)  # 4 rows, column after column
    halves = [global_text_index(3, 2, rank, 2).view(3, 2) for rank in (0, 1)]  # 2 ranks × 2 rows
    assert torch.equal(torch.cat(halves, dim=1), one)


# ================================================================================================ statistics
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate_is_one_minus_p_within_five_sigma(p):
    keys = DropoutKeys(max_positions=512)
    with keys.use(text_keys(3, 11, torch.arange(64))):
        m = keep_mask(keys.site_keys(5, torch.device("cpu")), keys.counters("hidden", 128, 96, torch.device("cpu")), p)
    n = m.numel()  # 64 · 128 · 96 = 786,432
    assert abs(m.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(((a - a.mean()) * (b - b.mean())).mean() / (a.std(unbiased=False) * b.std(unbiased=False)))


def test_no_correlation_between_neighbouring_positions_channels_layers_steps_or_texts():
    """Pearson correlation of mask pairs, n ≈ 10⁵–10⁶ pairs each: |r| < 5/√n (independent masks give |r| ≈ 1/√n)."""
    cpu = torch.device("cpu")

    def site_masks(site=1, step=0, texts=32, L=64, D=64, kind="hidden"):
        keys = DropoutKeys(max_positions=64)
        with keys.use(text_keys(0, step, torch.arange(texts))):
            return keep_mask(keys.site_keys(site, cpu), keys.counters(kind, L, D, cpu), 0.5)

    m = site_masks()  # (32, 64, 64)
    pairs = {"adjacent positions": (m[:, 1:], m[:, :-1]), "adjacent channels": (m[..., 1:], m[..., :-1]),
             "adjacent texts": (m[1:], m[:-1]), "adjacent layers": (m, site_masks(site=5)),
             "adjacent sites": (m, site_masks(site=2)), "adjacent steps": (m, site_masks(step=1))}
    a = site_masks(kind="attention", D=12)  # (32, 12, 64, 64): heads, queries, keys
    pairs.update({"adjacent keys": (a[..., 1:], a[..., :-1]), "adjacent queries": (a[..., 1:, :], a[..., :-1, :]),
                  "adjacent heads": (a[:, 1:], a[:, :-1])})
    for name, (x, y) in pairs.items():
        r, bound = correlation(x, y), 5 / math.sqrt(x.numel())
        print(f"{name}: r = {r:+.5f} (bound {bound:.5f})")
        assert abs(r) < bound, name


# ================================================================================================ in the model


def keyed_encoder(folder, dtype=torch.float64):
    enc = SentenceEncoder.from_pretrained(folder).to(dtype).train()
    return enc, install_keyed_dropout(enc.model)


def test_installed_sites_and_eval_mode(dropout_model_dir):
    enc, keys = keyed_encoder(dropout_model_dir)
    texts = ["il gatto", "la casa di roma"]
    assert sum(isinstance(m, KeyedDropout) for m in enc.modules()) == 1 + enc.model.config.n_layers
    assert sum(isinstance(m, KeyedAttention) for m in enc.modules()) == enc.model.config.n_layers
    plain = SentenceEncoder.from_pretrained(dropout_model_dir).double()
    assert (enc.encode(texts) == plain.encode(texts)).all()  # eval: nothing dropped, nothing changed
    with pytest.raises(RuntimeError, match="without the texts' keys"):
        enc(enc.tokenize(texts))  # a training forward must say whose masks it draws


def test_keyed_dropout_and_attention_are_the_formulas_with_the_inverted_scale():
    """Against the formulas by hand, from the same keys: x · m / (1 − p), and softmax(q kᵀ/√Dh + pad) · m / (1 − p) · v.
    (Every other keyed test compares two paths through the same modules, where a wrong scale would cancel; here a
    missing 1/(1 − p), or one applied twice, would make train-mode activations differ from eval's in expectation.)"""
    cpu, p = torch.device("cpu"), 0.25
    keys = DropoutKeys(max_positions=64)
    index = text_keys(0, 1, torch.tensor([4, 9]))
    x = torch.randn(2, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    drop = KeyedDropout(p, site=3, keys=keys).train()
    with keys.use(index):
        m = keep_mask(keys.site_keys(3, cpu), keys.counters("hidden", 5, 8, cpu), p)  # (2, 5, 8)
        assert torch.allclose(drop(x), x * m / (1 - p), atol=1e-15, rtol=0)
    assert 0 < m.float().mean() < 1

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 5, 8, dtype=torch.float64, generator=g) for _ in range(3))  # (B, H, L, Dh)
    pad = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    pad[1, ..., 3:] = False  # the second text has 3 tokens
    attention = KeyedAttention(p, site=1, keys=keys).train()
    with keys.use(index):
        got = attention(q, k, v, pad)
        m = keep_mask(keys.site_keys(1, cpu), keys.counters("attention", 5, 4, cpu), p)  # (2, 4, 5, 5)
    probs = (q @ k.transpose(-1, -2) / 8**0.5).masked_fill(~pad, float("-inf")).softmax(-1)
    assert torch.allclose(got, (probs * m / (1 - p)) @ v, atol=1e-12, rtol=0)
    assert torch.allclose(attention.eval()(q, k, v, pad), probs @ v, atol=1e-12, rtol=0)  # eval: nothing dropped

    # the expectation: over many texts, a train-mode activation averages to the eval one (E[m / (1 − p)] = 1)
    ones = torch.ones(2000, 8, 32)
    with keys.use(text_keys(0, 2, torch.arange(2000))):
        mean = drop(ones).mean().item()
    assert abs(mean - 1) < 5 * (p / (1 - p) / ones.numel()) ** 0.5, mean


def test_a_text_embeds_the_same_alone_or_in_a_padded_batch(dropout_model_dir):
    enc, keys = keyed_encoder(dropout_model_dir)
    texts = ["il gatto", "Leonardo da Vinci e la Gioconda al Louvre di Parigi", "roma"]
    index = torch.tensor([5, 9, 2])
    batch = enc.tokenize(texts)  # padded to the longest
    with keys.use(text_keys(0, 3, index)):
        together = enc(batch)
    for i, text in enumerate(texts):
        with keys.use(text_keys(0, 3, index[i:i + 1])):
            alone = enc(enc.tokenize([text]))
        assert torch.allclose(alone[0], together[i], atol=1e-12, rtol=0), text
    with keys.use(text_keys(0, 4, index)):  # the next step: other masks
        assert (enc(batch) - together).abs().max() > 1e-3


# ================================================================================================ GradCache = full batch
def keyed_grad_cache(enc, keys, texts, loss_fn, size=C, fast=None, first_pass=None):
    """GradCache with keyed masks: the textbook (`fast` None), or the fast passes, pass 1 in chunks of `first_pass`."""
    ids = token_ids(enc, texts)
    tk = text_keys(0, 2, torch.arange(len(texts)))
    batches = make_mini_batches(ids, size, enc.tokenizer.pad_token_id, text_keys=tk)  # the keys in the features
    if fast is None:
        grad_cache_step(enc, batches, loss_fn, lambda loss: loss * SCALE)
    else:
        first = None if first_pass is None else make_mini_batches(ids, first_pass, enc.tokenizer.pad_token_id,
                                                                  text_keys=tk)
        fast.grad_cache_step(enc, batches, loss_fn, lambda loss: loss * SCALE,
                             lambda: torch.autocast("cpu", enabled=False), first)
    return grads(enc)


def keyed_full_batch(enc, keys, texts, loss_fn):
    return full_batch_plain(enc, texts, loss_fn, text_keys=text_keys(0, 2, torch.arange(len(texts))))


SWITCHES = {"textbook": None, "free last graph": {}, "memory budget 2": dict(keep_graphs=2),
            "first pass 16": dict(first_pass=16)}  # a separate first pass keeps no graph, whatever keep_last says


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_grad_cache_with_keyed_masks_equals_one_full_batch_with_dropout_on(dropout_model_dir, case, dtype, tol):
    enc, keys = keyed_encoder(dropout_model_dir, dtype)
    texts, loss_fn = CASES[case]()
    want = keyed_full_batch(enc, keys, texts, loss_fn)
    for name, options in SWITCHES.items():
        first = None if options is None else options.pop("first_pass", None)
        fast = None if options is None else fast_path(enc, keys=keys, **options)
        err = max_rel_error(keyed_grad_cache(enc, keys, texts, loss_fn, fast=fast, first_pass=first), want)
        print(f"keyed GradCache ({name}) vs ONE full batch, dropout on, {case}, {dtype}: {err:.2e}")
        assert err <= tol, name
    other = {n: g for n, g in want.items()}
    with keys.use(text_keys(0, 3, torch.arange(len(texts)))):  # dropout is really on: another step differs
        assert max_rel_error(full_batch_plain(enc, texts, loss_fn), other) > 1e-3


def test_keyed_masks_with_the_tape_and_sparse_gradients(dropout_model_dir):
    enc, keys = keyed_encoder(dropout_model_dir)
    texts, loss_fn = retrieval_case()
    want = keyed_full_batch(enc, keys, texts, loss_fn)
    fast = fast_path(enc, keys=keys, sparse=True, tape=DEFAULT_TAPED, keep_graphs=1)
    assert max_rel_error(keyed_grad_cache(enc, keys, texts, loss_fn, fast=fast), want) <= 1e-10


def test_pass_1_embeddings_do_not_depend_on_the_mini_batch_size(dropout_model_dir):
    """Mini-batches of 1, 3, 7 (a non-divisor of 28) and all 28 texts: the same embeddings with dropout on, to
    float64 rounding — each text drew its own masks whatever its chunk, its padding and its place in it."""
    enc, keys = keyed_encoder(dropout_model_dir)
    texts, _ = retrieval_case()
    ids, tk = token_ids(enc, texts), text_keys(0, 1, torch.arange(len(texts)))
    reps = {size: forward_no_grad(enc, batches)[0]
            for size in (1, 3, 7, len(texts))
            for batches in [make_mini_batches(ids, size, enc.tokenizer.pad_token_id, text_keys=tk)]}
    for size, r in reps.items():
        assert torch.allclose(r, reps[1], atol=1e-12, rtol=0), size
    stream = SentenceEncoder.from_pretrained(dropout_model_dir).double().train()  # torch's stream: chunking matters
    a, b = (forward_no_grad(stream, bs)[0] for bs in
            (make_mini_batches(ids, s, enc.tokenizer.pad_token_id) for s in (3, 7)))
    assert (a - b).abs().max() > 1e-3
