"""Every speed-up (bertino/speedups/) against the plain code it replaces.

- cpu_dropout.py: `BitsDropout` is Bernoulli(1 − p) with the usual scale and replays under RandContext;
  `WrittenOutAttention` equals SDPA and the formula by hand; eval mode is untouched;
- sparse_embeddings.py, linear_tape.py, fast_grad_cache.py: every combination of switches gives the textbook
  GradCache's gradient (float64, 1e-10), alone and combined, with dropout on;
- installing keeps the parameters, the state-dict keys and `encode` exactly as they were;
- autocast casts each weight to low precision once per pass, not once per mini-batch.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import (C, fast_path, full_batch_from_mini_batch_forwards, grad_cache_grads, grads, max_rel_error,
                     mini_batches, retrieval_case)
from torch.utils._python_dispatch import TorchDispatchMode

from bertino import SentenceEncoder
from bertino.grad_cache import RandContext, forward_no_grad, grad_cache_step
from bertino.model import EncoderConfig, MultiHeadSelfAttention, ScaledDotProductAttention
from bertino.speedups import cpu_dropout
from bertino.speedups.cpu_dropout import BitsDropout, WrittenOutAttention, install_cpu_dropout
from bertino.speedups.fast_grad_cache import FastGradCache, install_speedups, plan_step
from bertino.speedups.heap import keep_freed_memory
from bertino.speedups.linear_tape import ALL_LINEARS, DEFAULT_TAPED, TapedLinear, install_linear_tape
from bertino.speedups.tapes import Tape, TapeDeck
from bertino.speedups.settings import SpeedupsConfig
from bertino.speedups.sparse_embeddings import SwitchableEmbedding, install_sparse_embedding_grads


# ================================================================================================ dropout
def test_bits_dropout_is_bernoulli_with_the_usual_scale():
    torch.manual_seed(0)
    drop = BitsDropout(0.1).train()
    x = torch.ones(1000, 1000, requires_grad=True)
    y = drop(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.1) < 5 * (0.1 * 0.9 / 1e6) ** 0.5, dropped  # within 5σ of a binomial
    assert torch.allclose(y[y != 0], torch.tensor(1 / 0.9))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # ∂y/∂x = m / (1 − p), the same mask
    # the 32-bit draws are uniform: every bit position is set about half the time
    bits = torch.empty(100_000, dtype=torch.int64).random_(-(2**63), None)
    ones = torch.stack([(bits >> i) & 1 for i in range(64)]).float().mean(dim=1)
    assert ((ones - 0.5).abs() < 0.01).all()
    # p = 0 and eval mode are the identity; p = 1 drops everything
    assert torch.equal(BitsDropout(0.0).train()(x), x) and torch.equal(drop.eval()(x), x)
    assert torch.equal(BitsDropout(1.0).train()(x.detach()), torch.zeros_like(x))


@pytest.mark.parametrize("p", [0.1, 1 / 3, 0.5, 0.9])
def test_lazy_mask_bits_decide_as_32_bits_would(p):
    """lazy_keep_mask keeps u ≥ round(p·2³²) for u = 2²⁴·a + b, a the 8 bits drawn for every element and b the 24
    drawn for the ties only: checked element by element against that u, rebuilt from the same generator state; and
    the drop rate is p within 5σ."""
    shape, n = (50, 100, 200), 50 * 100 * 200
    torch.manual_seed(3)
    got = cpu_dropout.lazy_keep_mask(shape, p)
    torch.manual_seed(3)
    a = torch.empty((n + 7) // 8, dtype=torch.int64).random_(-(2**63), None).view(torch.uint8)[:n].long()
    t = round(p * 2**32)
    ties = (a == t // 2**24).nonzero().squeeze(1)
    assert ties.numel() > 0  # the second draw happens: ≈ n / 256 ties
    b = torch.zeros(n, dtype=torch.int64)
    b[ties] = torch.empty(ties.numel(), dtype=torch.int64).random_(0, 2**24)
    assert torch.equal(got.flatten(), a * 2**24 + b >= t)  # a non-tie is decided by a alone, whatever its b
    dropped = 1 - got.float().mean().item()
    assert abs(dropped - p) < 5 * (p * (1 - p) / n) ** 0.5, dropped
    ctx = RandContext(torch.device("cpu"))  # and the RNG replay draws the same mask again
    first = cpu_dropout.lazy_keep_mask(shape, p)
    with ctx:
        assert torch.equal(cpu_dropout.lazy_keep_mask(shape, p), first)


def test_bits_dropout_replays_and_falls_back_to_torch_where_it_does_not_apply():
    x = torch.randn(4, 7, 16)
    drop = BitsDropout(0.3).train()
    ctx = RandContext(torch.device("cpu"))
    a = drop(x)
    with ctx:
        b = drop(x)
    assert torch.equal(a, b)  # the masks come from the CPU generator: RandContext replays them
    torch.manual_seed(5)
    mine = drop(x.to(torch.float64))
    torch.manual_seed(5)
    assert not torch.equal(mine, F.dropout(x.to(torch.float64), 0.3, training=True))  # really another kernel
    assert torch.equal(BitsDropout(0.3).eval()(x), x)


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


@pytest.mark.parametrize("options", [{}, {"memory_budget": 1, "linear_tape": True}], ids=["defaults", "budget+tape"])
def test_kept_dropout_masks_are_the_masks_pass_3_would_draw(tiny_model_dir, monkeypatch, options):
    """keep_dropout_masks: pass 3 takes pass 1's masks from the tape instead of drawing them again after the RNG
    replay: bitwise the same gradient (float64, dropout on), with pass 3 drawing nothing."""
    texts, loss_fn = retrieval_case()
    drawn = []  # (which function, shape) of every mask drawn
    for name in ("keep_mask", "lazy_keep_mask"):
        original = getattr(cpu_dropout, name)
        monkeypatch.setattr(cpu_dropout, name,
                            lambda shape, p, f=original, name=name: drawn.append((name, shape)) or f(shape, p))
    got = {}
    for keep in (False, True):
        enc = SentenceEncoder.from_pretrained(tiny_model_dir).double().train()
        fast = install_speedups(enc, SpeedupsConfig(keep_dropout_masks=keep, **options), None)
        assert (fast.masks is not None) == keep
        drawn.clear()
        got[keep] = grad_cache_grads(enc, texts, loss_fn, fast=fast), list(drawn)
    (kept, kept_draws), (drawn_again, all_draws) = got[True], got[False]
    assert kept.keys() == drawn_again.keys() and all(torch.equal(kept[n], drawn_again[n]) for n in kept)
    assert kept_draws == all_draws[: len(kept_draws)] and len(kept_draws) < len(all_draws)  # pass 1's draws only
    assert {name for name, _ in all_draws} == {"lazy_keep_mask"}  # the default lazy_mask_bits, installed
    assert max_rel_error(grad_cache_grads(enc, texts, loss_fn, fast=fast, seed=7), kept) > 1e-3  # dropout is on


def test_a_dropout_mask_tape_refuses_a_different_replay(tiny_model_dir):
    enc = SentenceEncoder.from_pretrained(tiny_model_dir).train()
    fast = install_speedups(enc, SpeedupsConfig(), None)
    batches = mini_batches(enc, ["il gatto", "la casa di roma e il suo fiume", "il cane"], size=2)
    tape = Tape()
    with fast.masks.recording(tape), torch.no_grad():
        enc(batches[0].features)
    assert len(tape.outputs) == 2 * enc.model.config.n_layers + 1 and tape.nbytes > 0  # attention, FFN, embeddings
    assert all(m.dtype == torch.bool for m in tape.outputs)
    with pytest.raises(RuntimeError, match="dropout-mask tape"):
        with fast.masks.replaying(tape):
            enc(batches[1].features)  # another mini-batch: its masks' shapes differ from the recorded ones
    assert tape.outputs == [] and fast.masks.tape is None  # freed, and the deck is idle again


@pytest.mark.parametrize("keep", [False, True], ids=["glibc-initial-thresholds", "keep-freed-memory"])
def test_keeping_freed_memory_spares_the_page_faults_of_a_repeated_step(keep):
    """keep_freed_memory: a 'step' that allocates and frees 48 MB page-faults every time under glibc's initial
    thresholds (128 KiB: the freed memory goes back to the kernel; glibc's later, adaptive thresholds depend on the
    allocation history, so the test pins the initial ones), and not at all once malloc keeps it (in a fresh process:
    the setting is process-wide)."""
    import subprocess
    import sys

    if keep and not keep_freed_memory():
        pytest.skip("the C library is not glibc: keep_freed_memory does nothing here")
    script = f"""
import ctypes, resource, torch
from bertino.speedups import heap
if {keep}:
    assert heap.keep_freed_memory()
else:  # glibc's initial thresholds, held fixed
    libc = ctypes.CDLL(None)
    assert libc.mallopt(heap.M_MMAP_THRESHOLD, 128 * 1024) == 1 and libc.mallopt(heap.M_TRIM_THRESHOLD, 128 * 1024) == 1
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():
    tensors = [torch.ones(4_000_000) for _ in range(3)]  # 3 x 16 MB, freed together
    del tensors
for _ in range(3):
    step()
before = faults()
step()
print(faults() - before)
"""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(root)})
    faults = int(out.stdout.split()[-1])
    assert faults < 200 if keep else faults > 2000, faults  # 48 MB is ≈ 12,000 pages of 4 KiB


@pytest.mark.parametrize("pad", [True, False])
def test_written_out_attention_equals_sdpa_and_the_formula(monkeypatch, pad):
    attn, x, keep = attention_inputs(pad)
    assert type(attn.attend) is ScaledDotProductAttention
    sdpa = attn.eval()(x, keep)
    assert install_cpu_dropout(attn) == 1 and type(attn.attend) is WrittenOutAttention
    assert torch.equal(attn.eval()(x, keep), sdpa)  # eval: SDPA itself
    # 1) with every key kept and a p so small that 1/(1 − p) == 1.0, the written-out path equals SDPA (eval)
    monkeypatch.setattr(cpu_dropout, "keep_mask", lambda shape, p: torch.ones(shape, dtype=torch.bool))
    attn.attend.p = attn.attend.dropout.p = 1e-300
    got = attn.train()(x, keep)
    assert torch.allclose(got, sdpa, atol=1e-12, rtol=0)
    gx_got, = torch.autograd.grad(got.sum(), x)
    gx_want, = torch.autograd.grad(attn.eval()(x, keep).sum(), x)
    assert torch.allclose(gx_got, gx_want, atol=1e-12, rtol=0)
    # 2) with a given dropout mask it is softmax(q kᵀ/√Dh + mask) · m/(1 − p) · v, by hand
    attn.attend.p = attn.attend.dropout.p = 0.2
    m = torch.rand(3, 4, 6, 6, generator=torch.Generator().manual_seed(2)) > 0.2
    monkeypatch.setattr(cpu_dropout, "keep_mask", lambda shape, p: m)
    got = attn.train()(x, keep)

    def heads(t):
        return t.view(3, 6, 4, 8).transpose(1, 2)

    q, k, v = heads(attn.q_lin(x)), heads(attn.k_lin(x)), heads(attn.v_lin(x))
    s = q @ k.transpose(-1, -2) / 8**0.5 + torch.where(keep, 0.0, float("-inf"))
    y = (s.softmax(-1) * m / 0.8) @ v
    assert torch.allclose(got, attn.out_lin(y.transpose(1, 2).reshape(3, 6, 32)), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_cpu_dropout_computes_the_plain_formulas_bit_for_bit(monkeypatch, dtype):
    """The faster kernels of cpu_dropout (the mask multiplied as bytes, the key mask added, the comparisons written
    as bytes) give the bits of the plain formulas — scores·(1/√Dh), masked_fill(−∞), softmax, x·m·(1/(1 − p)) with
    a bool m — forward and backward, in bf16 (autocast's dtype), fp32 and float64, for the same masks."""
    B, H, L, Dh, p = 3, 4, 9, 24, 0.1  # 1/√24: not a power of two, so a scale rounded elsewhere shows
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(B, H, L, Dh, generator=gen).to(dtype).requires_grad_() for _ in range(3))
    keep = torch.ones(B, 1, 1, L, dtype=torch.bool)
    keep[0, ..., 6:] = keep[2, ..., 3:] = False
    m = torch.rand(B, H, L, L, generator=gen) > p
    g = torch.randn(B, H, L, Dh, generator=gen).to(dtype)
    monkeypatch.setattr(cpu_dropout, "lazy_keep_mask", lambda shape, p: m)
    attn = WrittenOutAttention(p, lazy=True).train()
    got = attn(q, k, v, keep)
    want = ((q @ k.transpose(-1, -2)).mul_(Dh**-0.5).masked_fill_(~keep, float("-inf")).softmax(-1)
            .mul(m).mul_(1 / (1 - p)) @ v)
    assert got.dtype == dtype and torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(got, (q, k, v), g),
                                                torch.autograd.grad(want, (q, k, v), g)))
    x = torch.randn(B, L, 32, generator=gen).to(dtype).requires_grad_()
    mx = torch.rand(B, L, 32, generator=gen) > p
    monkeypatch.setattr(cpu_dropout, "lazy_keep_mask", lambda shape, p: mx)
    got, want = BitsDropout(p, lazy=True).train()(x), x.mul(mx).mul_(1 / (1 - p))
    assert torch.equal(got, want)
    assert torch.equal(*(torch.autograd.grad(y, x, torch.ones_like(y))[0] for y in (got, want)))
    a = torch.randint(0, 256, (1000,), dtype=torch.uint8, generator=gen)
    for compare in (torch.gt, torch.eq, torch.ge):
        assert torch.equal(cpu_dropout.as_bytes(compare, a, 25), compare(a, 25))


def test_a_mini_batch_without_padding_skips_the_mask(tiny_model_dir):
    enc = SentenceEncoder.from_pretrained(tiny_model_dir)
    install_cpu_dropout(enc.model)
    features = enc.tokenize(["il gatto", "la casa", "il cane"])  # same token count: no padding
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


# ================================================================================================ installing
def test_installing_keeps_parameters_keys_and_encode(tiny_model_dir):
    enc = SentenceEncoder.from_pretrained(tiny_model_dir)
    texts = ["il gatto", "Leonardo da Vinci e la Gioconda al Louvre", "roma"]
    before = enc.encode(texts)
    params = dict(enc.named_parameters())
    keys = list(enc.state_dict())
    assert install_cpu_dropout(enc.model) == 2 * enc.model.config.n_layers + 1  # attention + FFN per block, embeddings
    switch = install_sparse_embedding_grads(enc.model)
    deck = install_linear_tape(enc.model, ALL_LINEARS)
    assert sum(isinstance(m, TapedLinear) for m in enc.modules()) == 6 * enc.model.config.n_layers
    assert len(switch.tables) == 2 and all(isinstance(t, SwitchableEmbedding) for t in switch.tables)
    assert not any(type(m) in (torch.nn.Dropout, torch.nn.Embedding, torch.nn.Linear, ScaledDotProductAttention)
                   for m in enc.modules())
    assert list(enc.state_dict()) == keys  # what save_pretrained writes
    assert all(p is params[n] for n, p in enc.named_parameters())  # the same tensors: optimizer and DDP unchanged
    assert deck.tape is None and switch.on == ()
    assert (enc.encode(texts) == before).all()  # eval mode: the plain computation


# ================================================================================================ GradCache plans


SWITCHES = [dict(keep_graphs=k, keep_last=last, sparse=s, tape=t)
         for k, last, s, t in itertools.product((0, 2, 99), (True, False), (False, True), (None, DEFAULT_TAPED))]


@pytest.mark.parametrize("cpu", ["bits", "lazy-bits-kept", "torch"],
                         ids=["cpu-dropout", "cpu-dropout-lazy-bits-kept-masks", "torch-dropout"])
def test_every_combination_of_switches_gives_the_textbook_gradient(tiny_model_dir, cpu):
    """float64, dropout on: every combination of kept graphs, the free last graph, sparse embedding gradients (into
    the kept buffer) and the linear tape equals the textbook GradCache (which test_grad_cache.py proves equals the
    full batch), with the CPU dropout's 32-bit masks, and with its lazy bits and pass 1's masks kept on a tape. With
    torch's own dropout (a slow float64 kernel on CPU) the combinations of all switches at once, which the others
    imply."""
    texts, loss_fn = retrieval_case()
    combos = SWITCHES if cpu != "torch" else [p for p in SWITCHES if p["sparse"] and p["tape"] and p["keep_graphs"] < 99]
    for options in combos:
        enc = SentenceEncoder.from_pretrained(tiny_model_dir).double().train()
        masks = TapeDeck("dropout-mask tape") if cpu == "lazy-bits-kept" else None
        if cpu != "torch":
            install_cpu_dropout(enc.model, masks, lazy=masks is not None)
        classic = grad_cache_grads(enc, texts, loss_fn)  # the textbook: masks drawn again after the RNG replay
        fast = fast_path(enc, **options)
        fast.masks = masks
        err = max_rel_error(grad_cache_grads(enc, texts, loss_fn, fast=fast), classic)
        print(f"{options}: {err:.2e}")
        assert err <= 1e-10, options
    assert max_rel_error(grad_cache_grads(enc, texts, loss_fn, seed=7), classic) > 1e-3  # dropout is on


BUILT = {"defaults": {}, "budget + tape": {"memory_budget": 2, "linear_tape": True},
         "static shapes": {"length_multiple": 8, "mini_batch_tokens": 40},
         "first pass": {"first_pass_mini_batch_size": 16}, "graphs": {"cuda_graphs": True, "length_multiple": 8}}


@pytest.mark.parametrize("name", BUILT)
def test_the_built_step_gives_the_textbook_s_gradient_in_float64(tiny_model_dir, tmp_path, name):
    """The builder's Step (bertino/build.py) with `speedups: null` and with each group of switches, float64, keyed
    dropout on: the same loss and gradient to 1e-10 (the textbook runs grad_cache.grad_cache_step)."""
    from helpers import train_config, write_config

    from bertino.build import Process, build_step
    from bertino.distributed import DistInfo
    from bertino.plumbing.config import load_config
    from bertino.plumbing.data import load_tasks

    got = {}
    for which, speedups in (("textbook", None), (name, BUILT[name])):
        cfg = train_config(tmp_path, tiny_model_dir, per_device_train_batch_size=6, mini_batch_size=5)
        cfg["model"]["dropout_masks"] = "keyed"
        cfg["speedups"] = speedups
        cfg = load_config(write_config(tmp_path, cfg))
        enc = SentenceEncoder.from_pretrained(tiny_model_dir, max_seq_length=cfg.model.max_seq_length).double()
        step = build_step(cfg, enc, Process(DistInfo(), torch.device("cpu"), None))
        assert (step.fast is None) == (speedups is None)
        loss = step.loss_and_gradient("retrieval", load_tasks(cfg)["retrieval"], list(range(6)), 3)
        got[which] = (float(loss), grads(enc))
    assert got[name][0] == pytest.approx(got["textbook"][0], rel=1e-12)
    assert max_rel_error(got[name][1], got["textbook"][1]) <= 1e-10


def test_plans_keep_the_last_graphs_and_backpropagate_them_first():
    def fast(**settings):
        return FastGradCache(SpeedupsConfig(**settings), 64, None)

    plan = plan_step(fast(memory_budget=2), 6, distributed=False)
    assert plan.kept == {3, 4, 5} and plan.order == (3, 4, 5, 0, 1, 2)
    assert plan.replay_rng and not plan.tape and not plan.sparse and not plan.graphed
    assert plan_step(fast(memory_budget=99), 6, distributed=False).kept == set(range(6))
    # under DDP one mini-batch is always recomputed through the wrapper: only its backward all-reduces
    assert plan_step(fast(memory_budget=99), 6, distributed=True).kept == set(range(1, 6))
    assert plan_step(fast(keep_last_graph=False), 6, distributed=False).kept == set()
    assert plan_step(fast(), 6, distributed=False, separate_first_pass=True).kept == set()  # other chunks: none
    for buffer, sparse in ((False, {2, 3, 0}), (True, {2, 3, 0, 1})):  # the last backward (1): dense, or into the buffer
        with_switch = FastGradCache(SpeedupsConfig(memory_budget=1, embedding_grad_buffer=buffer), 64, None,
                                    sparse=install_sparse_embedding_grads(torch.nn.Sequential(torch.nn.Embedding(10, 2))))
        plan = plan_step(with_switch, 4, distributed=False)
        assert plan.order == (2, 3, 0, 1) and plan.sparse == sparse


@pytest.mark.parametrize("buffer", [False, True], ids=["last-dense", "grad-buffer"])
def test_sparse_accumulation_leaves_a_dense_gradient_and_the_switch_off(tiny_model_dir, monkeypatch, buffer):
    enc = SentenceEncoder.from_pretrained(tiny_model_dir).double().train()
    texts, loss_fn = retrieval_case()
    fast = fast_path(enc, sparse=True, embedding_grad_buffer=buffer)
    tokens = max(b.features["input_ids"].numel() for b in mini_batches(enc, texts))
    assert tokens < enc.model.embeddings.word_embeddings.num_embeddings  # the word table does go sparse
    seen = []  # sparse or not, each lookup of the word table
    original = F.embedding

    def spy(*args, **kwargs):
        if args[1] is enc.model.embeddings.word_embeddings.weight:
            seen.append(args[-1] if len(args) == 7 else kwargs.get("sparse", False))
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "embedding", spy)
    seed = 5
    torch.manual_seed(seed)
    fast.grad_cache_step(enc, mini_batches(enc, texts), loss_fn, lambda loss: loss, contextlib.nullcontext)
    monkeypatch.undo()
    # sparse backwards happened; the last one was dense, or (buffer) sparse too, into the dense buffer
    assert any(seen) and all(seen) == buffer
    word = enc.model.embeddings.word_embeddings.weight
    assert word.grad.layout == torch.strided and fast.sparse.on == ()
    if buffer:  # the next step adds into the same memory, zeroed first
        memory, first = word.grad.data_ptr(), grads(enc)
        enc.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        fast.grad_cache_step(enc, mini_batches(enc, texts), loss_fn, lambda loss: loss, contextlib.nullcontext)
        assert word.grad.data_ptr() == memory and all(torch.equal(g, first[n]) for n, g in grads(enc).items())
    # accumulating onto an existing dense gradient (two steps without zero_grad), or onto a sparse one, is the same
    twice = {}
    for name, options in (("dense", {}), ("sparse", dict(sparse=True, embedding_grad_buffer=buffer))):
        enc = SentenceEncoder.from_pretrained(tiny_model_dir).double().train()  # installs into plain modules
        fast = fast_path(enc, **options)
        assert len(fast.sparse.tables) == 2 if fast.sparse else True  # word and position tables
        for _ in range(2):
            torch.manual_seed(9)
            fast.grad_cache_step(enc, mini_batches(enc, texts), loss_fn, lambda loss: loss, contextlib.nullcontext)
        twice[name] = grads(enc)
    assert max_rel_error(twice["sparse"], twice["dense"]) <= 1e-10
    if buffer:  # a sparse `.grad` left by other code is folded into the buffer, not lost
        enc.zero_grad(set_to_none=True)
        word = enc.model.embeddings.word_embeddings.weight
        rows = torch.tensor([[1, 5]])
        word.grad = torch.sparse_coo_tensor(rows, torch.ones(2, word.shape[1], dtype=word.dtype), word.shape,
                                            check_invariants=True)
        torch.manual_seed(9)
        fast.grad_cache_step(enc, mini_batches(enc, texts), loss_fn, lambda loss: loss, contextlib.nullcontext)
        once = twice["sparse"]["model.embeddings.word_embeddings.weight"] / 2
        assert torch.allclose(word.grad[[1, 5]] - 1, once[[1, 5]], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("names", [DEFAULT_TAPED, ALL_LINEARS], ids=["default", "all"])
def test_linear_tape_equals_the_same_mask_full_batch_in_fp32(tiny_model_dir, names):
    enc = SentenceEncoder.from_pretrained(tiny_model_dir).train()
    texts, loss_fn = retrieval_case()
    torch.manual_seed(123)
    same_masks = full_batch_from_mini_batch_forwards(enc, texts, loss_fn)
    taped = grad_cache_grads(enc, texts, loss_fn, fast=fast_path(enc, tape=names))
    assert max_rel_error(taped, same_masks) <= 1e-5


def test_linear_tape_records_what_it_is_told_and_refuses_a_different_replay(tiny_model_dir):
    enc = SentenceEncoder.from_pretrained(tiny_model_dir).train()
    deck = install_linear_tape(enc.model)
    batches = mini_batches(enc, ["il gatto", "la casa di roma", "il cane"], size=2)
    tapes = [Tape() for _ in batches]
    for tape, b in zip(tapes, batches):
        with deck.recording(tape), torch.no_grad():
            enc(b.features)
    assert [len(t.outputs) for t in tapes] == [len(DEFAULT_TAPED) * enc.model.config.n_layers] * 2
    assert tapes[0].nbytes > 0
    with pytest.raises(RuntimeError, match="linear tape"):
        with deck.replaying(tapes[0]):
            enc(batches[1].features)  # another mini-batch: its shapes differ from the recorded ones
    tape = Tape()
    with deck.recording(tape), torch.no_grad():
        enc(batches[0].features)
    with pytest.raises(RuntimeError, match="replayed"):
        with deck.replaying(tape):
            pass  # nothing replayed
    assert tape.outputs == [] and deck.tape is None  # freed, and the deck is idle again


def test_linear_tape_under_bf16_autocast(nodrop_model_dir):
    enc = SentenceEncoder.from_pretrained(nodrop_model_dir).train()
    texts, loss_fn = retrieval_case()
    amp = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    plain = grad_cache_grads(enc, texts, loss_fn, autocast=amp)
    taped = grad_cache_grads(enc, texts, loss_fn, autocast=amp, fast=fast_path(enc, tape=ALL_LINEARS))
    err = max_rel_error(taped, plain)
    print(f"linear tape under bf16 autocast vs recomputation: {err:.2e}")
    assert err <= 1e-5  # the same bf16 operands in the same order: equal up to fp32 accumulation


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


def test_autocast_casts_each_weight_once_per_pass(nodrop_model_dir):
    enc = SentenceEncoder.from_pretrained(nodrop_model_dir).train()
    texts, loss_fn = retrieval_case()
    weights = [m.weight for m in enc.modules() if isinstance(m, torch.nn.Linear)]
    amp = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    counts = {}
    for size in (len(texts), C):  # one mini-batch, then ceil(28 / 5) = 6
        batches = mini_batches(enc, texts, size)
        with CountWeightCasts(weights) as first_pass:
            forward_no_grad(enc, batches, autocast=amp)
        with CountWeightCasts(weights) as step:
            grad_cache_step(enc, batches, loss_fn, autocast=amp)  # classic: both passes run every chunk
        grads(enc)
        counts[len(batches)] = (first_pass.count, step.count)
    print(f"weight casts (pass 1, whole step) by number of mini-batches: {counts}")
    assert counts[1] == counts[6] == (len(weights), 2 * len(weights))  # once per pass, whatever the chunking
