"""`python -m bertino.check`: prove, on your own run, that GradCache gives the full batch's gradient.

    python -m bertino.check --config configs/v5.json [key.sub=value ...] [--steps 1] [--dropout keyed|stream|off]
    torchrun --nproc_per_node=W -m bertino.check --config ... (W processes against one at the global batch)

It builds the run with the builder train.py uses (bertino/build.py: the model, the dropout masks, the speed-ups
of the config's `speedups` section, DDP, autocast, the GradScaler, the fitted mini-batch), walks the real schedule,
and computes the gradient of each checked batch twice:

  GradCache      `Step.loss_and_gradient`, the code train.py runs (under torchrun: every rank's share, then DDP's
                 all-reduce, with `train.gather_across_devices` as configured);
  full batch     `Step.loss_and_gradient(..., full_batch=True)` of the same Step in ONE process: one plain forward
                 and backward of the whole batch (under torchrun: the global batch of all ranks' rows, with every
                 candidate; without the gather, each rank's own batch, averaged as DDP averages).

Which batches: the first `--steps` of the schedule, and then, for every task trained with GradCache that those did
not reach, its first batch (a schedule that starts with a CoSENT batch still checks GradCache). A config in which no
task uses GradCache is an error: nothing would be checked.

Dropout: `keyed` (default) trains both with keyed masks (bertino/keyed_dropout.py), the same for a text however it
is chunked, so the two must agree with dropout ON; `off` switches dropout off; `stream` keeps torch's random stream
and compares with a full-batch graph built from the same mini-batch forwards (what the RNG replay guarantees).
It prints the loss both ways, the relative error per parameter group and overall, the largest absolute error, the
time and peak memory of each, and a verdict; the exit code is 0 on agreement, 1 otherwise (2 for a bad config).

Tolerance: fp32 1e-5 relative for the whole gradient, 1e-4 for a parameter group (the float32 rounding of two
differently shaped computations is ~1e-6 overall; a small group's sums cancel more); `--float64` computes both in
float64, where rounding vanishes and the tolerance is 1e-10 for both. In fp16 or bf16 the rounding itself depends
on the chunk shapes, so both are measured against an fp32 full batch of the same masks: GradCache passes when it is
no further from it than 2 × the low-precision full batch, + 1e-3.
When the full batch does not fit in memory, it says so and checks the largest row count that does.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import sys
import time
from dataclasses import dataclass

import torch

from . import distributed
from .build import Process, build_step, start_process, with_rank
from .encoder import SentenceEncoder
from .errors import ConfigError
from .grad_cache import in_text_order
from .plumbing.cli import ArgumentParser, run_cli
from .plumbing.config import Config, check_against_model, load_config
from .plumbing.data import batch_schedule, load_tasks
from .step import Step

FP32_TOLERANCE = 1e-5  # the whole gradient; a parameter group (fewer terms, more cancellation): 10 × this
FP64_TOLERANCE = 1e-10  # the whole gradient and every group


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m bertino.check", description=__doc__.split("\n\n")[0],
                       epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the run's JSON config, as given to train.py")
    p.add_argument("overrides", nargs="*", help="dotted overrides with JSON values, as for train.py")
    p.add_argument("--steps", type=int, default=1, help="how many batches of the schedule to check (default 1; "
                   "then the first batch of every GradCache task not among them)")
    p.add_argument("--dropout", choices=("keyed", "stream", "off"), default="keyed",
                   help="keyed masks (default), torch's stream with a same-mask reference, or no dropout")
    p.add_argument("--rows", type=int, default=None, help="check only the first ROWS rows of each batch")
    p.add_argument("--float64", action="store_true",
                   help="compute both in float64: rounding differences vanish (≤ 1e-10), a real difference does not")
    p.add_argument("--max-full-batch-texts", type=int, default=None, help=argparse.SUPPRESS)  # tests: pretend OOM
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    return args


@dataclass(frozen=True)
class Checked:
    """One batch to check: its place in the schedule (the optimizer step), its task, every rank's rows."""

    index: int
    task: str
    rows_per_rank: list[list[int]]

    @property
    def all_rows(self) -> list[int]:
        return sum(self.rows_per_rank, [])


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides) + ([f'model.dropout_masks="{args.dropout}"'] if args.dropout != "off" else [])
    cfg = load_config(args.config, overrides)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.dropout == "stream":  # before joining the group
        raise ConfigError("--dropout stream: torch's stream differs from rank to rank, so W processes cannot be "
                          "compared with one; use --dropout keyed (the default) or off")
    process = start_process(cfg)  # as train.py: torchrun, the seeds, the precision
    encoder = SentenceEncoder.from_pretrained(cfg.model.name_or_path, max_seq_length=cfg.model.max_seq_length)
    check_against_model(cfg, encoder.dim, encoder.model.config.max_position_embeddings)
    if args.float64:
        encoder.double()
        process = dataclasses.replace(process, amp_dtype=None)
    step = build_step(cfg, encoder, process)  # as train.py
    if args.dropout == "off":
        for m in encoder.modules():
            if hasattr(m, "p"):
                m.p = 0.0
    tasks = load_tasks(cfg)
    dist_info = process.dist_info
    batches = chosen_batches(cfg, step, tasks, args, dist_info.world_size, dist_info.rank)
    if dist_info.is_main:
        print(header(args, cfg, step, process))
    failed = False
    for case in batches:
        data = tasks[case.task]
        rows = case.rows_per_rank[dist_info.rank]
        rng = torch.get_rng_state()  # stream masks: the reference replays GradCache's draws from here
        gc = measure(step, lambda: step.loss_and_gradient(case.task, data, rows, case.index))
        gc["loss"] = float(distributed.all_reduce_mean(torch.tensor(gc["loss"], device=step.device)))  # DDP's
        if dist_info.is_main:
            with step.model.no_sync() if dist_info.enabled else contextlib.nullcontext():  # rank 0 alone from here
                failed |= not compare(cfg, step, args, case, data, gc, rng, process.amp_dtype is not None)
        distributed.barrier()
    if dist_info.is_main:
        names = sorted({c.task for c in batches})
        print("verdict: " + ("FAILED — GradCache's gradient differs from the full batch's (groups above)" if failed
                             else f"OK — GradCache's gradient equals the full batch's ({len(batches)} batch(es); "
                                  f"tasks {', '.join(names)})"))
    distributed.cleanup()
    return 1 if failed else 0


def chosen_batches(cfg: Config, step: Step, tasks: dict, args, world: int, rank: int) -> list[Checked]:
    """The first `--steps` batches of the schedule, then the first batch of each GradCache task not among them."""
    if not step.grad_cache_tasks:
        raise ConfigError(f"{args.config}: no task trains with GradCache (loss \"cached_mnrl\", or "
                          f"speedups.cuda_graphs): there is no GradCache gradient to check")
    schedule = batch_schedule(cfg, tasks, world, rank)
    chosen, missing = [], set(step.grad_cache_tasks)
    for index, (_, _, task, rows) in zip(range(len(schedule)), schedule.stream(0, 0)):
        if index < args.steps or task in missing:
            rows = rows[: args.rows] if args.rows else rows
            chosen.append(Checked(index, task, distributed.gather_objects(rows)))  # every rank's share, in order
            missing.discard(task)
        if index + 1 >= args.steps and not missing:
            break
    return chosen


def measure(step: Step, run) -> dict:
    """Run a gradient computation of `step` (its scaler's scale is divided out) → {loss, grads, seconds, peak MiB
    above the start}."""
    encoder, device = step.encoder, step.device
    encoder.zero_grad(set_to_none=True)
    start = _reset_peak(device)
    scale = step.scaler.get_scale() if step.scaler.is_enabled() else 1.0  # before the run: the scale it uses
    t0 = time.perf_counter()
    loss = run()
    seconds = time.perf_counter() - t0
    grads = {n: p.grad.detach().to_dense().double() / scale for n, p in encoder.named_parameters()
             if p.grad is not None}
    encoder.zero_grad(set_to_none=True)
    return {"loss": float(loss), "grads": grads, "seconds": seconds, "peak_mib": _peak(device) - start}


def compare(cfg: Config, step: Step, args, case: Checked, data, gc: dict, rng: torch.Tensor, low_precision: bool
            ) -> bool:
    """Rank 0: the full-batch gradient of the same rows, and the report → True when they agree."""
    world = len(case.rows_per_rank)
    # one process at the global batch (every candidate in it), or, without the gather, the mean over the ranks
    # of each rank's own full batch (what DDP averages)
    if world == 1 or cfg.train.gather_across_devices:
        shares = [(with_rank(step, 0, 1, cfg), case.all_rows)]
    else:
        shares = [(with_rank(step, r, world, cfg), rows) for r, rows in enumerate(case.rows_per_rank)]
    shares, full = full_batch(shares, case, data, args, rng)
    if len(shares) == 1 and len(shares[0][1]) < len(case.all_rows):  # did not fit: GradCache on what does
        reference, rows = shares[0]
        gc = measure(reference, lambda: reference.loss_and_gradient(case.task, data, rows, case.index))
    low = None
    if low_precision:  # the fp32 full batch: the yardstick of the low-precision rounding
        fp32 = [(dataclasses.replace(s, autocast=contextlib.nullcontext,
                                     scaler=torch.amp.GradScaler(s.device.type, enabled=False)), rows)
                for s, rows in shares]
        low = measure(fp32[0][0], lambda: mean_loss([s.loss_and_gradient(case.task, data, rows, case.index,
                                                                         full_batch=True) for s, rows in fp32]))
        low["grads"] = {n: g / len(fp32) for n, g in low["grads"].items()}
    rows = sum((rows for _, rows in shares), [])
    return report(case, data, rows, gc, full, low, args.float64)


def mean_loss(losses: list[torch.Tensor]) -> torch.Tensor:
    """The shares' losses averaged (the gradients of the shares are summed, and divided by their number after)."""
    return torch.stack(losses).mean()


def full_batch(shares: list[tuple[Step, list[int]]], case: Checked, data, args, rng: torch.Tensor):
    """The full-batch gradient of the shares (summed, then averaged over them); when one process's full batch does
    not fit in memory, the largest prefix of its rows that does (said in the output) → (shares used, result)."""
    step = shares[0][0]
    while True:
        texts = sum(len(rows) for _, rows in shares) * len(data.columns)
        try:
            if args.max_full_batch_texts is not None and texts > args.max_full_batch_texts:
                raise torch.OutOfMemoryError(f"{texts} texts (a limit for the check's tests)")

            def run():
                if args.dropout == "stream":  # from the state GradCache started at: the same draws
                    torch.set_rng_state(rng)
                    if case.task in step.grad_cache_tasks:
                        return same_mask_full_batch(shares[0][0], case, data, shares[0][1])
                return mean_loss([s.loss_and_gradient(case.task, data, rows, case.index, full_batch=True)
                                  for s, rows in shares])

            result = measure(step, run)
            result["grads"] = {n: g / len(shares) for n, g in result["grads"].items()}
            return shares, result
        except (torch.OutOfMemoryError, MemoryError) as e:
            step.encoder.zero_grad(set_to_none=True)
            rows = sum((rows for _, rows in shares), [])
            if len(rows) <= 1:
                raise ConfigError(f"not even one row's full batch fits in memory ({e})") from None
            print(f"  the full batch of {len(rows)} rows ({texts} texts) does not fit in memory ({e}); checking the "
                  f"largest row count that does, with GradCache in one process on the same rows")
            # one process at a time is all that can be shrunk: rank 0's view of the first rows
            shares = [(dataclasses.replace(step, rank=0, world_size=1), rows[: len(rows) // 2])]


def same_mask_full_batch(step: Step, case: Checked, data, rows: list[int]) -> torch.Tensor:
    """Stream masks: one autograd graph over the same mini-batch forwards GradCache runs, from the same RNG state
    (what RandContext's replay guarantees); the loss once on all of it."""
    from .batching import PackedTokenIds

    texts, scores = data.batch(rows)  # (T,) column after column; (B,) or None
    batches = step.mini_batches(PackedTokenIds.tokenize(step.encoder, texts), None)  # the chunks GradCache ran
    with step.autocast():
        reps = in_text_order([step.encoder(b.features)[: len(b.texts)] for b in batches], batches)  # (T, D)
    scores = None if scores is None else torch.as_tensor(scores, device=step.device)
    loss = step.objectives[case.task](reps, len(data.columns), scores)
    step.scaler.scale(loss).backward()
    return loss.detach()


# ────────────────────────────────────────────────────────────────────────────────────────────── the report
def _groups(names) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for n in names:
        m = re.search(r"transformer\.layer\.(\d+)\.(attention|ffn|sa_layer_norm|output_layer_norm)", n)
        name = "embeddings" if m is None else f"layer {m.group(1)} " + (
            "layer norms" if m.group(2).endswith("norm") else m.group(2))
        groups.setdefault(name, []).append(n)
    return groups


def relative_error(a: dict, b: dict, names) -> float:
    """‖a − b‖ / ‖b‖ over the named parameters' gradients, as one vector."""
    num = sum(float((a[n] - b[n]).norm() ** 2) for n in names)
    den = sum(float(b[n].norm() ** 2) for n in names)
    return (num / den) ** 0.5 if den > 0 else (0.0 if num == 0 else float("inf"))


def tolerances(float64: bool, groups) -> tuple[float, dict[str, float], str]:
    """(the whole gradient's bound, each group's, a label) for an fp32 or float64 comparison."""
    if float64:
        return FP64_TOLERANCE, {g: FP64_TOLERANCE for g in groups}, f"float64: tolerance {FP64_TOLERANCE:g}"
    return (FP32_TOLERANCE, {g: 10 * FP32_TOLERANCE for g in groups},
            f"fp32: tolerance {FP32_TOLERANCE:g} for the whole gradient, {10 * FP32_TOLERANCE:g} per group")


def report(case: Checked, data, rows, gc: dict, full: dict, low: dict | None, float64: bool) -> bool:
    names = sorted(full["grads"])
    if sorted(gc["grads"]) != names:
        raise RuntimeError("GradCache and the full batch left gradients on different parameters")
    groups = _groups(names)
    print(f"step {case.index + 1}, task {case.task!r}: {len(rows)} rows × {len(data.columns)} columns = "
          f"{len(rows) * len(data.columns)} texts")
    print(f"  {'':24}{'GradCache':>16}{'full batch':>16}")
    print(f"  {'loss':24}{gc['loss']:>16.6f}{full['loss']:>16.6f}")
    print(f"  {'time (s)':24}{gc['seconds']:>16.3f}{full['seconds']:>16.3f}")
    print(f"  {'peak memory (MiB)':24}{gc['peak_mib']:>16.0f}{full['peak_mib']:>16.0f}")
    if low is None:
        errors = {g: relative_error(gc["grads"], full["grads"], ns) for g, ns in groups.items()}
        overall = relative_error(gc["grads"], full["grads"], names)
        whole, bound, label = tolerances(float64, groups)
    else:  # both against the fp32 full batch: GradCache no further than 2 × the low-precision full batch + 1e-3
        errors = {g: relative_error(gc["grads"], low["grads"], ns) for g, ns in groups.items()}
        bound = {g: 2 * relative_error(full["grads"], low["grads"], ns) + 1e-3 for g, ns in groups.items()}
        overall, whole = relative_error(gc["grads"], low["grads"], names), None
        label = "low precision: GradCache vs an fp32 full batch, bound 2 × the low-precision full batch's error + 1e-3"
    worst_abs = max(float((gc["grads"][n] - full["grads"][n]).abs().max()) for n in names)
    print(f"  relative error per parameter group ({label}):")
    bad = []
    for g, e in errors.items():
        flag = "" if e <= bound[g] else f"   > {bound[g]:.1e}: FAILED"
        print(f"    {g:22}{e:>10.2e}{flag}")
        if not e <= bound[g]:
            bad.append(g)
    if whole is not None and not overall <= whole:
        bad.append("the whole gradient")
    print(f"  overall {overall:.2e}, max abs {worst_abs:.2e}" + (f"; failed: {', '.join(bad)}" if bad else ""))
    return not bad


def header(args, cfg: Config, step: Step, process: Process) -> str:
    precision = "float64" if args.float64 else process.amp_dtype or torch.float32
    switches = "speedups null: the textbook" if step.fast is None else ", ".join(step.fast.describe(step.device))
    first = cfg.speedups and cfg.speedups.first_pass_mini_batch_size
    return (f"bertino check: {args.config}, {process.dist_info.world_size} process(es) on {step.device}, "
            f"{precision}, dropout {'off' if args.dropout == 'off' else 'on (' + args.dropout + ' masks)'}"
            f", GradCache mini-batches of {step.mini_batch_size} texts" + (f" (pass 1: {first})" if first else "")
            + f" ({switches})")


def _reset_peak(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the kernel's peak-RSS counter (VmHWM)
        return _proc_status("VmRSS")
    except OSError:
        return 0.0


def _peak(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        return _proc_status("VmHWM")
    except OSError:
        return 0.0


def _proc_status(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(key)


def cli(argv=None) -> None:
    """Exit 0 when the gradients agree, 1 when they do not, 2 for a mistake in the config or the arguments."""
    result = {}
    code = run_cli(lambda a: result.setdefault("code", main(a)), argv, cleanup=distributed.cleanup)
    sys.exit(code or result.get("code", 0))


if __name__ == "__main__":
    cli()
