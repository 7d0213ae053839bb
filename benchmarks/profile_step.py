"""Where one training step's time goes: the profile behind issue 20 (benchmarks/README.md, "The step's profile").

    OMP_NUM_THREADS=2 python benchmarks/profile_step.py --amp fp32 bf16
    OMP_NUM_THREADS=2 python benchmarks/profile_step.py --amp bf16 --speedups '{"compile": true}'
    OMP_NUM_THREADS=2 python benchmarks/profile_step.py --lengths card --batch-size 16

The step is vs_sentence_transformers.py's (train_step.py's `Trainer`: all-MiniLM-L6-v2, B = 32 rows of (query,
positive, 2 negatives), GradCache with mini-batches of 8, Matryoshka MNRL, AdamW + clipping, dropout on), with the
`speedups` section given by `--speedups` (JSON; default: the section's defaults; `null`: the textbook). It prints,
for each precision:

- the machine: CPU model and the flags that matter (avx512f, avx512_bf16, amx), torch's threads;
- the machine's GEMM rate, measured here: a 2048² matmul and a 512×384×1536 linear (one MiniLM FFN layer on one
  mini-batch), fp32 and bf16, through torch's kernels and (fp32 linear) oneDNN's (best of `--gemm-reps`);
- the step's FLOPs, counted exactly from the shapes it runs: every mini-batch's linear layers,
  2·(C·L)·(4D² + 2DF) per layer and forward, and attention, 4·C·L²·D per layer and forward (Q Kᵀ and A V); pass 1
  forwards every mini-batch, pass 3 forwards the recomputed ones and backpropagates all, a backward costing two
  forwards; plus the same count on the real (unpadded) tokens only;
- the step's time (median of `--steps` unprofiled steps) and the fraction it reaches of the machine's best linear
  rate in that precision (its FLOPs / its time / the rate), and the page faults of each of those steps (fresh
  memory the process asked the kernel for: `speedups.keep_freed_memory` is about them);
- one profiled step (torch.profiler, CPU), every op's self time grouped: linear-layer GEMMs (addmm, mm), attention
  (its batched GEMMs, softmax, masking), dropout masks (random bits, the comparison, keyed hashes), casts and
  copies, other element-wise work (LayerNorm, GELU, residual adds, dropout's multiplications, bias gradients),
  gradient accumulation into `.grad` (autograd's AccumulateGrad), the optimizer (AdamW, clipping, zero_grad),
  tokenization, and Python/dispatch: the step's wall time minus every op's self time.

Timings on a shared machine are noisy: the script prints the load average, and the fractions of one profiled step
matter more than its seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_step import MODEL, Setting, Trainer, batch_texts, load_pairs, machine, write_results  # noqa: E402

from bertino.batching import PackedTokenIds  # noqa: E402
from bertino.plumbing.sources import resolve_model_path  # noqa: E402
from bertino.speedups.onednn_linear import onednn_available, onednn_mm  # noqa: E402
from bertino.speedups.settings import SpeedupsConfig  # noqa: E402

GROUPS = ("linear GEMMs", "attention", "dropout masks", "casts and copies", "element-wise", "gradient accumulation",
          "optimizer", "tokenization", "Python/dispatch")
ATTENTION = {"aten::bmm", "aten::baddbmm", "aten::_softmax", "aten::_softmax_backward_data", "aten::masked_fill",
             "aten::masked_fill_", "aten::_scaled_dot_product_flash_attention_for_cpu",
             "aten::_scaled_dot_product_flash_attention_for_cpu_backward"}
MASKS = {"aten::random_", "aten::ge", "aten::bernoulli_", "aten::bitwise_xor", "aten::bitwise_xor_",
         "aten::bitwise_right_shift", "aten::bitwise_and_", "aten::native_dropout"}
COPIES = {"aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous"}
DISPATCH_ONLY = {"aten::view", "aten::reshape", "aten::transpose", "aten::t", "aten::as_strided", "aten::expand",
                 "aten::slice", "aten::select", "aten::empty", "aten::empty_strided", "aten::_unsafe_view",
                 "aten::unsqueeze", "aten::detach", "detach", "aten::alias", "aten::to", "aten::linear",
                 "aten::matmul", "aten::resolve_conj", "aten::resolve_neg", "aten::lift_fresh", "aten::result_type",
                 "aten::_has_compatible_shallow_copy_type", "aten::is_nonzero", "aten::item",
                 "aten::_local_scalar_dense", "aten::empty_like", "aten::zeros_like", "aten::layer_norm",
                 "aten::dropout", "aten::softmax", "aten::numpy_T", "aten::permute", "aten::squeeze"}


# ================================================================================================ FLOPs
def step_flops(lengths_per_batch: list[list[int]], recomputed: list[bool], D: int, F_: int, n_layers: int
               ) -> dict[str, float]:
    """Exact GEMM FLOPs of one GradCache step from its mini-batches' shapes: each mini-batch i has the token counts
    `lengths_per_batch[i]` (its texts) and is padded to their max; `recomputed[i]`: pass 3 re-runs its forward.

    Per layer and forward, on C texts padded to L: linear layers 2·C·L·(4D² + 2DF); attention 4·C·L²·D. A backward
    is two forwards (the input's and the weights' gradients). Pass 1: one forward of all; pass 3: one forward of the
    recomputed, one backward of all. "real": the same on each text's own length (no padding)."""
    out = defaultdict(float)
    for lengths, again in zip(lengths_per_batch, recomputed):
        C, L = len(lengths), max(lengths)
        forwards = 1 + int(again) + 2
        out["linear"] += forwards * n_layers * 2 * C * L * (4 * D * D + 2 * D * F_)
        out["attention"] += forwards * n_layers * 4 * C * L * L * D
        out["linear_real"] += forwards * n_layers * 2 * sum(lengths) * (4 * D * D + 2 * D * F_)
        out["attention_real"] += forwards * n_layers * 4 * sum(n * n for n in lengths) * D
        out["tokens_padded"] += C * L
        out["tokens_real"] += sum(lengths)
    out["total"] = out["linear"] + out["attention"]
    out["total_real"] = out["linear_real"] + out["attention_real"]
    return dict(out)


# ================================================================================================ GEMM rate
def gemm_rates(reps: int) -> dict[str, float]:
    """GFLOP/s of a 2048² matmul and of a 512×384×1536 linear (x (512, 384), W (1536, 384), bias), fp32 and bf16,
    through torch's own kernels (MKL for fp32, oneDNN for bf16) and, for the fp32 linear, oneDNN's
    (speedups.onednn_linear): the best of `reps` timings of 10 calls (2 for the 2048² matmul), after a warm-up."""
    def best(fn, calls: int) -> float:
        fn(), fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - start) / calls)
        return min(times)

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        out[f"matmul_2048_{name}"] = 2 * 2048**3 / best(lambda: a @ b, 2) / 1e9
        x, w, bias = (torch.randn(512, 384, dtype=dtype), torch.randn(1536, 384, dtype=dtype),
                      torch.randn(1536, dtype=dtype))
        out[f"linear_512x384x1536_{name}"] = 2 * 512 * 384 * 1536 / best(lambda: F.linear(x, w, bias), 10) / 1e9
        if name == "fp32" and onednn_available():
            out["linear_512x384x1536_fp32_onednn"] = 2 * 512 * 384 * 1536 / best(lambda: onednn_mm(x, w, bias),
                                                                                   10) / 1e9
    return out


def linear_rate(rates: dict[str, float], amp: str) -> float:
    """The machine's best measured rate for one MiniLM linear layer in this precision (either kernel)."""
    return max(v for k, v in rates.items() if k.startswith(f"linear_512x384x1536_{amp}"))


# ================================================================================================ the profile
def group_of(event, ancestors: list[str]) -> str | None:
    """The group of one profiled op (by its own name, or the record_function / autograd node it runs under);
    None: no group (its self time counts as Python/dispatch)."""
    here = [event.name, *ancestors]  # a named region's own self time (Python inside it) counts as its work
    if any(a.startswith("Optimizer.") or a == "clip_grad_norm" for a in here):
        return "optimizer"
    if "tokenize" in here:
        return "tokenization"
    if any("AccumulateGrad" in a for a in ancestors + [event.name]):
        return "gradient accumulation"
    name = event.name
    if name in ("aten::addmm", "aten::mm", "aten::_addmm_activation", "mkldnn::_linear_pointwise"):
        return "linear GEMMs"
    if name in ATTENTION:
        return "attention"
    if name in MASKS or (name.startswith("aten::bitwise") or name == "aten::mul_" and any(
            "keep_mask" in a for a in ancestors)):
        return "dropout masks"
    if name in COPIES:
        return "casts and copies"
    if name in DISPATCH_ONLY or not name.startswith("aten::"):
        return None
    return "element-wise"


def profile_step(run_step) -> dict:
    """One step under torch.profiler → seconds per group (module docstring) and the top ops."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        run_step()
        wall = time.perf_counter() - start
    events = prof.events()
    groups, ops = defaultdict(float), defaultdict(float)
    for e in events:
        chain, p = [], e.cpu_parent
        while p is not None:
            chain.append(p.name)
            p = p.cpu_parent
        g = group_of(e, chain)
        self_s = e.self_cpu_time_total / 1e6
        ops[e.name] += self_s
        if g is not None:
            groups[g] += self_s
    accounted = sum(groups.values())
    groups["Python/dispatch"] += max(wall - accounted, 0.0)
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:25]
    return {"wall_s": wall, "groups_s": {g: groups.get(g, 0.0) for g in GROUPS},
            "top_ops_s": {k: round(v, 4) for k, v in top}}


class ProfiledTrainer(Trainer):
    """train_step.py's Trainer, with the tokenization and the clipping named for the profiler."""

    def tokenize(self, encoder, texts):
        with record_function("tokenize"):
            return PackedTokenIds.tokenize(encoder, texts)

    def optimizer_step(self, optimizer=None) -> None:
        optimizer = optimizer or self.optimizer
        with record_function("clip_grad_norm"):  # the clipping and the unscaling are the optimizer's work too
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(self.encoder.parameters(), 1.0)
        self.scaler.step(optimizer)
        self.scaler.update()
        with record_function("Optimizer.zero_grad"):
            optimizer.zero_grad(set_to_none=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=MODEL)
    p.add_argument("--amp", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--lengths", choices=["demo", "card"], default="demo",
                   help="demo: the demo's texts at max length 64; card: queries of ~10-20 tokens and passages of "
                        "~150-256 tokens at max length 256 (train_step.card_texts)")
    p.add_argument("--max-seq-length", type=int)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--mini-batch-size", type=int, default=8)
    p.add_argument("--negatives", type=int, default=2)
    p.add_argument("--speedups", default="{}", help="the speedups section as JSON (null: the textbook)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--gemm-reps", type=int, default=10)
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "profile_step.json")
    args = p.parse_args()
    max_len = args.max_seq_length or (256 if args.lengths == "card" else 64)
    section = json.loads(args.speedups)
    speedups = None if section is None else SpeedupsConfig(**section)

    facts = machine()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    m = re.search(r"^flags\s*:\s*(.+)$", flags, re.M)
    facts["flags"] = sorted(f for f in (m.group(1).split() if m else []) if re.match(r"avx512(f|_bf16|_vnni)$|amx", f))
    results = {"machine": facts, "config": {**vars(args), "json": str(args.json), "max_seq_length": max_len},
               "load_before": os.getloadavg(), "gemm_gflops": gemm_rates(args.gemm_reps), "by_amp": {}}
    print(f"machine: {facts['cpu']}, {facts['torch_threads']} threads, flags {facts['flags']}; load "
          f"{results['load_before']}", file=sys.stderr)
    print("GEMM GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in results["gemm_gflops"].items()), file=sys.stderr)

    folder = str(resolve_model_path(args.model))
    pairs = load_pairs()
    setting = Setting("textbook" if speedups is None else "gradcache", args.mini_batch_size, speedups=speedups)
    for amp in args.amp:
        trainer = ProfiledTrainer(folder, max_len, "cpu", amp, True, args.negatives)
        texts_of = (lambda s: batch_texts(pairs, s, args.batch_size, args.negatives, lengths=args.lengths))
        for s in range(args.warmup):
            trainer.step(setting, texts_of(s), s)
        seconds, faults = [], []
        for s in range(args.warmup, args.warmup + args.steps):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            trainer.step(setting, texts_of(s), s)
            seconds.append(time.perf_counter() - start)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        s = args.warmup + args.steps
        prof = profile_step(lambda: trainer.step(setting, texts_of(s), s))
        shapes = trainer.last_shapes
        cfg = trainer.encoder.model.config
        flops = step_flops(shapes["lengths"], shapes["recomputed"], cfg.dim, cfg.hidden_dim, cfg.n_layers)
        median = statistics.median(seconds)
        rate = linear_rate(results["gemm_gflops"], amp)
        out = {"step_s": seconds, "median_s": median, "min_s": min(seconds), "page_faults": faults, "flops": flops,
               "achieved_gflops": flops["total"] / median / 1e9,
               "fraction_of_gemm_rate": flops["total"] / median / 1e9 / rate, "profile": prof}
        results["by_amp"][amp] = out
        print(f"\n### {amp}: step median {median:.3f} s (min {min(seconds):.3f}), "
              f"{statistics.median(faults):.0f} page faults per step (median), "
              f"{flops['total'] / 1e12:.3f} TFLOP ({flops['linear'] / 1e12:.3f} linear + "
              f"{flops['attention'] / 1e12:.3f} attention; {flops['total_real'] / 1e12:.3f} on real tokens), "
              f"{out['achieved_gflops']:.0f} GFLOP/s = {100 * out['fraction_of_gemm_rate']:.0f}% of the "
              f"{rate:.0f} GFLOP/s linear rate\n\n| group | s | % |\n|---|---:|---:|")
        for g, v in prof["groups_s"].items():
            print(f"| {g} | {v:.3f} | {100 * v / prof['wall_s']:.1f} |")
        print(f"| (profiled step, wall) | {prof['wall_s']:.3f} | 100 |")
    write_results(args.json, results)


if __name__ == "__main__":
    main()
