"""The cost of one dropout mask, four ways: torch's dropout, the fast CPU dropout, keyed masks.

    python benchmarks/dropout_masks.py [--device cpu] [--reps 20] [--json benchmarks/results/dropout_masks.json]

Shapes: a mini-batch of C texts, L tokens, D = 384 channels (MiniLM), H = 12 heads; the attention-probability mask
is (C, H, L, L), the hidden-state mask (C, L, D). Each way applies dropout p = 0.1 to a ones tensor of that shape
(the mask and the scaling: what a forward pays), timed as the median of `--reps` calls after warm-up:

    torch      torch.nn.functional.dropout (bernoulli_; on CUDA torch's Philox kernel)
    bits       speedups.cpu_dropout.BitsDropout (32 random bits per element from the CPU generator)
    lazy_bits  the same with lazy=True (speedups.lazy_mask_bits: 8 bits per element, 24 more for 1 in 256)
    keyed      keyed_dropout.KeyedDropout / the keyed attention mask (SplitMix64 of the text's key and position)

The per-step cost inside a training step is measured by `train_step.py --keyed` (the same step with both masks).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bertino.keyed_dropout import DropoutKeys, KeyedDropout, keep_mask, text_keys  # noqa: E402
from bertino.speedups.cpu_dropout import BitsDropout  # noqa: E402
from train_step import machine, write_results  # noqa: E402

P = 0.1


def median_ms(fn, device, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "dropout_masks.json")
    args = p.parse_args()
    device = torch.device(args.device)
    keys = DropoutKeys(max_positions=512)
    rows = []
    for C, L in ((8, 64), (16, 64), (16, 256)):
        for kind, shape in (("attention", (C, 12, L, L)), ("hidden", (C, L, 384))):
            x = torch.ones(shape, device=device)
            bits = BitsDropout(P).train()
            lazy_bits = BitsDropout(P, lazy=True).train()
            keyed = KeyedDropout(P, 3, keys).train()
            tk = text_keys(0, 0, torch.arange(C)).to(device)

            def keyed_attention():
                with keys.use(tk):
                    m = keep_mask(keys.site_keys(1, device), keys.counters("attention", L, 12, device), P)
                return x * m * (1 / (1 - P))

            def keyed_hidden():
                with keys.use(tk):
                    return keyed(x)

            ways = {"torch": lambda: F.dropout(x, P, training=True), "bits": lambda: bits(x),
                    "lazy_bits": lambda: lazy_bits(x),
                    "keyed": keyed_attention if kind == "attention" else keyed_hidden}
            row = {"C": C, "L": L, "site": kind, "elements": x.numel(),
                   **{f"{w}_ms": round(median_ms(fn, device, args.reps), 3) for w, fn in ways.items()}}
            rows.append(row)
            print(f"| {kind} {tuple(shape)} | " + " | ".join(f"{row[f'{w}_ms']:.2f}" for w in ways) + " |")
    write_results(args.json, {"machine": machine(), "p": P, "device": args.device, "load": os.getloadavg(),
                              "rows": rows})


if __name__ == "__main__":
    main()
