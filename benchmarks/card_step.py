"""The model card's training step, measured: bertino's variants and sentence-transformers' at the card's shapes, with
step time, tokens/s and MFU.

    python benchmarks/card_step.py --tiny                                   # CPU dry run (seconds)
    python benchmarks/card_step.py --device cuda --json OUT.json [--st-python PY]      # DistilBERT-base, the card
    python benchmarks/card_step.py --device cuda --shape minilm --lengths demo --tokenizer MINILM_FOLDER \\
        --max-length 64 --json OUT.json                                    # MiniLM at the card's batch shape

The model (`--shape`): random weights built in-process with bertino's own `EncoderConfig` / `DistilBert` (timing
does not depend on the values), saved once as a sentence-transformers folder that both bertino and
sentence-transformers load, with a generated WordPiece vocabulary of the model's size (nothing is downloaded):
    distilbert-base   768 dim, 6 layers, 12 heads, FFN 3072, vocab 32,102 (BERTino's), max length 256
    minilm            384 dim, 6 layers, 12 heads, FFN 1536, vocab 30,522 (all-MiniLM-L6-v2's)
    tiny              32 dim, 2 layers, 4 heads, FFN 64, vocab 512 (`--tiny`: the CPU dry run)

The batch (the card's, configs/v5.json): a retrieval step of B = 128 rows × (query, positive, 2 negatives) = 512
texts, Matryoshka MNRL (dims 768/512/256/128, weights 1/.4/.2/.2, scale 20), GradCache mini-batches of C = 16 texts;
and an STS step of 128 pairs = 256 texts, Matryoshka CoSENT (scale 20). fp16 autocast + GradScaler on CUDA, AdamW
(lr 1e-5, weight decay 0.01), clipping at 1.0, the finite check train.py makes; dropout on (train mode).

Token lengths (`--lengths`), in tokens including [CLS] and [SEP], a fresh batch each step (seed = step):
    card   synthetic, stated here because the card's data is not bundled: queries round(exp(N(ln 12, 0.35²)))
           clipped to [4, 48] (short questions); passages — Wikipedia paragraphs — round(exp(N(ln 150, 0.5²)))
           clipped to [24, max length] (≈ 14% cut at 256); STS sentences round(exp(N(ln 18, 0.4²))) clipped to
           [5, 64]. Token ids are uniform over the vocabulary (no tokenizer is timed; the tokenizer's cost is the
           same for every variant).
    demo   the demo's Italian (query, passage) pairs (data/demo/train.jsonl.gz; negatives = other rows' positives,
           as benchmarks/train_step.py), tokenized with `--tokenizer FOLDER` at `--max-length`: the shape of the
           earlier GPU measurement (MiniLM, max length 64: benchmarks/results/gpu/train_step_b128.json).

Variants, `--variants` (each `Step.loss_and_gradient_of_tokens` — the code train.py runs, built by bertino/build.py as
train.py builds it — on its own copy of the encoder sharing ONE set
of weights, each with its own AdamW and GradScaler; interleaved step by step, the order rotating):
    textbook              `speedups: null`: bertino/grad_cache.py on the plain model, nothing installed
    full                  train.py's plain path: one padded tensor of all 512 texts (loss mnrl), stream masks
    gradcache             today's GradCache, C = 16, stream masks (the card's default path: the default speedups)
    gradcache-multitensor the same with the multi-tensor AdamW (speedups.adamw_fused false, the default before
                          issue 20)
    gradcache-keyed       the same with keyed dropout masks
    buckets               keyed, lengths padded to multiples of 32 (speedups.length_multiple)
    graphs                + CUDA graphs per mini-batch shape (speedups.cuda_graphs)
    graphs-tokens         + a token budget of C · max length per mini-batch (speedups.mini_batch_tokens)
    graphs-tokens-fused   + AdamW's fused kernel (speedups.adamw_fused)
    graphs-auto-fused     + the largest mini-batch within `--auto-gib` GiB (speedups.auto_mini_batch_gib)
    sts-full              the STS step as train.py runs it today (CoSENT, one padded tensor, stream masks)
    sts-graphs-fused      the STS step through the graph path (keyed, buckets, graphs, fused AdamW)
and, with `--st-python PY` (an environment with sentence-transformers; a subprocess of this script with
`--only st`), sentence-transformers' `MatryoshkaLoss(CachedMultipleNegativesRankingLoss(mini_batch_size=C))` (st-cached-mnrl)
and `MatryoshkaLoss(CoSENTLoss)` (st-cosent) steps on the same folder, batches and precision (its collator's layout: one padded
tensor per column; fp16 autocast + GradScaler around loss and backward).

FLOPs, counted as matrix multiplications (2 FLOPs per multiply-add; embeddings, LayerNorm, softmax, GELU, dropout
and the loss left out). A text of n tokens through one layer of dim D, FFN width F:
    q, k, v, out projections 4 · 2nD²;  FFN 2 · 2nDF;  attention scores q kᵀ and the weighted sum 2 · 2n²D
    forward(n) = n_layers · (2n(4D² + 2DF) + 4n²D)      (DistilBERT-base: 84.9 MFLOP per token + 18.4 kFLOP · n)
    model FLOPs of a step = 3 · Σ_texts forward(n_t)    (forward + backward = 3 forwards; each text at its own
                                                         length: no padding, no GradCache recomputation)
    MFU = model FLOPs / step time / the GPU's dense peak (`--peak-tflops`; H100/H200 SXM: 989.4 TFLOP/s fp16/bf16,
          66.9 fp32 without TF32). A step that pads or recomputes does more work than it is credited with: that is
          what MFU measures. tokens/s counts real (unpadded) tokens.
The card's recipe: ≈ 2,840 steps (4 epochs), half of them STS (the STS task is balanced to the retrieval task's
rows, and the proportional sampler alternates them), estimated as 1,420 retrieval + 1,420 STS steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_step import load_pairs, machine, write_results  # noqa: E402

from bertino.batching import PackedTokenIds  # noqa: E402
from bertino.model import DistilBert, EncoderConfig  # noqa: E402
from bertino.optim import make_optimizer  # noqa: E402
from bertino.plumbing.config import config_from_dict  # noqa: E402

SHAPES = {"distilbert-base": EncoderConfig(vocab_size=32102, dim=768, n_layers=6, n_heads=12, hidden_dim=3072),
          "minilm": EncoderConfig(vocab_size=30522, dim=384, n_layers=6, n_heads=12, hidden_dim=1536),
          "tiny": EncoderConfig(vocab_size=512, dim=32, n_layers=2, n_heads=4, hidden_dim=64)}
PEAK_TFLOPS = {("H200", "low"): 989.4, ("H100", "low"): 989.4, ("A100", "low"): 312.0,
               ("H200", "fp32"): 66.9, ("H100", "fp32"): 66.9, ("A100", "fp32"): 19.5}
FAST = {"model.dropout_masks": "keyed", "speedups.length_multiple": 32}
VARIANTS = {  # name → (task, config overrides)
    "full": ("retrieval", {"tasks.retrieval.loss": "mnrl"}),
    "gradcache": ("retrieval", {}),
    "gradcache-multitensor": ("retrieval", {"speedups.adamw_fused": False}),
    "gradcache-keyed": ("retrieval", {"model.dropout_masks": "keyed"}),
    "buckets": ("retrieval", FAST),
    "graphs": ("retrieval", {**FAST, "speedups.cuda_graphs": True}),
    "graphs-tokens": ("retrieval", {**FAST, "speedups.cuda_graphs": True, "tokens": True}),
    "graphs-tokens-fused": ("retrieval", {**FAST, "speedups.cuda_graphs": True, "tokens": True,
                                          "speedups.adamw_fused": True}),
    "graphs-auto-fused": ("retrieval", {**FAST, "speedups.cuda_graphs": True, "tokens": True,
                                        "speedups.adamw_fused": True, "auto": True}),
    "sts-full": ("sts", {}),
    "sts-graphs-fused": ("sts", {**FAST, "speedups.cuda_graphs": True, "speedups.adamw_fused": True}),
    "textbook": ("retrieval", {"speedups": None}),
}


# ================================================================================================ the model
def build_model_folder(shape: str, max_length: int, out: Path, seed: int = 0) -> Path:
    """A random `shape` DistilBERT (bertino's own classes) with a generated vocabulary, as a sentence-transformers
    folder (`SentenceEncoder.save_pretrained`)."""
    from transformers import BertTokenizerFast

    from bertino import SentenceEncoder

    cfg = SHAPES[shape]
    out.mkdir(parents=True, exist_ok=True)
    # single characters (and their ## continuations) make every ordinary text encodable, as a real WordPiece
    # vocabulary does (the encoder's load check refuses a tokenizer that turns text into [UNK] only); fillers up
    # to the model's vocabulary size
    chars = list("abcdefghijklmnopqrstuvwxyzàèéìòù0123456789.,;:!?'-")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
    vocab += [f"t{i}" for i in range(len(vocab), cfg.vocab_size)]
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(out / "vocab.txt"), do_lower_case=True, model_max_length=max_length)
    torch.manual_seed(seed)
    model = DistilBert(cfg)
    with torch.no_grad():  # BERT's initialisation: N(0, 0.02) matrices and tables, zero biases
        for name, p in model.named_parameters():
            if "LayerNorm" not in name and "layer_norm" not in name:
                p.normal_(0, 0.02) if p.dim() > 1 else p.zero_()
    SentenceEncoder(model, tokenizer, max_seq_length=max_length).save_pretrained(out)
    return out


# ================================================================================================ the batches
@dataclass
class Batch:
    retrieval: PackedTokenIds  # 4B texts, column after column
    sts: PackedTokenIds  # 2·pairs texts
    scores: np.ndarray  # (pairs,) in [0, 1]


def synthetic_lengths(rng, n: int, median: float, sigma: float, low: int, high: int) -> np.ndarray:
    return np.clip(np.round(np.exp(rng.normal(math.log(median), sigma, n))), low, high).astype(np.int64)


def ids_of(rng, lengths: np.ndarray, vocab: int) -> PackedTokenIds:
    """[CLS] uniform ids … [SEP], for texts of these token counts."""
    rows = [[2, *rng.integers(5, vocab, int(n) - 2).tolist(), 3] for n in lengths]
    return PackedTokenIds.from_lists(rows)


def card_batch(args, step: int) -> Batch:
    rng = np.random.default_rng(1000 + step)
    B, vocab, high = args.batch_size, SHAPES[args.shape].vocab_size, args.max_length
    s = args.length_scale
    queries = synthetic_lengths(rng, B, 12 * s, 0.35, 4, min(48, high))
    passages = synthetic_lengths(rng, (1 + args.negatives) * B, 150 * s, 0.5, min(24, high), high)
    sts = synthetic_lengths(rng, 2 * args.sts_pairs, 18 * s, 0.4, 5, min(64, high))
    return Batch(ids_of(rng, np.concatenate([queries, passages]), vocab), ids_of(rng, sts, vocab),
                 rng.uniform(0, 1, args.sts_pairs))


class DemoBatches:
    """The demo's pairs tokenized once with `--tokenizer` (benchmarks/train_step.py's batches); STS: pairs of
    queries and passages (the demo has no STS set), random scores."""

    def __init__(self, args):
        from transformers import AutoTokenizer

        from train_step import batch_texts

        self.args, self.pairs, self.batch_texts = args, load_pairs(), batch_texts
        self.tok = AutoTokenizer.from_pretrained(args.tokenizer)

    def ids(self, texts: list[str]) -> PackedTokenIds:
        return PackedTokenIds.from_lists(self.tok(texts, truncation=True, max_length=self.args.max_length,
                                                  return_token_type_ids=False)["input_ids"])

    def __call__(self, args, step: int) -> Batch:
        texts = self.batch_texts(self.pairs, step, args.batch_size, args.negatives)
        sts = [q for q, _ in self.pairs[step * args.sts_pairs :][: args.sts_pairs]]
        sts += [p for _, p in self.pairs[step * args.sts_pairs + 7 :][: args.sts_pairs]]
        return Batch(self.ids(texts), self.ids(sts), np.random.default_rng(step).uniform(0, 1, args.sts_pairs))


def length_stats(batch: Batch, max_length: int, B: int) -> dict:
    n = batch.retrieval.lengths
    return {"query_tokens_mean": float(n[:B].mean()), "passage_tokens_mean": float(n[B:].mean()),
            "passage_tokens_median": float(np.median(n[B:])), "passages_at_max_length": float((n[B:] == max_length).mean()),
            "retrieval_tokens": int(n.sum()), "sts_tokens": int(batch.sts.lengths.sum()),
            "sts_tokens_mean": float(batch.sts.lengths.mean())}


# ================================================================================================ FLOPs
def forward_flops(lengths, cfg: EncoderConfig) -> float:
    """Σ_texts n_layers · (2n(4D² + 2DF) + 4n²D): the matrix multiplications of a forward (module docstring)."""
    n = np.asarray(lengths, dtype=np.float64)
    D, F = cfg.dim, cfg.hidden_dim
    return float(cfg.n_layers * (2 * n * (4 * D * D + 2 * D * F) + 4 * n * n * D).sum())


def peak_tflops(args, device: torch.device) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    precision = "fp32" if args.amp == "fp32" else "low"
    return next((v for (gpu, p), v in PEAK_TFLOPS.items() if gpu in name and p == precision), None)


# ================================================================================================ bertino's variants
def config_for(args, folder: Path, overrides: dict):
    dims = {"distilbert-base": [768, 512, 256, 128], "minilm": [384, 256, 128, 64], "tiny": [32, 16, 8, 4]}
    cfg = {"model": {"name_or_path": str(folder), "max_seq_length": args.max_length},
           "tasks": {"retrieval": {"dataset": "synthetic", "columns": ["query", "positive", "negative_1",
                                                                       "negative_2"][: 2 + args.negatives],
                                   "loss": "cached_mnrl", "scale": 20.0},
                     "sts": {"dataset": "synthetic", "columns": ["sentence1", "sentence2", "score"], "loss": "cosent",
                             "scale": 20.0}},
           "matryoshka": {"dims": dims[args.shape], "weights": [1.0, 0.4, 0.2, 0.2]},
           "train": {"per_device_train_batch_size": args.batch_size, "mini_batch_size": args.mini_batch_size,
                     "learning_rate": 1e-5, "weight_decay": 0.01, "fp16": args.amp == "fp16",
                     "bf16": args.amp == "bf16", "seed": 42},
           "speedups": {}}
    for key, value in overrides.items():
        if key == "tokens":
            cfg["speedups"]["mini_batch_tokens"] = args.mini_batch_size * args.max_length
        elif key == "auto":
            cfg["speedups"]["auto_mini_batch_gib"] = args.auto_gib
        elif "." not in key:
            cfg[key] = value
        else:
            section, *rest = key.split(".")
            target = cfg[section]
            for k in rest[:-1]:
                target = target[k]
            target[rest[-1]] = value
    return config_from_dict(cfg)


def sharing_copy(encoder):
    """A copy of the encoder's modules whose parameters, buffers and tokenizer ARE the original's."""
    memo = {id(t): t for t in [*encoder.parameters(), *encoder.buffers()]}
    memo[id(encoder.tokenizer)] = encoder.tokenizer
    return copy.deepcopy(encoder, memo)


@dataclass
class Variant:
    name: str
    task: str
    step: object  # bertino.step.Step, from bertino.build.build_step as train.py builds it
    optimizer: torch.optim.Optimizer
    columns: int  # texts per retrieval row: query, positive, negatives
    times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    def run(self, batch: Batch, k: int) -> None:
        s, scaler = self.step, self.step.scaler
        if self.task == "retrieval":
            loss = s.loss_and_gradient_of_tokens("retrieval", batch.retrieval, self.columns, None, k)
        else:
            scores = torch.as_tensor(batch.scores, device=s.device)
            loss = s.loss_and_gradient_of_tokens("sts", batch.sts, 2, scores, k)
        # train.py's optimizer_step: unscale → clip → the finite check (a host sync) → step → update → zero
        scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(s.encoder.parameters(), 1.0)
        if bool(torch.isfinite(loss)) and bool(torch.isfinite(norm)):
            scaler.step(self.optimizer)
        scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(float(loss))

    def graphs(self) -> int:
        chunks = None if self.step.fast is None else self.step.fast.graphs
        return 0 if chunks is None else len(chunks.first_graphs) + len(chunks.again_graphs)


def make_variants(args, folder: Path, device: torch.device) -> list[Variant]:
    from bertino import SentenceEncoder
    from bertino.build import Process, build_step
    from bertino.distributed import DistInfo

    base = SentenceEncoder.from_pretrained(folder, max_seq_length=args.max_length).to(device).train()
    amp = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.amp]
    variants = []
    for name in args.variants:
        task, overrides = VARIANTS[name]
        cfg = config_for(args, folder, overrides)
        enc = sharing_copy(base)
        step = build_step(cfg, enc, Process(DistInfo(), device, amp))  # as train.py: masks, speed-ups, scaler, fit
        fused = cfg.speedups is not None and cfg.speedups.adamw_fused
        variants.append(Variant(name, task, step, make_optimizer(enc, 1e-5, 0.01, fused=fused), 2 + args.negatives))
    return variants


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variants(args, variants: list[Variant], batches, device) -> None:
    for k in range(args.warmup + args.steps):
        batch = batches(args, k)
        rotation = k % len(variants)
        for v in variants[rotation:] + variants[:rotation]:
            sync(device)
            start = time.perf_counter()
            v.run(batch, k)
            sync(device)
            if k >= args.warmup:
                v.times.append(time.perf_counter() - start)
        if k == args.warmup - 1:
            captured = {v.name: v.graphs() for v in variants}
        print(f"  step {k + 1}/{args.warmup + args.steps}" + (" (warm-up)" if k < args.warmup else ""),
              file=sys.stderr, flush=True)
    for v in variants:
        v.graphs_after_warmup = captured.get(v.name, 0) if args.warmup else 0


# ================================================================================================ sentence-transformers
def st_steps(args, folder: Path, batches, device: torch.device) -> dict:
    """sentence-transformers' Matryoshka(CachedMNRL) and Matryoshka(CoSENT) steps at the same shapes (run with
    `--only st`, in an environment that has sentence-transformers)."""
    import sentence_transformers
    from sentence_transformers import SentenceTransformer

    try:  # sentence-transformers ≥ 6 moved the losses; the old path still works there, with a warning
        from sentence_transformers.sentence_transformer.losses import (
            CachedMultipleNegativesRankingLoss,
            CoSENTLoss,
            MatryoshkaLoss,
        )
    except ImportError:
        from sentence_transformers.losses import CachedMultipleNegativesRankingLoss, CoSENTLoss, MatryoshkaLoss

    model = SentenceTransformer(str(folder), device=str(device))
    model.max_seq_length = args.max_length
    model.train()
    dims = config_for(args, folder, {}).matryoshka.dims
    weights = [1.0, 0.4, 0.2, 0.2]
    losses = {"st-cached-mnrl": MatryoshkaLoss(model, CachedMultipleNegativesRankingLoss(
                  model, scale=20.0, mini_batch_size=args.mini_batch_size), matryoshka_dims=dims,
                  matryoshka_weights=weights),
              "st-cosent": MatryoshkaLoss(model, CoSENTLoss(model, scale=20.0), matryoshka_dims=dims,
                                          matryoshka_weights=weights)}
    optimizer = make_optimizer(model, 1e-5, 0.01)
    amp = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    pad = model.tokenizer.pad_token_id

    def columns(ids: PackedTokenIds, n: int) -> list[dict]:  # its collator: one padded tensor per column
        B = len(ids) // n
        return [{k: v.to(device) for k, v in ids.pad(range(c * B, (c + 1) * B), pad).items()} for c in range(n)]

    times = {name: [] for name in losses}
    for k in range(args.warmup + args.steps):
        batch = batches(args, k)
        for name, loss_fn in losses.items():
            sync(device)
            start = time.perf_counter()
            if name == "st-cached-mnrl":
                features, labels = columns(batch.retrieval, 2 + args.negatives), None
            else:
                features, labels = columns(batch.sts, 2), torch.as_tensor(batch.scores, device=device).float()
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = loss_fn(features, labels)
                scaler.scale(loss).backward()  # the cached loss re-embeds every mini-batch inside this backward
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            sync(device)
            if k >= args.warmup:
                times[name].append(time.perf_counter() - start)
        print(f"  st step {k + 1}/{args.warmup + args.steps}", file=sys.stderr, flush=True)
    return {"sentence_transformers": sentence_transformers.__version__, "times": times}


def run_st_subprocess(args, folder: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "st.json"
        argv = [a for a in sys.argv[1:]]
        cmd = [args.st_python, __file__, *argv, "--only", "st", "--model-folder", str(folder), "--json", str(out)]
        print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=args.st_timeout)
        if proc.returncode != 0 or not out.exists():
            return {"error": f"the sentence-transformers run failed (exit {proc.returncode})"}
        return json.loads(out.read_text())["st"]


# ================================================================================================ report
def report(args, results: dict) -> None:
    rows, peak = results["variants"], results["peak_tflops"]
    stats = results["lengths"]
    tokens = {"retrieval": stats["retrieval_tokens"], "sts": stats["sts_tokens"]}
    base = {task: next((r["median_s"] for n, r in rows.items() if r["task"] == task), None) for task in tokens}
    print(f"\n{args.shape}, max length {args.max_length}, B = {args.batch_size} rows × {2 + args.negatives} texts "
          f"(≈{tokens['retrieval']} real tokens), C = {args.mini_batch_size}, STS {args.sts_pairs} pairs "
          f"(≈{tokens['sts']} tokens), {args.amp}, {results['machine'].get('cuda') or 'cpu'}; peak "
          f"{peak or 'n/a'} TFLOP/s\n")
    st = {"retrieval": rows.get("st-cached-mnrl", {}).get("median_s"), "sts": rows.get("st-cosent", {}).get("median_s")}
    print("| variant | median (ms) | min (ms) | × the first of its task | × sentence-transformers | tokens/s "
          "| model TFLOP/s | MFU | graphs (pass 1 + 3) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        tflops = r["model_flops"] / r["median_s"] / 1e12
        mfu = f"{100 * tflops / peak:.1f}%" if peak else "n/a"
        vs_st = f"{r['median_s'] / st[r['task']]:.2f}" if st[r["task"]] else "n/a"
        print(f"| {name} | {1e3 * r['median_s']:.1f} | {1e3 * r['min_s']:.1f} | {r['median_s'] / base[r['task']]:.2f} "
              f"| {vs_st} | {tokens[r['task']] / r['median_s']:,.0f} | {tflops:.2f} | {mfu} | {r['graphs']} |")
    recipe = results.get("recipe")
    if recipe:
        print("\nthe card's recipe (1,420 retrieval + 1,420 STS steps): " + ", ".join(
            f"{k}: {v / 60:.1f} min" for k, v in recipe.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the CPU dry run: tiny model and batch, 2 timed steps")
    p.add_argument("--shape", choices=list(SHAPES), default="distilbert-base")
    p.add_argument("--lengths", choices=["card", "demo"], default="card")
    p.add_argument("--tokenizer", help="a model folder whose tokenizer cuts the demo texts (--lengths demo)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--negatives", type=int, default=2)
    p.add_argument("--mini-batch-size", type=int, default=16)
    p.add_argument("--sts-pairs", type=int, default=128)
    p.add_argument("--length-scale", type=float, default=1.0, help=argparse.SUPPRESS)  # --tiny shrinks lengths
    p.add_argument("--amp", choices=["fp32", "fp16", "bf16"], default=None, help="default: fp16 on CUDA, else fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--auto-gib", type=float, default=16.0, help="the memory budget of the 'auto' variant")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense peak for --amp (MFU)")
    p.add_argument("--st-python", help="a Python with sentence-transformers: also time its steps (subprocess)")
    p.add_argument("--st-timeout", type=int, default=300)
    p.add_argument("--only", choices=["st"], help=argparse.SUPPRESS)
    p.add_argument("--model-folder", type=Path, help=argparse.SUPPRESS)  # the ST subprocess: the same folder
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "card_step.json")
    args = p.parse_args()
    if args.tiny:
        args.shape, args.max_length, args.batch_size, args.mini_batch_size, args.sts_pairs = "tiny", 32, 8, 4, 8
        args.length_scale, args.steps, args.warmup = 0.15, min(args.steps, 2), min(args.warmup, 1)
    args.amp = args.amp or ("fp16" if args.device.startswith("cuda") else "fp32")
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (the peak table assumes it)
    batches = card_batch if args.lengths == "card" else DemoBatches(args)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model_folder or build_model_folder(args.shape, args.max_length, Path(tmp) / "model")
        if args.only == "st":
            results = {"machine": machine(), "st": st_steps(args, folder, batches, device)}
            write_results(args.json, results)
            return
        results = {"machine": machine(), "config": {k: str(v) for k, v in vars(args).items()},
                   "shape": {k: getattr(SHAPES[args.shape], k) for k in ("vocab_size", "dim", "n_layers", "n_heads",
                                                                         "hidden_dim")},
                   "lengths": length_stats(batches(args, 0), args.max_length, args.batch_size),
                   "peak_tflops": peak_tflops(args, device), "load_before": os.getloadavg()}
        variants = make_variants(args, folder, device)
        print("timing: " + ", ".join(v.name for v in variants), file=sys.stderr, flush=True)
        time_variants(args, variants, batches, device)
        st = run_st_subprocess(args, folder) if args.st_python else None
    cfg = SHAPES[args.shape]
    timed = [batches(args, k) for k in range(args.warmup, args.warmup + args.steps)]
    flops = {"retrieval": statistics.mean(3 * forward_flops(b.retrieval.lengths, cfg) for b in timed),
             "sts": statistics.mean(3 * forward_flops(b.sts.lengths, cfg) for b in timed)}
    results["lengths"].update(retrieval_tokens=int(np.mean([b.retrieval.lengths.sum() for b in timed])),
                              sts_tokens=int(np.mean([b.sts.lengths.sum() for b in timed])))
    results["model_flops_per_step"] = flops
    rows = {}
    for v in variants:
        xs = sorted(v.times)
        rows[v.name] = {"task": v.task, "median_s": statistics.median(xs), "min_s": xs[0], "all_s": v.times,
                        "model_flops": flops[v.task], "graphs": v.graphs(),
                        "graphs_captured_in_timed_steps": v.graphs() - v.graphs_after_warmup,
                        "mini_batch_size": v.step.mini_batch_size,
                        "mini_batch_tokens": v.step.fast and v.step.fast.settings.mini_batch_tokens,
                        "losses": v.losses, "loss_scale": v.scaler.get_scale() if v.scaler.is_enabled() else 1.0}
    if st and "times" in st:
        for name, xs in st["times"].items():
            task = "retrieval" if "mnrl" in name else "sts"
            rows[name] = {"task": task, "median_s": statistics.median(xs), "min_s": min(xs), "all_s": xs,
                          "model_flops": flops[task], "graphs": 0}
        results["sentence_transformers"] = st["sentence_transformers"]
    elif st:
        results["sentence_transformers_error"] = st["error"]
    results["variants"] = rows
    recipe = {}
    for label, ret, sts in (("today (gradcache + sts-full)", "gradcache", "sts-full"),
                            ("fast (graphs-auto-fused + sts-graphs-fused)", "graphs-auto-fused", "sts-graphs-fused"),
                            ("sentence-transformers", "st-cached-mnrl", "st-cosent")):
        if ret in rows and sts in rows:
            recipe[label] = 1420 * (rows[ret]["median_s"] + rows[sts]["median_s"])
    results["recipe"] = recipe
    report(args, results)
    write_results(args.json, results)


if __name__ == "__main__":
    main()
