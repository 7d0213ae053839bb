"""speedups.onednn_linear (bertino/speedups/onednn_linear.py): fp32 linear layers through oneDNN.

- the autograd function's three products are the linear layer's gradient: float64, torch's kernel in oneDNN's
  place, to 1e-12 (oneDNN has no float64);
- oneDNN's fp32 kernel is as close to the float64 truth as torch's own, forward and backward;
- installing keeps parameters, state-dict keys, eval mode (`encode`) and everything but fp32 CPU training as it was;
- the built step with the lever routed through the function gives the textbook's loss and gradient (float64, 1e-10),
  also with the linear tape; in fp32 with oneDNN's kernel, GradCache = the full batch with dropout on (keyed masks);
- "auto" is on exactly on AMD CPUs with AVX-512.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from conftest import make_distilbert
from helpers import grads, max_rel_error, retrieval_case, token_ids, train_config, write_config

from bertino import SentenceEncoder
from bertino.speedups import linear_tape, onednn_linear
from bertino.speedups.onednn_linear import (OneDNNLinear, _OneDNNLinearFunction, install_onednn_linear,
                                            onednn_available, onednn_wanted)

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN linear kernel")


def torch_mm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a bᵀ + bias by torch's own kernel: what the tests put in oneDNN's place (any dtype)."""
    return F.linear(a, b, bias)


@pytest.fixture
def routed_through_the_function(monkeypatch):
    """Every CPU linear of an installed model goes through `_OneDNNLinearFunction` with torch's kernel, in any
    dtype: the function's wiring can then be checked in float64."""
    monkeypatch.setattr(onednn_linear, "onednn_applies", lambda x, w: x.device.type == "cpu")
    monkeypatch.setattr(onednn_linear, "onednn_mm", torch_mm)
    monkeypatch.setattr(linear_tape, "onednn_applies", lambda x, w: x.device.type == "cpu")
    monkeypatch.setattr(linear_tape, "onednn_mm", torch_mm)
    monkeypatch.setattr(onednn_linear, "onednn_available", lambda: True)


def linear_case(dtype, shape=(3, 5, 12)):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(7, shape[-1], generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(7, generator=g, dtype=dtype, requires_grad=True)
    up = torch.randn(*shape[:-1], 7, generator=g, dtype=dtype)  # the output's gradient
    return x, w, b, up


def value_and_grads(fn, x, w, b, up):
    y = fn(x, w, b)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), up)
    return y, gx, gw, gb


@pytest.mark.parametrize("shape", [(3, 5, 12), (9, 12)], ids=["3d", "2d"])
def test_the_function_is_the_linear_layer_and_its_gradient_in_float64(shape):
    x, w, b, up = linear_case(torch.float64, shape)
    want = value_and_grads(F.linear, x, w, b, up)
    got = value_and_grads(lambda *a: _OneDNNLinearFunction.apply(*a, torch_mm), x, w, b, up)
    for a, e in zip(got, want):
        assert a.shape == e.shape and torch.allclose(a, e, rtol=1e-12, atol=1e-12)
    # without a bias, and with only some inputs needing a gradient
    y = _OneDNNLinearFunction.apply(x.detach(), w, None, torch_mm)
    gw, = torch.autograd.grad(y, w, up)
    assert torch.allclose(gw, up.reshape(-1, 7).t() @ x.detach().reshape(-1, shape[-1]), rtol=1e-12, atol=1e-12)


@needs_onednn
def test_onednn_s_kernel_is_as_accurate_as_torch_s_in_fp32():
    """fp32, a mini-batch-sized layer: oneDNN's products are another summation order of the same numbers, as close
    to the float64 truth as torch's own kernel (within 4× its error, which is ~1e-7 relative)."""
    x, w, b, up = linear_case(torch.float32, (4, 64, 384))
    w = torch.randn(1536, 384, requires_grad=True)
    b = torch.randn(1536, requires_grad=True)
    up = torch.randn(4, 64, 1536)
    truth = value_and_grads(F.linear, *(t.detach().double().requires_grad_() for t in (x, w, b)), up.double())
    plain = value_and_grads(F.linear, x, w, b, up)
    onednn = value_and_grads(onednn_linear.linear, x, w, b, up)
    for name, mine, theirs, exact in zip(("y", "grad x", "grad W", "grad b"), onednn, plain, truth):
        err = ((mine.double() - exact).norm() / exact.norm()).item()
        ref = ((theirs.double() - exact).norm() / exact.norm()).item()
        print(f"{name}: oneDNN {err:.1e}, torch {ref:.1e}")
        assert err <= 4 * ref + 1e-7, name
    assert not torch.equal(onednn[0], plain[0]) or not torch.equal(onednn[2], plain[2])  # really another kernel


@needs_onednn
def test_installing_keeps_parameters_keys_eval_and_other_dtypes(drop_dir):
    enc = SentenceEncoder.from_pretrained(drop_dir)
    texts = ["il gatto", "Leonardo da Vinci e la Gioconda al Louvre", "roma"]
    before, keys, params = enc.encode(texts), list(enc.state_dict()), dict(enc.named_parameters())
    assert install_onednn_linear(enc.model) == 6 * enc.model.config.n_layers
    assert not any(type(m) is torch.nn.Linear for m in enc.modules())
    assert list(enc.state_dict()) == keys and all(p is params[n] for n, p in enc.named_parameters())
    assert (enc.encode(texts) == before).all()  # eval mode: torch's kernel, bitwise
    layer = next(m for m in enc.modules() if isinstance(m, OneDNNLinear)).eval()
    x = torch.randn(2, 3, layer.in_features)
    assert "OneDNN" not in layer(x.requires_grad_()).grad_fn.name()  # eval mode: torch's (tiny products may agree
    x = x.detach()  # bitwise, so the encode comparison alone could not tell)
    layer.train()
    assert layer(x).grad_fn.name() == "_OneDNNLinearFunctionBackward"  # fp32 training: oneDNN
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16 and "OneDNN" not in layer(x).grad_fn.name()  # autocast: torch's
    assert torch.equal(layer.double()(x.double()), F.linear(x.double(), layer.weight, layer.bias))  # float64


@needs_onednn
def test_auto_is_on_for_amd_cpus_with_avx512_and_large_products(monkeypatch):
    monkeypatch.setattr(onednn_linear, "onednn_available", lambda: True)
    amd = "vendor_id\t: AuthenticAMD\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n"
    assert onednn_wanted("auto", amd) == onednn_linear.AUTO_MIN_MULTIPLY_ADDS  # products large enough to pay
    assert onednn_wanted("auto", amd.replace(" avx512f", "")) is None  # AVX2 only: MKL and oneDNN measured alike
    assert onednn_wanted("auto", amd.replace("AuthenticAMD", "GenuineIntel")) is None
    assert onednn_wanted("auto", "") is None  # not an x86 /proc/cpuinfo
    assert onednn_wanted(True, "") == 0 and onednn_wanted(False, amd) is None  # true: every product
    monkeypatch.setattr(onednn_linear, "onednn_available", lambda: False)
    assert onednn_wanted(True, amd) is None  # never without the kernel
    # "auto"'s size rule: a product below the bound keeps torch's kernel
    layer = OneDNNLinear(torch.nn.Linear(32, 32), min_multiply_adds=33 * 32 * 32).train()
    assert layer(torch.randn(32, 32)).grad_fn.name() == "AddmmBackward0"
    assert layer(torch.randn(33, 32)).grad_fn.name() == "_OneDNNLinearFunctionBackward"


@pytest.fixture(scope="module")
def drop_dir(tmp_path_factory):
    return make_distilbert(tmp_path_factory.mktemp("onednn_drop"), dropout=0.1)


def built_gradient(cfg_dict, tmp_path, model_dir, dtype=torch.float64):
    """The builder's Step (bertino/build.py) on the first 6 rows at step 3 → (loss, gradients)."""
    from bertino.build import Process, build_step
    from bertino.distributed import DistInfo
    from bertino.plumbing.config import load_config
    from bertino.plumbing.data import load_tasks

    cfg = load_config(write_config(tmp_path, cfg_dict))
    enc = SentenceEncoder.from_pretrained(model_dir, max_seq_length=cfg.model.max_seq_length).to(dtype)
    step = build_step(cfg, enc, Process(DistInfo(), torch.device("cpu"), None))
    loss = step.loss_and_gradient("retrieval", load_tasks(cfg)["retrieval"], list(range(6)), 3)
    return float(loss), grads(enc), enc


@pytest.mark.parametrize("tape", [False, True], ids=["plain", "with-linear-tape"])
def test_the_built_step_through_the_function_gives_the_textbook_s_gradient_in_float64(
        drop_dir, tmp_path, routed_through_the_function, tape):
    """Every linear of the built step (kept graph, sparse embedding gradients, keyed dropout on; the tape's
    layers too) through `_OneDNNLinearFunction`: the textbook's loss and gradient to 1e-10 in float64."""
    got = {}
    for which, speedups in (("textbook", None), ("onednn", {"onednn_linear": True, "linear_tape": tape})):
        cfg = train_config(tmp_path, drop_dir, per_device_train_batch_size=6, mini_batch_size=5)
        cfg["model"]["dropout_masks"] = "keyed"
        cfg["speedups"] = speedups
        loss, g, enc = built_gradient(cfg, tmp_path, drop_dir)
        got[which] = (loss, g)
        if speedups is not None:  # it did run through the function
            n = enc.model.config.n_layers
            assert sum(type(m) is OneDNNLinear for m in enc.modules()) == (n if tape else 6 * n)  # the tape: lin1
            assert sum(getattr(m, "onednn", False) for m in enc.modules()) == (5 * n if tape else 0)
    assert got["onednn"][0] == pytest.approx(got["textbook"][0], rel=1e-12)
    err = max_rel_error(got["onednn"][1], got["textbook"][1])
    print(f"through the function, float64: {err:.1e}")
    assert err <= 1e-10


@needs_onednn
def test_grad_cache_with_onednn_equals_the_full_batch_with_dropout_on_in_fp32(drop_dir):
    """oneDNN's own kernel, fp32, keyed masks: GradCache through the fast passes (kept graph, sparse embedding
    gradients) equals one plain full-batch forward/backward of the same model — GradCache = full batch still
    holds with the lever on — and the lever really changed the kernel (not bitwise torch's gradient)."""
    from bertino.grad_cache import make_mini_batches
    from bertino.keyed_dropout import install_keyed_dropout, text_keys
    from bertino.speedups.fast_grad_cache import FastGradCache, grad_cache_step
    from bertino.speedups.settings import SpeedupsConfig
    from bertino.speedups.sparse_embeddings import install_sparse_embedding_grads

    texts, loss_fn = retrieval_case()
    results = {}
    for name in ("torch", "onednn"):
        enc = SentenceEncoder.from_pretrained(drop_dir).train()
        keys = install_keyed_dropout(enc.model)
        if name == "onednn":
            assert install_onednn_linear(enc.model) > 0
        ids = token_ids(enc, texts)
        k = text_keys(7, 3, torch.arange(len(texts)))
        full = {**ids.pad(range(len(texts)), enc.tokenizer.pad_token_id), "dropout_keys": k}
        (loss_fn(enc(full)) * 1024).backward()
        results[name, "full"] = grads(enc)
        fast = FastGradCache(SpeedupsConfig(), enc.max_seq_length, keys,
                             sparse=install_sparse_embedding_grads(enc.model))
        batches = make_mini_batches(ids, 5, enc.tokenizer.pad_token_id, text_keys=k)
        grad_cache_step(enc, batches, loss_fn, lambda loss: loss * 1024, contextlib.nullcontext, fast)
        results[name, "gradcache"] = grads(enc)
    err = max_rel_error(results["onednn", "gradcache"], results["onednn", "full"])
    kernels = max_rel_error(results["onednn", "full"], results["torch", "full"])
    print(f"oneDNN: GradCache vs full batch {err:.1e}; oneDNN vs torch's kernel {kernels:.1e}")
    assert err <= 2e-5
    assert 0 < kernels <= 2e-5


@needs_onednn
def test_training_with_onednn_logs_the_textbook_s_steps(drop_dir, tmp_path):
    """train.py in 2 processes with the lever on (oneDNN's own kernel, fp32, keyed dropout on, the defaults' fused
    AdamW) logs the loss and gradient norm of every step of ONE process running `speedups=null` (the textbook:
    torch's kernels, the multi-tensor AdamW) at the global batch, within 1e-4, and trains its weights (1e-3): the
    lever changes rounding only, and 2 processes = 1 still holds with it."""
    from helpers import assert_same_steps, rel_update_diff, run_train, weights

    base = train_config(tmp_path, drop_dir, gather_across_devices=True, logging_steps=1)
    base["model"]["dropout_masks"] = "keyed"
    for name, speedups, rows, nproc in (("textbook", None, 6, 1), ("two", {"onednn_linear": True}, 3, 2)):
        cfg = dict(base, speedups=speedups,
                   train={**base["train"], "per_device_train_batch_size": rows, "output_dir": str(tmp_path / name)})
        run_train(write_config(tmp_path, cfg, f"{name}.json"), nproc=nproc)
    assert assert_same_steps(tmp_path / "two", tmp_path / "textbook", rel=1e-4,
                             keys=("loss/retrieval", "grad_norm")) == 3
    w0 = weights(drop_dir)
    assert rel_update_diff(w0, weights(tmp_path / "two" / "final"), weights(tmp_path / "textbook" / "final")) <= 1e-3
