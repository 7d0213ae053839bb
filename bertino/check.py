"""`python -m bertino.check`: prove, on your own run, that GradCache gives the full batch's gradient.

    python -m bertino.check --config configs/v5.json [key.sub=value ...] [--steps 1] [--dropout keyed|stream|off]
    torchrun --nproc_per_node=W -m bertino.check --config ... (W processes against one at the global batch)

It builds the run exactly as `train.py` does (the model, the dropout masks, the speed-ups, the tasks, the schedule,
the precision, the mini-batch size, the memory budget, the tape: bertino/step.py), takes the first batch(es) of the
real schedule, and computes the gradient twice:

  GradCache      `Step.forward_backward`, the code train.py runs (under torchrun: every rank's share, then DDP's
                 all-reduce, with `train.gather_across_devices` as configured);
  full batch     ONE plain forward and backward of the whole batch in one process (under torchrun: the global
                 batch of all ranks' rows, with every candidate; without the gather, each rank's own batch).

Dropout: `keyed` (default) trains both with keyed masks (bertino/keyed_dropout.py), the same for a text however it
is chunked, so the two must agree with dropout ON; `off` switches dropout off; `stream` keeps torch's random stream
and compares with a full-batch graph built from the same mini-batch forwards (what the RNG replay guarantees).
It prints the loss both ways, the relative error per parameter group and overall, the largest absolute error, the
time and peak memory of each, and a verdict; the exit code is 0 on agreement, 1 otherwise (2 for a bad config).

Tolerance: fp32 1e-5 relative for the whole gradient, 1e-4 for a parameter group (the float32 rounding of two
differently shaped computations is ~1e-6 overall; a small group's sums cancel more); `--float64` computes both in
float64, where rounding vanishes and the tolerance is 1e-10. In fp16 or bf16 the rounding itself depends on the
chunk shapes, so both are measured against an fp32 full batch of the same masks: GradCache passes when it is no
further from it than 2 × the low-precision full batch, + 1e-3.
When the full batch does not fit in memory, it says so and checks the largest row count that does.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import time
from functools import partial

import torch

from . import distributed
from .encoder import SentenceEncoder
from .errors import ConfigError
from .losses import LOSSES
from .plumbing.cli import ArgumentParser, run_cli
from .plumbing.config import (
    Config,
    apply_overrides,
    check_against_model,
    config_from_dict,
)
from .plumbing.data import batch_schedule, load_tasks
from .plumbing.files import read_json
from .plumbing.precision import autocast_dtype
from .speedups.memory_fit import fit_mini_batch
from .step import Step, install_training_modules, make_objectives

FP32_TOLERANCE = 1e-5  # the whole gradient; a parameter group (fewer terms, more cancellation): 10 × this
FP64_TOLERANCE = 1e-10


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m bertino.check", description=__doc__.split("\n\n")[0],
                       epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the run's JSON config, as given to train.py")
    p.add_argument("overrides", nargs="*", help="dotted overrides with JSON values, as for train.py")
    p.add_argument("--steps", type=int, default=1, help="how many batches of the schedule to check (default 1)")
    p.add_argument("--dropout", choices=("keyed", "stream", "off"), default="keyed",
                   help="keyed masks (default), torch's stream with a same-mask reference, or no dropout")
    p.add_argument("--rows", type=int, default=None, help="check only the first ROWS rows of each batch")
    p.add_argument("--float64", action="store_true",
                   help="compute both in float64: rounding differences vanish (≤ 1e-10), a real difference does not")
    p.add_argument("--max-full-batch-texts", type=int, default=None, help=argparse.SUPPRESS)  # tests: pretend OOM
    p.add_argument("--break", dest="breakage", choices=("no-replay", "cache-scale"), default=None,
                   help=argparse.SUPPRESS)  # tests: break GradCache on purpose, the check must fail
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides) + ([f'model.dropout_masks="{args.dropout}"'] if args.dropout != "off" else [])
    cfg = config_from_dict(apply_overrides(read_json(args.config, ConfigError), overrides), source=args.config)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.dropout == "stream":  # before joining the group
        raise ConfigError("--dropout stream: torch's stream differs from rank to rank, so W processes cannot be "
                          "compared with one; use --dropout keyed (the default) or off")
    dist_info, device = distributed.setup()
    torch.manual_seed(cfg.train.seed)
    amp, _ = autocast_dtype(cfg.train.fp16, cfg.train.bf16, device)
    encoder = SentenceEncoder.from_pretrained(cfg.model.name_or_path, max_seq_length=cfg.model.max_seq_length)
    check_against_model(cfg, encoder.dim, encoder.model.config.max_position_embeddings)
    encoder.to(device, torch.float64 if args.float64 else None).train()
    if args.float64:
        amp = None
    plan, keys = install_training_modules(encoder, cfg)
    if args.dropout == "off":
        for m in encoder.modules():
            if hasattr(m, "p"):
                m.p = 0.0
    tasks = load_tasks(cfg)
    schedule = batch_schedule(cfg, tasks, dist_info.world_size, dist_info.rank)
    model = encoder
    if dist_info.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            encoder, device_ids=[device.index] if device.type == "cuda" else None)
    scale = 2.0**16 if amp == torch.float16 else 1.0  # a GradScaler's starting scale: the cache carries it
    gc_scale = (lambda loss: loss * scale * 2) if args.breakage == "cache-scale" else (lambda loss: loss * scale)
    if args.breakage == "no-replay":
        plan = _WithoutReplay(plan)
    autocast = partial(torch.autocast, device.type, dtype=amp or torch.float32, enabled=amp is not None)
    step = Step(cfg, encoder, model, make_objectives(cfg), plan, keys, device, autocast, gc_scale,
                dist_info.rank, dist_info.world_size)
    step = fit_mini_batch(step, is_main=dist_info.is_main)  # as train.py: train.grad_cache_auto_mini_batch_gib
    cfg = step.cfg

    if dist_info.is_main:
        print(_header(args, cfg, dist_info.world_size, device, amp, plan))
    failed = False
    for k, (_, _, task_name, rows) in zip(range(args.steps), schedule.stream(0, 0)):
        rows = rows[: args.rows] if args.rows else rows
        all_rows = distributed.gather_objects(rows)  # every rank's share, in rank order: the global batch
        data = tasks[task_name]
        rng = torch.get_rng_state()  # stream masks: the reference replays GradCache's draws from here
        gc = _measure(device, lambda: step.forward_backward(task_name, data, rows, k), encoder, scale)
        gc["loss"] = float(distributed.all_reduce_mean(torch.tensor(gc["loss"], device=device)))  # DDP's loss
        if dist_info.is_main:
            with model.no_sync() if dist_info.enabled else contextlib.nullcontext():  # rank 0 alone from here
                failed |= not _compare(cfg, encoder, plan, keys, device, autocast, amp, scale, args, dist_info,
                                       task_name, data, all_rows, k, gc, rng)
        distributed.barrier()
    if dist_info.is_main:
        print("verdict: " + ("FAILED — GradCache's gradient differs from the full batch's (groups above)" if failed
                             else "OK — GradCache's gradient equals the full batch's"))
    distributed.cleanup()
    return 1 if failed else 0


def _compare(cfg, encoder, plan, keys, device, autocast, amp, scale, args, dist_info, task_name, data, all_rows, k,
             gc, rng) -> bool:
    """Rank 0: the full-batch gradient(s) of the same rows, the report; True when they agree."""
    world = dist_info.world_size

    def reference(rank: int, ranks: int, context=autocast, scale_by=scale) -> Step:
        single = _one_process(cfg) if ranks == 1 else cfg
        return Step(single, encoder, encoder, make_objectives(_one_process(single)), plan, keys, device, context,
                    lambda loss: loss * scale_by, rank, ranks)

    # one process at the global batch (every candidate in it), or, without the gather, the mean over the ranks
    # of each rank's own full batch (what DDP averages)
    shares = ([(reference(0, 1), sum(all_rows, []))] if world == 1 or cfg.train.gather_across_devices
              else [(reference(r, world), rows) for r, rows in enumerate(all_rows)])
    shares, full = _full_batch(shares, task_name, data, k, encoder, scale, device, args, rng)
    if len(shares) == 1 and len(shares[0][1]) < len(sum(all_rows, [])):  # did not fit: GradCache on what does
        gc = _measure(device, lambda: shares[0][0].forward_backward(task_name, data, shares[0][1], k), encoder, scale)
    low = None
    if amp is not None:  # the fp32 full batch, the yardstick of low-precision rounding
        low = _measure(device, lambda: _sum(
            [(_plain(reference(s.rank, s.world_size, contextlib.nullcontext, 1.0), task_name, data, rows, k))
             for s, rows in shares]), encoder, len(shares))
    rows = sum((rows for _, rows in shares), [])
    return _report(k, task_name, data, rows, gc, full, low, amp, args.float64)


def _sum(losses: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(losses).mean()


def _one_process(cfg: Config) -> Config:
    """The config of the one-process reference: no gather (it sees every candidate itself)."""
    import dataclasses

    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, gather_across_devices=False))


class _WithoutReplay:
    """A plan whose recomputations skip the RNG replay (only for the tests of the check: it must then fail)."""

    def __init__(self, plan):
        self.plan = plan

    def __getattr__(self, name):
        return getattr(self.plan, name)

    def __call__(self, n, distributed_=False):
        from .grad_cache import Recompute

        built = self.plan(n, distributed_)
        for r in built.recompute:
            while r is not None:
                if type(r) is Recompute:
                    r.replay_rng = False
                r = getattr(r, "inner", None)
        return built


def _measure(device, run, encoder, scale) -> dict:
    """Run a gradient computation: {loss, grads (unscaled), seconds, peak MiB above the start}."""
    encoder.zero_grad(set_to_none=True)
    start_rss = _reset_peak(device)
    t0 = time.perf_counter()
    loss = run()
    seconds = time.perf_counter() - t0
    grads = {n: p.grad.detach().to_dense().double() / scale for n, p in encoder.named_parameters() if p.grad is not None}
    encoder.zero_grad(set_to_none=True)
    return {"loss": float(loss), "grads": grads, "seconds": seconds, "peak_mib": _peak(device) - start_rss}


def _full_batch(shares, task_name, data, k, encoder, scale, device, args, rng):
    """The full-batch gradient of the shares (summed, then averaged over them); when one process's full batch does
    not fit in memory, the largest prefix of its rows that does (said in the output) → (shares used, result)."""
    while True:
        texts = sum(len(rows) for _, rows in shares) * len(data.columns)
        try:
            if args.max_full_batch_texts is not None and texts > args.max_full_batch_texts:
                raise torch.OutOfMemoryError(f"{texts} texts (a limit for the check's tests)")

            def run():
                if args.dropout == "stream":  # from the state GradCache started at: the same draws
                    torch.set_rng_state(rng)
                    if LOSSES[shares[0][0].cfg.tasks[task_name].loss].grad_cache:
                        return _same_mask_full_batch(shares[0][0], task_name, data, shares[0][1])
                return _sum([_plain(step, task_name, data, rows, k) for step, rows in shares])

            return shares, _measure(device, run, encoder, scale * len(shares))
        except (torch.OutOfMemoryError, MemoryError) as e:
            encoder.zero_grad(set_to_none=True)
            step, rows = shares[0][0], sum((rows for _, rows in shares), [])
            if len(shares) > 1:  # one process at a time is all that can be shrunk: fall back to rank 0's view
                step = Step(**{**step.__dict__, "rank": 0, "world_size": 1})
            if len(rows) <= 1:
                raise ConfigError(f"not even one row's full batch fits in memory ({e})") from None
            print(f"  the full batch of {len(rows)} rows ({texts} texts) does not fit in memory ({e}); checking the "
                  f"largest row count that does, with GradCache in one process on the same rows")
            shares = [(step, rows[: len(rows) // 2])]


def _plain(step: Step, task_name, data, rows, k):
    """One plain forward and backward of every text of `rows` (the plain path of `Step.forward_backward`)."""
    import dataclasses

    cfg = step.cfg
    plain_tasks = {name: dataclasses.replace(t, loss="mnrl" if LOSSES[t.loss].grad_cache else t.loss)
                   for name, t in cfg.tasks.items()}
    train = dataclasses.replace(cfg.train, grad_cache_cuda_graphs=False)  # graphs route every loss via GradCache
    plain = dataclasses.replace(step, cfg=dataclasses.replace(cfg, tasks=plain_tasks, train=train))
    return plain.forward_backward(task_name, data, rows, k)


def _same_mask_full_batch(step: Step, task_name, data, rows):
    """Stream masks: one autograd graph over the same mini-batch forwards GradCache runs, from the same RNG state
    (what RandContext's replay guarantees); the loss once on all of it."""
    from .batching import PackedTokenIds
    from .grad_cache import make_mini_batches
    from .speedups.static_shapes import static_mini_batches
    from .step import static_shapes

    texts, _ = data.batch(rows)  # (n_columns·B,) column after column
    ids = PackedTokenIds.tokenize(step.encoder, texts)
    pad_id, shapes = step.encoder.tokenizer.pad_token_id, static_shapes(step.cfg, step.encoder.max_seq_length)
    batches = (static_mini_batches(ids, shapes, pad_id, step.device) if shapes.active  # the chunks GradCache ran
               else make_mini_batches(ids, step.cfg.train.mini_batch_size, pad_id, step.device))
    with step.autocast():
        outs = torch.cat([step.encoder(b.features)[: len(b.texts)] for b in batches])
    reps = torch.empty_like(outs)
    reps[torch.cat([b.texts for b in batches])] = outs
    scores = None if data.scores is None else torch.as_tensor(data.scores[rows], device=step.device)
    loss = step.objectives[task_name](reps, len(data.columns), scores)
    step.scale(loss).backward()
    return loss.detach()


def _groups(names) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for n in names:
        m = re.search(r"transformer\.layer\.(\d+)\.(attention|ffn|sa_layer_norm|output_layer_norm)", n)
        name = "embeddings" if m is None else f"layer {m.group(1)} " + (
            "layer norms" if m.group(2).endswith("norm") else m.group(2))
        groups.setdefault(name, []).append(n)
    return groups


def _rel(a: dict, b: dict, names) -> float:
    num = sum(float((a[n] - b[n]).norm() ** 2) for n in names)
    den = sum(float(b[n].norm() ** 2) for n in names)
    return (num / den) ** 0.5 if den > 0 else (0.0 if num == 0 else float("inf"))


def _report(k, task_name, data, rows, gc, full, low, amp, float64: bool) -> bool:
    names = sorted(full["grads"])
    if sorted(gc["grads"]) != names:
        raise RuntimeError("GradCache and the full batch left gradients on different parameters")
    groups = _groups(names)
    print(f"step {k + 1}, task {task_name!r}: {len(rows)} rows × {len(data.columns)} columns = "
          f"{len(rows) * len(data.columns)} texts")
    print(f"  {'':24}{'GradCache':>16}{'full batch':>16}")
    print(f"  {'loss':24}{gc['loss']:>16.6f}{full['loss']:>16.6f}")
    print(f"  {'time (s)':24}{gc['seconds']:>16.3f}{full['seconds']:>16.3f}")
    print(f"  {'peak memory (MiB)':24}{gc['peak_mib']:>16.0f}{full['peak_mib']:>16.0f}")
    if amp is None:
        errors = {g: _rel(gc["grads"], full["grads"], ns) for g, ns in groups.items()}
        overall = _rel(gc["grads"], full["grads"], names)
        whole, label = (FP64_TOLERANCE, "float64") if float64 else (FP32_TOLERANCE, "fp32")
        bound = {g: whole if float64 else 10 * whole for g in groups}
        label = f"{label}: tolerance {whole:g} for the whole gradient, {bound[next(iter(bound))]:g} per group"
    else:  # both against the fp32 full batch: GradCache no further than 2 × the low-precision full batch + 1e-3
        errors = {g: _rel(gc["grads"], low["grads"], ns) for g, ns in groups.items()}
        full_err = {g: _rel(full["grads"], low["grads"], ns) for g, ns in groups.items()}
        bound = {g: 2 * full_err[g] + 1e-3 for g in groups}
        overall = _rel(gc["grads"], low["grads"], names)
        label = f"{str(amp).split('.')[-1]}: GradCache vs an fp32 full batch, bound 2 × the {str(amp).split('.')[-1]} full batch's error + 1e-3"
    worst_abs = max(float((gc["grads"][n] - full["grads"][n]).abs().max()) for n in names)
    print(f"  relative error per parameter group ({label}):")
    bad = []
    for g, e in errors.items():
        flag = "" if e <= bound[g] else f"   > {bound[g]:.1e}: FAILED"
        print(f"    {g:22}{e:>10.2e}{flag}")
        if e > bound[g]:
            bad.append(g)
    if amp is None and overall > whole:
        bad.append("the whole gradient")
    print(f"  overall {overall:.2e}, max abs {worst_abs:.2e}" + (f"; failed: {', '.join(bad)}" if bad else ""))
    return not bad


def _header(args, cfg, world, device, amp, plan) -> str:
    t = cfg.train
    levers = [f"memory budget {plan.keep_graphs}", "free last graph" if plan.keep_last else "no kept graph",
              "sparse embedding gradients" if plan.sparse is not None else None,
              "linear tape" if plan.tape is not None else None,
              f"lengths padded to multiples of {t.grad_cache_length_multiple}" if t.grad_cache_length_multiple else None,
              f"{t.grad_cache_mini_batch_tokens} tokens per mini-batch" if t.grad_cache_mini_batch_tokens else None,
              "CUDA graphs" + ("" if device.type == "cuda" else " (uncaptured on CPU)") if plan.graphs else None]
    first = cfg.train.grad_cache_first_pass_mini_batch_size
    return (f"bertino check: {args.config}, {args.steps} step(s), {world} process(es) on {device}, "
            f"{amp or torch.float32}, dropout {'off' if args.dropout == 'off' else 'on (' + args.dropout + ' masks)'}"
            f", GradCache mini-batches of {cfg.train.mini_batch_size} texts"
            + (f" (pass 1: {first})" if first else "") + f" ({', '.join(x for x in levers if x)})")


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
