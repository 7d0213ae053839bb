"""The checks that need a GPU, in one short run: RNG replay of CUDA dropout, GradCache = full batch on CUDA, the
fp16 autocast + GradScaler path (including an overflowing step that must be skipped), and the fast path (keyed
masks, static shapes with empty rows, captured CUDA graphs: bertino/speedups/cuda_graphs.py).

    python scripts/cuda_checks.py --model MODEL_FOLDER [--json OUT.json]      # on a machine with CUDA
    python scripts/cuda_checks.py --model MODEL_FOLDER --device cpu           # the same logic on the CPU (dry run)

The CPU test suite proves these on the CPU; on CUDA two things differ and are checked here:
  - dropout masks come from the CUDA generator (Philox; inside SDPA's fused kernels for attention dropout), and
    pass 3 must replay exactly the masks of pass 1 — also when autograd is on in pass 3 and off in pass 1, which can
    steer SDPA to another kernel;
  - fp16 needs a GradScaler, whose scale travels inside the GradCache cache (grad_cache.build_cache).
Every check prints one line and lands in the JSON; the exit status is 1 if any check fails.

The model runs as train.py runs it with the default `speedups`: installed right after loading
(`fast_grad_cache.install_speedups`: the CPU dropout — torch's own dropout on CUDA tensors —, sparse embedding
gradients), and GradCache's steps run the fast passes with those switches (the free last graph kept, sparse
embedding gradients for every backward but the last, no linear tape, no memory budget). The RNG-replay check looks
at the textbook's own snapshots (`grad_cache.forward_no_grad` returns one per mini-batch, every one recomputed).
`--fp16` also runs the fp16 checks on a CPU (dry run; on CUDA they always run).

The fast path (checks named fast_path_*): keyed dropout masks, mini-batches padded to multiples of 16 tokens with
empty rows (`StaticShapes`), passes 1 and 3 replayed as captured CUDA graphs (`GraphedChunks`). It must give
(a) captured graphs; (b) pass-1 embeddings bitwise equal to an eager autograd forward of the same chunk and keys
(so pass 3 replays pass 1's masks); (c) one plain full batch's gradient with dropout ON (keyed masks); (d) the
gradient of the same code run uncaptured (the CPU fallback the tests prove); (e) fp16 + GradScaler within fp16
accuracy, and an overflowing step skipped; (f) no host synchronisation inside the step (CUDA's sync debug mode,
counted for the default path too); (g) under DDP (one process) the last mini-batch eager through the wrapper and
one all-reduce carrying the whole gradient; plus (h) the memory probe of speedups.auto_mini_batch_gib
and (i) fused AdamW = foreach AdamW. On a CPU (dry run) the same code runs uncaptured and (f) is skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_step import DIMS, WEIGHTS, batch_texts, load_pairs  # noqa: E402

from bertino import SentenceEncoder  # noqa: E402
from bertino.batching import PackedTokenIds  # noqa: E402
from bertino.grad_cache import forward_no_grad, make_mini_batches  # noqa: E402
from bertino.losses import LOSSES  # noqa: E402
from bertino.model import ScaledDotProductAttention  # noqa: E402
from bertino.objectives import Objective  # noqa: E402
from bertino.keyed_dropout import install_keyed_dropout, text_keys  # noqa: E402
from bertino.optim import make_optimizer  # noqa: E402
from bertino.speedups.cuda_graphs import GraphedChunks  # noqa: E402
from bertino.speedups.fast_grad_cache import FastGradCache, install_speedups, with_settings  # noqa: E402
from bertino.speedups.memory_fit import choose_mini_batch_size, cuda_probe  # noqa: E402
from bertino.speedups.settings import SpeedupsConfig  # noqa: E402
from bertino.speedups.static_shapes import StaticShapes, static_mini_batches  # noqa: E402

ROWS, NEGATIVES, MINI = 16, 2, 8  # 16 rows × 4 columns = 64 texts, mini-batches of 8
N_COLUMNS = 2 + NEGATIVES


def grads(enc) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().float().clone() for n, p in enc.named_parameters() if p.grad is not None}
    enc.zero_grad(set_to_none=True)
    return out


def rel_error(a: dict, b: dict) -> tuple[float, float]:
    """(global ‖a − b‖/‖b‖ over all parameters, max per-parameter relative error except k_lin.bias).

    k_lin.bias has an analytically zero gradient (a constant shift inside each softmax row), so its relative
    error is rounding noise over rounding noise; see `max_rel_error` in tests/helpers.py.
    """
    num = torch.sqrt(sum((a[n] - b[n]).double().norm() ** 2 for n in b))
    den = torch.sqrt(sum(b[n].double().norm() ** 2 for n in b))
    per = max(((a[n] - b[n]).norm() / b[n].norm()).item() for n in b if not n.endswith("k_lin.bias"))
    return (num / den).item(), per


class Checks:
    def __init__(self):
        self.results: dict[str, dict] = {}

    def record(self, name: str, ok: bool, **figures) -> None:
        self.results[name] = {"ok": bool(ok), **figures}
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
        print(f"[{'PASS' if ok else 'FAIL'}] {name}: {shown}", flush=True)


def set_dropout(enc: SentenceEncoder, p: float | None) -> None:
    """Every dropout rate of the model, the attention probabilities' included; p=None restores the configured rates."""
    for m in enc.modules():
        if isinstance(m, (torch.nn.Dropout, ScaledDotProductAttention)):  # attention: its own `p` (SDPA's dropout_p)
            if not hasattr(m, "_configured_p"):
                m._configured_p = m.p
            m.p = m._configured_p if p is None else p


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a model folder (or any source SentenceEncoder loads)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--max-seq-length", type=int, default=64)
    p.add_argument("--json", type=Path)
    p.add_argument("--fp16", action="store_true", help="also run the fp16 + GradScaler checks off CUDA (dry run)")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # the equivalence checks compare fp32 with fp32
    torch.backends.cudnn.allow_tf32 = False

    checks = Checks()
    enc = SentenceEncoder.from_pretrained(args.model, max_seq_length=args.max_seq_length).to(device).train()
    # the speed-ups train.py installs by default (bertino/build.py), and their switches in GradCache's passes
    fast = install_speedups(enc, SpeedupsConfig(), None)

    def step(scale_fn=lambda x: x, autocast=contextlib.nullcontext):
        return fast.grad_cache_step(enc, mbs, loss_fn, scale_fn, autocast)
    texts = batch_texts(load_pairs(), 0, ROWS, NEGATIVES)
    kept = [(d, w) for d, w in zip(DIMS, WEIGHTS) if d <= enc.dim] or [(enc.dim, 1.0)]  # a small model: its own dim
    objective = Objective(LOSSES["cached_mnrl"], dims=[d for d, _ in kept], weights=[w for _, w in kept])
    loss_fn = lambda reps: objective(reps, N_COLUMNS)  # noqa: E731
    token_ids = PackedTokenIds.tokenize(enc, texts)
    pad_id = enc.tokenizer.pad_token_id
    mbs = make_mini_batches(token_ids, MINI, pad_id, device)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "texts": len(texts), "mini_batches": len(mbs)}
    print(info, flush=True)

    # 1. RNG replay: pass 1 (no autograd) and pass 3 (autograd) draw the same dropout masks.
    torch.manual_seed(0)
    reps, rng_states = forward_no_grad(enc, mbs)  # (T, D), text order; one RNG snapshot per mini-batch
    outs = [reps[b.texts] for b in mbs]  # pass 1's output of each mini-batch
    same = [torch.equal(_replay(enc, rng, b), outs[i]) for i, (b, rng) in enumerate(zip(mbs, rng_states))]
    differs = [not torch.equal(enc(b.features).detach(), outs[i]) for i, b in enumerate(mbs)]
    checks.record("rng_replay_bitwise", all(same) and all(differs), replayed_equal=f"{sum(same)}/{len(same)}",
                  unreplayed_differ=f"{sum(differs)}/{len(differs)}")

    # 2. GradCache = full batch, fp32, dropout off: one padded forward of all texts, one backward.
    set_dropout(enc, 0.0)
    full = _full_batch(enc, token_ids, pad_id, loss_fn, device)
    step(scale_fn=lambda x: x * 1024.0)
    gc = {k: v / 1024.0 for k, v in grads(enc).items()}
    glob, per = rel_error(gc, full)
    checks.record("gradcache_equals_full_batch_dropout_off_fp32", glob < 1e-4, global_rel=glob, max_param_rel=per)

    # 3. Dropout on: GradCache = one autograd graph over the same mini-batch forwards (same masks, same order).
    set_dropout(enc, None)
    torch.manual_seed(123)
    outs = torch.cat([enc(b.features) for b in mbs])  # (T, D), mini-batch order, pass 1's RNG order
    reps = torch.empty_like(outs)
    reps[torch.cat([b.texts for b in mbs])] = outs
    loss_fn(reps).backward()
    same_masks = grads(enc)
    torch.manual_seed(123)
    step()
    glob, per = rel_error(grads(enc), same_masks)
    torch.manual_seed(7)
    step()
    other_seed, _ = rel_error(grads(enc), same_masks)
    checks.record("gradcache_equals_same_mask_full_batch_dropout_on", glob < 1e-4 and other_seed > 1e-3,
                  global_rel=glob, max_param_rel=per, other_seed_global_rel=other_seed)

    # 4. fp16 autocast + GradScaler: the scale rides in the cache; unscaled gradients match fp32 to fp16 accuracy.
    if device.type == "cuda" or args.fp16:
        set_dropout(enc, 0.0)
        fp32 = _full_batch(enc, token_ids, pad_id, loss_fn, device)
        scaler = torch.amp.GradScaler(device.type, init_scale=2.0**16)
        optimizer = torch.optim.SGD(enc.parameters(), lr=0.0)
        autocast = lambda: torch.autocast(device.type, dtype=torch.float16)  # noqa: E731
        loss = step(scaler.scale, autocast)
        scaler.unscale_(optimizer)
        g16 = grads(enc)
        glob, per = rel_error(g16, fp32)
        with autocast():
            full16 = loss_fn(enc(_features(token_ids, pad_id, device)))
        full16.backward()
        ref16, _ = rel_error(grads(enc), fp32)
        checks.record("fp16_gradcache_gradscaler_matches_fp32", glob < max(3 * ref16, 1e-3) and torch.isfinite(loss),
                      global_rel=glob, full_batch_fp16_global_rel=ref16, loss=float(loss))

        # an overflowing scale: the step is skipped (weights untouched), the scale backs off
        untouched, scale = overflowing_step(enc, device, lambda scale_fn: step(scale_fn, autocast))
        checks.record("fp16_overflow_step_skipped", untouched and scale < OVERFLOW_SCALE, scale_after=scale)
        enc.zero_grad(set_to_none=True)
        set_dropout(enc, None)

    fast_path_checks(checks, args, token_ids, loss_fn, device)

    out = {"info": info, "checks": checks.results}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    sys.exit(0 if all(r["ok"] for r in checks.results.values()) else 1)


OVERFLOW_SCALE = 2.0**60  # a GradScaler scale that overflows fp16 gradients at once


def overflowing_step(enc, device: torch.device, backward) -> tuple[bool, float]:
    """`backward(scale_fn)` under a GradScaler whose scale overflows, then the scaler's step → (the weights are
    untouched, the scale after the update): the step must be skipped and the scale must back off."""
    scaler = torch.amp.GradScaler(device.type, init_scale=OVERFLOW_SCALE)
    optimizer = torch.optim.SGD(enc.parameters(), lr=1.0)
    before = [q.detach().clone() for q in enc.parameters()]
    backward(scaler.scale)
    scaler.step(optimizer)
    scaler.update()
    return all(torch.equal(a, q) for a, q in zip(before, enc.parameters())), scaler.get_scale()


def fast_path_checks(checks: Checks, args, token_ids: PackedTokenIds, loss_fn, device: torch.device) -> None:
    """(a)–(i) of the module docstring, on a fresh copy of the model with keyed masks."""
    import contextlib
    import types
    import warnings

    enc = SentenceEncoder.from_pretrained(args.model, max_seq_length=args.max_seq_length).to(device).train()
    keys = install_keyed_dropout(enc.model)
    default = install_speedups(enc, SpeedupsConfig(), keys)  # as train.py installs them (graphs keep sparse off)
    graphed = with_settings(default, cuda_graphs=True, length_multiple=16)
    pad_id, T = enc.tokenizer.pad_token_id, len(token_ids)
    tk = text_keys(0, 1, torch.arange(T))
    shapes = StaticShapes(enc.max_seq_length, MINI, length_multiple=16, pad_rows=True)

    def batches():
        return static_mini_batches(token_ids, shapes, pad_id, device, text_keys=tk)

    def fast_step(chunks, model=None, scale_fn=lambda x: x, autocast=contextlib.nullcontext):
        fast = FastGradCache(graphed.settings, graphed.max_length, keys, graphed.sparse, None, chunks)
        return fast.grad_cache_step(model or enc, batches(), loss_fn, scale_fn, autocast)

    chunks = GraphedChunks(enc, keys, enc.max_seq_length)
    fast_step(chunks)  # captures every shape of this batch
    fast = grads(enc)
    empty = sum(b.features["input_ids"].shape[0] - len(b.texts) for b in batches())
    checks.record("fast_path_captured", chunks.capture == (device.type == "cuda") and len(chunks.again_graphs) > 0,
                  captured=bool(chunks.capture), shapes=len(chunks.again_graphs), empty_rows=empty)

    pairs = [(chunks.forward(b), _keyed_forward(enc, keys, b)) for b in batches()]
    same = [torch.equal(a, b) for a, b in pairs]
    checks.record("fast_path_pass1_graph_equals_eager_forward_bitwise", all(same), equal=f"{sum(same)}/{len(same)}",
                  max_abs_diff=max(float((a - b).abs().max()) for a, b in pairs))

    features = _features(token_ids, pad_id, device)
    loss_fn(enc({**features, "dropout_keys": tk.to(device)})).backward()
    full = grads(enc)
    glob, per = rel_error(fast, full)
    other_keys = text_keys(0, 2, torch.arange(T)).to(device)  # another step's masks: dropout is really on
    loss_fn(enc({**features, "dropout_keys": other_keys})).backward()
    other, _ = rel_error(grads(enc), full)
    checks.record("fast_path_equals_full_batch_dropout_on_fp32", glob < 1e-4 and other > 1e-3, global_rel=glob,
                  max_param_rel=per, other_masks_global_rel=other)

    fast_step(GraphedChunks(enc, keys, enc.max_seq_length, capture=False))
    glob, _ = rel_error(grads(enc), fast)
    checks.record("fast_path_graphs_equal_uncaptured", glob < 1e-6, global_rel=glob)

    if device.type == "cuda" or args.fp16:
        amp = lambda: torch.autocast(device.type, dtype=torch.float16)  # noqa: E731
        scaler = torch.amp.GradScaler(device.type, init_scale=2.0**16)
        optimizer = torch.optim.SGD(enc.parameters(), lr=0.0)
        loss = fast_step(chunks, scale_fn=scaler.scale, autocast=amp)
        scaler.unscale_(optimizer)
        glob, _ = rel_error(grads(enc), full)
        with amp():
            full16 = loss_fn(enc({**features, "dropout_keys": tk.to(device)}))
        full16.backward()
        ref16, _ = rel_error(grads(enc), full)
        checks.record("fast_path_fp16_gradscaler_matches_fp32", glob < max(3 * ref16, 1e-3) and torch.isfinite(loss),
                      global_rel=glob, full_batch_fp16_global_rel=ref16)
        untouched, scale = overflowing_step(enc, device, lambda scale_fn: fast_step(chunks, scale_fn=scale_fn,
                                                                                    autocast=amp))
        checks.record("fast_path_fp16_overflow_step_skipped", untouched and scale < OVERFLOW_SCALE,
                      scale_after=scale)
        enc.zero_grad(set_to_none=True)

    if device.type == "cuda":  # host syncs inside the step: CUDA's sync debug mode warns at each one
        counts = {}
        for name, run in (("fast", lambda: fast_step(chunks)),
                          ("default", lambda: default.grad_cache_step(enc, make_mini_batches(
                              token_ids, MINI, pad_id, device, text_keys=tk), loss_fn, lambda x: x,
                              contextlib.nullcontext))):
            run()  # warm: nothing left to capture or allocate
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    run()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            counts[name] = sum("synchroniz" in str(w.message) for w in caught)
            grads(enc)
        checks.record("fast_path_no_host_sync", counts["fast"] == 0, fast_path_syncs=counts["fast"],
                      default_path_syncs=counts["default"])

    import torch.distributed as dist
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{tmp}/pg",
                                rank=0, world_size=1)
        try:
            ddp = torch.nn.parallel.DistributedDataParallel(enc, device_ids=[device.index or 0]
                                                            if device.type == "cuda" else None)
            carried = []

            def hook(state, bucket):
                carried.append(bucket.buffer().clone())
                fut = torch.futures.Future()
                fut.set_result(bucket.buffer())
                return fut

            ddp.register_comm_hook(None, hook)
            fast_step(chunks, model=ddp)
            under_ddp = grads(enc)
        finally:
            dist.destroy_process_group()
    glob, _ = rel_error(under_ddp, fast)
    flat = torch.cat([g.flatten() for g in under_ddp.values()]).sort().values
    sent = torch.cat(carried).float().sort().values
    checks.record("fast_path_ddp_one_all_reduce_carries_everything", glob < 1e-5 and torch.equal(sent, flat),
                  global_rel=glob, all_reduced=int(sent.numel()), parameters=int(flat.numel()))

    if device.type == "cuda":
        probe_step = types.SimpleNamespace(encoder=enc, device=device, dropout_keys=keys,
                                           autocast=lambda: torch.autocast("cuda", dtype=torch.float16))
        budget = 2.0 * 2**30
        chosen, measured = choose_mini_batch_size(cuda_probe(probe_step), MINI, 4096, budget)
        nxt = measured.get(2 * chosen, "not measured")
        checks.record("auto_mini_batch_probe", measured[chosen] <= budget and (nxt is None or nxt == "not measured"
                                                                                or nxt > budget),
                      chosen=chosen, budget_gib=2.0, **{f"C{c}_gib": (m or -2**30) / 2**30 for c, m in measured.items()})

    params = [torch.randn(1000, 100, device=device) for _ in range(3)]
    result = {}
    for fused in (False, True):
        ps = [torch.nn.Parameter(q.clone()) for q in params]
        opt = make_optimizer(torch.nn.ParameterList(ps), 1e-3, 0.01, fused=fused)
        for k in range(3):
            for q in ps:
                q.grad = torch.sin(q.detach() * (k + 1))
            opt.step()
        result[fused] = torch.cat([q.detach().flatten() for q in ps])
    err = ((result[True] - result[False]).norm() / (result[False] - torch.cat([q.flatten() for q in params])).norm())
    checks.record("fused_adamw_equals_foreach", err.item() < 1e-5, relative_update_error=err.item())


def _keyed_forward(enc, keys, batch) -> torch.Tensor:
    return enc(batch.features)[: len(batch.texts)].detach()  # with autograd, as pass 3 runs it; the keys in features


def _replay(enc, rng, batch) -> torch.Tensor:
    with rng:  # pass 3's recompute: the RNG snapshot replayed, with autograd
        return enc(batch.features).detach()


def _features(token_ids: PackedTokenIds, pad_id, device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in token_ids.pad(range(len(token_ids)), pad_id).items()}


def _full_batch(enc, token_ids, pad_id, loss_fn, device) -> dict[str, torch.Tensor]:
    loss_fn(enc(_features(token_ids, pad_id, device))).backward()
    return grads(enc)


if __name__ == "__main__":
    main()
