"""Every performance path against its plain version.

- model.py: the fast CPU dropout (`Dropout`, `keep_mask`), the written-out attention used with it, the skipped
  attention mask of a mini-batch without padding;
- grad_cache.py: sparse accumulation of the embedding gradients in pass 3, the linear tape (linear_tape.py);
- autocast: each weight is cast to low precision once per pass, not once per mini-batch.
The GradCache cases reuse tests/test_grad_cache.py's batch (7 rows × 4 columns, mini-batches of 5, Matryoshka).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_distilbert
from test_grad_cache import C, SCALE, full_batch_from_mini_batch_forwards, grads, max_rel_error, retrieval_case
from torch.utils._python_dispatch import TorchDispatchMode

from bertino import SentenceEncoder, model as model_module
from bertino.grad_cache import (
    RandContext,
    embedding_tables,
    forward_no_grad,
    grad_cache_step,
    make_mini_batches,
    pad_batch,
)
from bertino.linear_tape import DEFAULT_TAPED, LinearTape
from bertino.model import Dropout, EncoderConfig, MultiHeadSelfAttention

ALL_LINEARS = DEFAULT_TAPED + ("lin1",)


# ================================================================================================ dropout
def test_fast_dropout_is_bernoulli_with_the_usual_scale():
    torch.manual_seed(0)
    drop = Dropout(0.1).train()
    assert drop.fast_cpu
    x = torch.ones(1000, 1000, requires_grad=True)
    y = drop(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.1) < 0.002, dropped  # 1e6 draws: σ = 3e-4
    assert torch.allclose(y[y != 0], torch.tensor(1 / 0.9))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # ∂y/∂x = m / (1 − p), the same mask
    # the 32-bit draws are uniform: every bit position is set about half the time
    bits = torch.empty(100_000, dtype=torch.int64).random_(-(2**63), None)
    ones = torch.stack([(bits >> i) & 1 for i in range(64)]).float().mean(dim=1)
    assert ((ones - 0.5).abs() < 0.01).all()
    # p = 0 and eval mode are the identity; p = 1 drops everything
    assert torch.equal(Dropout(0.0).train()(x), x) and torch.equal(drop.eval()(x), x)
    assert torch.equal(Dropout(1.0).train()(x.detach()), torch.zeros_like(x))


def test_fast_dropout_replays_and_the_plain_path_is_torchs():
    x = torch.randn(4, 7, 16)
    drop = Dropout(0.3).train()
    ctx = RandContext(torch.device("cpu"))
    a = drop(x)
    with ctx:
        b = drop(x)
    assert torch.equal(a, b)  # the masks come from the CPU generator: RandContext replays them
    drop.fast_cpu = False
    torch.manual_seed(5)
    plain = drop(x)
    torch.manual_seed(5)
    assert torch.equal(plain, F.dropout(x, 0.3, training=True))


# ================================================================================================ attention
def attention_inputs(pad: bool):
    cfg = EncoderConfig(dim=32, n_heads=4, attention_dropout=0.2)
    torch.manual_seed(1)
    attn = MultiHeadSelfAttention(cfg).double()
    x = torch.randn(3, 6, 32, dtype=torch.float64, requires_grad=True)
    keep = torch.ones(3, 1, 1, 6, dtype=torch.bool)
    if pad:
        keep[0, ..., 4:] = False
        keep[2, ..., 2:] = False
    return attn, x, keep


@pytest.mark.parametrize("pad", [True, False])
def test_written_out_attention_equals_sdpa_and_the_formula(monkeypatch, pad):
    attn, x, keep = attention_inputs(pad)
    # 1) with every key kept and a p so small that 1/(1 − p) == 1.0, the written-out path equals SDPA (eval)
    monkeypatch.setattr(model_module, "keep_mask", lambda shape, p: torch.ones(shape, dtype=torch.bool))
    attn.dropout.p = 1e-300
    got = attn.train()(x, keep)
    want = attn.eval()(x, keep)
    attn.dropout.p = 0.2
    assert torch.allclose(got, want, atol=1e-12, rtol=0)
    gx_got, = torch.autograd.grad(got.sum(), x)
    gx_want, = torch.autograd.grad(want.sum(), x)
    assert torch.allclose(gx_got, gx_want, atol=1e-12, rtol=0)
    # 2) with a given dropout mask it is softmax(q kᵀ/√Dh + mask) · m/(1 − p) · v, by hand
    g = torch.Generator().manual_seed(2)
    m = torch.rand(3, 4, 6, 6, generator=g) > 0.2
    monkeypatch.setattr(model_module, "keep_mask", lambda shape, p: m)
    got = attn.train()(x, keep)

    def heads(t):
        return t.view(3, 6, 4, 8).transpose(1, 2)

    q, k, v = heads(attn.q_lin(x)), heads(attn.k_lin(x)), heads(attn.v_lin(x))
    s = q @ k.transpose(-1, -2) / 8**0.5 + torch.where(keep, 0.0, float("-inf"))
    y = (s.softmax(-1) * m / 0.8) @ v
    want = attn.out_lin(y.transpose(1, 2).reshape(3, 6, 32))
    assert torch.allclose(got, want, atol=1e-12, rtol=0)


def test_a_mini_batch_without_padding_skips_the_mask(tiny_model_dir):
    enc = SentenceEncoder.from_pretrained(tiny_model_dir)
    texts = ["il gatto", "la casa", "il cane"]  # same token count: no padding
    features = enc.tokenize(texts)
    assert bool(features["attention_mask"].all())
    x = enc.model.embeddings(features["input_ids"])
    keep = features["attention_mask"][:, None, None, :].bool()
    for mode in ("eval", "train"):
        getattr(enc, mode)()
        torch.manual_seed(3)
        with_mask = enc.model.transformer(x, keep)
        torch.manual_seed(3)
        without = enc.model.transformer(x, None)
        assert torch.allclose(with_mask, without, atol=1e-6, rtol=0), mode


# ================================================================================================ GradCache paths
@pytest.fixture(scope="module")
def drop_dir(tmp_path_factory):
    """Dropout on, and a vocabulary larger than a mini-batch's tokens, so sparse accumulation really happens."""
    return make_distilbert(tmp_path_factory.mktemp("perf_drop"), dropout=0.1)


def grad_cache_grads(enc, texts, loss_fn, seed=123, **kw):
    torch.manual_seed(seed)
    mbs = make_mini_batches(enc.token_ids(texts), C, enc.tokenizer.pad_token_id)
    grad_cache_step(enc, enc, mbs, loss_fn, scale_fn=lambda loss: loss * SCALE, **kw)
    return grads(enc)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_sparse_embedding_accumulation_equals_dense(drop_dir, dtype, tol):
    enc = SentenceEncoder.from_pretrained(drop_dir).to(dtype).train()
    texts, loss_fn = retrieval_case(enc)
    tables = embedding_tables(enc)
    tokens = max(f["input_ids"].numel() for f in make_mini_batches(enc.token_ids(texts), C, 0).features)
    assert tokens < enc.model.embeddings.word_embeddings.num_embeddings  # the word table does go sparse
    for keep in (0, 2):
        dense = grad_cache_grads(enc, texts, loss_fn, keep_graphs=keep, sparse_embeddings=())
        torch.manual_seed(123)
        mbs = make_mini_batches(enc.token_ids(texts), C, enc.tokenizer.pad_token_id)
        grad_cache_step(enc, enc, mbs, loss_fn, scale_fn=lambda loss: loss * SCALE, keep_graphs=keep,
                        sparse_embeddings=tables)
        word = enc.model.embeddings.word_embeddings.weight.grad
        assert word.layout == torch.strided  # the last mini-batch's dense backward made it dense again
        assert all(e.sparse is False for e in tables)  # the flag is restored
        sparse = grads(enc)
        err = max_rel_error(sparse, dense)
        print(f"sparse vs dense embedding gradients, {dtype}, keep_graphs={keep}: {err:.2e}")
        assert err <= tol
    # accumulating onto an existing dense gradient (two steps without zero_grad) is the same too
    twice = {}
    for name, sparse_tables in (("dense", ()), ("sparse", tables)):
        for _ in range(2):
            torch.manual_seed(9)
            mbs = make_mini_batches(enc.token_ids(texts), C, enc.tokenizer.pad_token_id)
            grad_cache_step(enc, enc, mbs, loss_fn, sparse_embeddings=sparse_tables)
        twice[name] = grads(enc)
    assert max_rel_error(twice["sparse"], twice["dense"]) <= tol


@pytest.mark.parametrize("names", [DEFAULT_TAPED, ALL_LINEARS], ids=["default", "all"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_linear_tape_equals_recomputation_and_the_full_batch(drop_dir, names, dtype, tol):
    enc = SentenceEncoder.from_pretrained(drop_dir).to(dtype).train()
    texts, loss_fn = retrieval_case(enc)
    torch.manual_seed(123)
    same_masks = full_batch_from_mini_batch_forwards(enc, texts, loss_fn)
    for keep in (0, 2):
        plain = grad_cache_grads(enc, texts, loss_fn, keep_graphs=keep)
        taped = grad_cache_grads(enc, texts, loss_fn, keep_graphs=keep, tape_linears=names)
        err_plain, err_full = max_rel_error(taped, plain), max_rel_error(taped, same_masks)
        print(f"linear tape {sorted(names)}, {dtype}, keep_graphs={keep}: vs recomputation {err_plain:.2e}, "
              f"vs same-mask full batch {err_full:.2e}")
        assert err_plain <= tol and err_full <= tol


def test_linear_tape_records_what_it_is_told_and_refuses_a_different_replay(drop_dir):
    enc = SentenceEncoder.from_pretrained(drop_dir).train()
    n_layers = enc.model.config.n_layers
    mbs = make_mini_batches(enc.token_ids(["il gatto", "la casa di roma", "il cane"]), 2, enc.tokenizer.pad_token_id)
    first = forward_no_grad(enc, mbs, tape_linears=DEFAULT_TAPED)
    assert [len(t.outputs) for t in first.tapes] == [len(DEFAULT_TAPED) * n_layers] * 2
    assert first.tapes[0].nbytes > 0
    with pytest.raises(RuntimeError, match="linear tape"):
        with first.tapes[0].replaying():
            enc(mbs.features[1])  # another mini-batch: its shapes differ from the recorded ones
    tape = LinearTape(DEFAULT_TAPED)
    with tape.recording():
        with torch.no_grad():
            enc(mbs.features[0])
    with pytest.raises(RuntimeError, match="replayed"):
        with tape.replaying():
            pass  # nothing replayed
    assert tape.outputs == []  # freed either way


def test_linear_tape_under_bf16_autocast(no_dropout_bf16_dir):
    enc = SentenceEncoder.from_pretrained(no_dropout_bf16_dir).train()
    texts, loss_fn = retrieval_case(enc)
    amp = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    plain = grad_cache_grads(enc, texts, loss_fn, autocast=amp)
    taped = grad_cache_grads(enc, texts, loss_fn, autocast=amp, tape_linears=ALL_LINEARS)
    err = max_rel_error(taped, plain)
    print(f"linear tape under bf16 autocast vs recomputation: {err:.2e}")
    assert err <= 1e-5  # the same bf16 operands in the same order: equal up to fp32 accumulation


@pytest.fixture(scope="module")
def no_dropout_bf16_dir(tmp_path_factory):
    return make_distilbert(tmp_path_factory.mktemp("perf_nodrop"), dropout=0.0)


# ================================================================================================ autocast cache
class CountWeightCasts(TorchDispatchMode):
    """Counts `_to_copy` calls whose input is one of the given parameters (by storage)."""

    def __init__(self, params):
        super().__init__()
        self.ptrs = {p.data_ptr() for p in params}
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in self.ptrs:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_autocast_casts_each_weight_once_per_pass(no_dropout_bf16_dir):
    enc = SentenceEncoder.from_pretrained(no_dropout_bf16_dir).train()
    texts, loss_fn = retrieval_case(enc)
    weights = [m.weight for m in enc.modules() if isinstance(m, torch.nn.Linear)]
    amp = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    counts = {}
    for mini in (len(texts), C):  # one mini-batch, then ceil(28 / 5) = 6
        mbs = make_mini_batches(enc.token_ids(texts), mini, enc.tokenizer.pad_token_id)
        with CountWeightCasts(weights) as first_pass:
            forward_no_grad(enc, mbs, autocast=amp)
        with CountWeightCasts(weights) as step:
            grad_cache_step(enc, enc, mbs, loss_fn, autocast=amp, keep_last=False)  # both passes run every chunk
        grads(enc)
        counts[len(mbs)] = (first_pass.count, step.count)
    print(f"weight casts (pass 1, whole step) by number of mini-batches: {counts}")
    assert counts[1] == counts[6] == (len(weights), 2 * len(weights))  # once per pass, whatever the chunking


def test_plain_full_batch_and_encode_unchanged_by_the_fast_paths(tiny_model_dir):
    """The fast paths only change how masks are drawn: eval outputs do not depend on them at all."""
    enc = SentenceEncoder.from_pretrained(tiny_model_dir)
    texts = ["il gatto", "Leonardo da Vinci e la Gioconda al Louvre", "roma"]
    a = enc.encode(texts)
    Dropout.fast_cpu = False
    try:
        b = enc.encode(texts)
        ref = enc.eval()(pad_batch(enc.token_ids(texts), range(3), enc.tokenizer.pad_token_id))
    finally:
        Dropout.fast_cpu = True
    assert (torch.from_numpy(a) - ref.detach()).abs().max() < 1e-5
    assert (a == b).all()


@pytest.mark.parametrize("fast", [True, False], ids=["fast-cpu-dropout", "torch-dropout-sdpa"])
def test_grad_cache_with_dropout_on_both_dropout_paths(drop_dir, fast, monkeypatch):
    """GradCache = the same-mask full batch whichever dropout path runs (the written-out one or SDPA's)."""
    monkeypatch.setattr(Dropout, "fast_cpu", fast)
    enc = SentenceEncoder.from_pretrained(drop_dir).double().train()
    texts, loss_fn = retrieval_case(enc)
    torch.manual_seed(123)
    want = full_batch_from_mini_batch_forwards(enc, texts, loss_fn)
    err = max_rel_error(grad_cache_grads(enc, texts, loss_fn), want)
    print(f"GradCache vs same-mask full batch, fast_cpu={fast}: {err:.2e}")
    assert err <= 1e-10
    assert max_rel_error(grad_cache_grads(enc, texts, loss_fn, seed=7), want) > 1e-3  # dropout is on


def test_mini_batches_end_with_a_full_one_of_the_longest_texts(tiny_model_dir):
    enc = SentenceEncoder.from_pretrained(tiny_model_dir)
    texts, _ = retrieval_case(enc)  # 28 texts, C = 5: sizes 3, 5, 5, 5, 5, 5
    ids = enc.token_ids(texts)
    mbs = make_mini_batches(ids, C, enc.tokenizer.pad_token_id)
    assert mbs.sizes == [3, 5, 5, 5, 5, 5]
    lengths = [len(ids[i]) for i in mbs.order.tolist()]
    assert lengths == sorted(lengths)  # shortest first
    assert sorted(mbs.order.tolist()) == list(range(len(texts)))


@pytest.mark.parametrize("keep", [0, 2, 99])
def test_keeping_the_last_graph_for_free_changes_nothing(drop_dir, keep):
    """keep_last (default) backpropagates pass 1's last graph instead of recomputing it: the same gradient."""
    enc = SentenceEncoder.from_pretrained(drop_dir).double().train()
    texts, loss_fn = retrieval_case(enc)
    torch.manual_seed(123)
    want = full_batch_from_mini_batch_forwards(enc, texts, loss_fn)
    for keep_last in (False, True):
        err = max_rel_error(grad_cache_grads(enc, texts, loss_fn, keep_graphs=keep, keep_last=keep_last), want)
        print(f"keep_graphs={keep}, keep_last={keep_last}: {err:.2e}")
        assert err <= 1e-10
