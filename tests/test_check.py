"""`python -m bertino.check` passes where GradCache is right and fails where it is broken on purpose."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from helpers import ROOT, listed_negatives, retrieval_rows, sts_rows, train_config, write_config, write_jsonl

from bertino import check


def two_task(tmp, model, speedups=None, sts_first=False, **train):
    cfg = train_config(tmp, model, **{"per_device_train_batch_size": 6, "mini_batch_size": 5, **train})
    sts = {"dataset": str(write_jsonl(tmp / "sts.jsonl", sts_rows(12))),
           "columns": ["sentence1", "sentence2", "score"], "loss": "cosent", "score_scale": 5.0}
    cfg["tasks"] = {"sts": sts, **cfg["tasks"]} if sts_first else {**cfg["tasks"], "sts": sts}
    if speedups is not None:
        cfg["speedups"] = speedups
    return write_config(tmp, cfg)


def break_cache(monkeypatch, factor: float) -> None:
    """GradCache's cache (pass 2) multiplied by `factor`, in the textbook and in the fast passes."""
    from bertino import grad_cache
    from bertino.speedups import fast_grad_cache

    original = grad_cache.build_cache

    def scaled(loss_fn, reps, scale_fn=lambda loss: loss):
        loss, cache = original(loss_fn, reps, scale_fn)
        return loss, cache * factor

    monkeypatch.setattr(grad_cache, "build_cache", scaled)
    monkeypatch.setattr(fast_grad_cache, "build_cache", scaled)


def break_replay(monkeypatch) -> None:
    """Pass 3 without pass 1's masks: no RNG replay, and no masks kept on the dropout-mask tape either (the default
    speedups.keep_dropout_masks): dropout draws new masks."""
    from bertino.grad_cache import RandContext
    from bertino.speedups import cpu_dropout

    monkeypatch.setattr(RandContext, "__enter__", lambda self: None)
    monkeypatch.setattr(RandContext, "__exit__", lambda self, *exc: None)
    monkeypatch.setattr(cpu_dropout.BitsDropout, "keep", lambda self, shape: cpu_dropout.keep_mask(shape, self.p))


def run_check(capsys, *args) -> tuple[int, str]:
    code = check.main([*map(str, args)])
    return code, capsys.readouterr().out


@pytest.mark.parametrize("dropout", ["keyed", "stream", "off"])
def test_the_check_passes_on_a_correct_run(dropout_model_dir, tmp_path, capsys, dropout):
    config = two_task(tmp_path, dropout_model_dir, speedups={"memory_budget": 1})
    code, out = run_check(capsys, "--config", config, "--steps", 3, "--dropout", dropout)
    print(out)
    assert code == 0, out
    assert out.count("step ") == 3 and "verdict: OK" in out
    assert "task 'retrieval': 6 rows × 4 columns = 24 texts" in out or "task 'sts': 6 rows × 2 columns" in out
    groups = set(re.findall(r"^    (\w[\w ]*?)\s{2,}\d", out, flags=re.M))
    assert groups == {"embeddings", *[f"layer {i} {p}" for i in (0, 1) for p in ("attention", "ffn", "layer norms")]}
    losses = re.findall(r"^  loss\s+([\d.]+)\s+([\d.]+)", out, flags=re.M)
    assert losses and all(abs(float(a) - float(b)) < 1e-4 for a, b in losses)


FAST_PATH = {"buckets": ["speedups.length_multiple=8"],
             "buckets + tokens": ["speedups.length_multiple=8", "speedups.mini_batch_tokens=48"],
             "graphs": ["speedups.length_multiple=8", "speedups.cuda_graphs=true", "speedups.mini_batch_tokens=48"],
             "textbook": ["speedups=null"],
             "old keys": ["train.grad_cache_length_multiple=8", "train.grad_cache_mini_batch_tokens=48"]}


@pytest.mark.parametrize("name", FAST_PATH)
def test_the_check_passes_on_static_shapes_and_the_graph_path(dropout_model_dir, tmp_path, capsys, name):
    """Both tasks (with graphs, CoSENT runs through GradCache too), float64, keyed dropout on: = the full batch."""
    config = two_task(tmp_path, dropout_model_dir)
    code, out = run_check(capsys, "--config", config, *FAST_PATH[name], "--steps", 3, "--float64")
    print(out)
    assert code == 0 and "verdict: OK" in out, out
    assert ("lengths padded to multiples of 8" in out) == (name != "textbook")
    assert ("CUDA graphs (uncaptured on CPU)" in out) == (name == "graphs")
    assert ("speedups null: the textbook" in out) == (name == "textbook")
    assert re.search(r"overall \d\.\d\de-1[1-9]", out)


def test_the_check_passes_on_buckets_with_stream_masks(dropout_model_dir, tmp_path, capsys):
    code, out = run_check(capsys, "--config", two_task(tmp_path, dropout_model_dir), "speedups.length_multiple=8",
                          "--dropout", "stream")
    assert code == 0 and "verdict: OK" in out, out


@pytest.mark.parametrize("speedups", [None, "null"], ids=["default speed-ups", "textbook"])
@pytest.mark.parametrize("breakage,dropout", [("no-replay", "stream"), ("cache-scale", "keyed")])
def test_the_check_fails_when_grad_cache_is_broken(dropout_model_dir, tmp_path, capsys, monkeypatch, breakage, dropout,
                                                    speedups):
    config = two_task(tmp_path, dropout_model_dir)
    if breakage == "no-replay":
        break_replay(monkeypatch)
    else:
        break_cache(monkeypatch, 1.01)
    extra = [f"speedups={speedups}"] if speedups else []
    code, out = run_check(capsys, "--config", config, "--dropout", dropout, *extra)
    assert code == 1, out
    assert "verdict: FAILED" in out
    failed = re.search(r"failed: (.*)", out).group(1)
    assert "layer 0 attention" in failed and "the whole gradient" in failed  # the offending groups are named


@pytest.mark.parametrize("factor,float64", [(1 + 1e-4, False), (1 + 1e-8, True)])
def test_a_gradient_wrong_just_above_the_tolerance_fails(dropout_model_dir, tmp_path, capsys, monkeypatch, factor, float64):
    """A cache off by 1e-4 (10 × fp32's tolerance of 1e-5) fails in fp32; off by 1e-8 (far below fp32's, 100 ×
    float64's 1e-10) passes in fp32 and fails with --float64: each tolerance is the one applied."""
    config = two_task(tmp_path, dropout_model_dir)
    break_cache(monkeypatch, factor)
    code, out = run_check(capsys, "--config", config, "--dropout", "off", *(["--float64"] if float64 else []))
    assert code == 1 and "the whole gradient" in re.search(r"failed: (.*)", out).group(1), out
    if float64:
        code, out = run_check(capsys, "--config", config, "--dropout", "off")
        assert code == 0, out


def test_a_schedule_that_starts_with_a_cosent_batch_still_checks_grad_cache(dropout_model_dir, tmp_path, capsys, monkeypatch):
    """`--steps 1` on a schedule whose first batch is CoSENT (no GradCache): the first retrieval batch is checked
    too, so a broken pass 3 cannot pass unseen."""
    config = two_task(tmp_path, dropout_model_dir, sts_first=True, multi_dataset_batch_sampler="round_robin")
    code, out = run_check(capsys, "--config", config, "--steps", 1)
    assert code == 0, out
    assert re.findall(r"^step \d+, task '(\w+)'", out, flags=re.M) == ["sts", "retrieval"]
    break_cache(monkeypatch, 1.01)
    code, out = run_check(capsys, "--config", config, "--steps", 1)
    assert code == 1 and "verdict: FAILED" in out, out


def test_a_config_without_grad_cache_is_an_error(dropout_model_dir, tmp_path, capsys):
    cfg = train_config(tmp_path, dropout_model_dir)
    cfg["tasks"]["retrieval"]["loss"] = "mnrl"
    proc = subprocess.run([sys.executable, "-m", "bertino.check", "--config", str(write_config(tmp_path, cfg))],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "no task trains with GradCache" in proc.stderr, proc.stderr


def test_the_v5_recipe_on_a_tiny_model_checks_out(dropout_model_dir, tmp_path, capsys):
    """configs/v5.json with only size overrides: fp16 (bf16 or fp32 on this CPU), Matryoshka, 2 hard negatives."""
    ret = write_jsonl(tmp_path / "retrieval.jsonl", listed_negatives(retrieval_rows(32)))  # v5: a list column
    sts = write_jsonl(tmp_path / "sts.jsonl", sts_rows(40, score_key="similarity_score"))
    code, out = run_check(capsys, "--config", ROOT / "configs" / "v5.json", f"model.name_or_path={dropout_model_dir}",
                          f"tasks.retrieval.dataset={ret}", f"tasks.sts.dataset={sts}",
                          "train.per_device_train_batch_size=8", "train.mini_batch_size=6",
                          "matryoshka.dims=[32,16,8,4]", "eval.dims=null", "eval.ir=[]", "eval.sts=[]",
                          "train.load_best_model_at_end=false", "model.max_seq_length=64",
                          "--steps", 2)
    print(out)
    assert code == 0 and "verdict: OK" in out


def test_a_full_batch_that_does_not_fit_checks_the_largest_that_does(dropout_model_dir, tmp_path, capsys):
    config = two_task(tmp_path, dropout_model_dir)
    code, out = run_check(capsys, "--config", config, "--max-full-batch-texts", 12)
    assert code == 0, out
    assert "the full batch of 6 rows (24 texts) does not fit in memory" in out
    assert "3 rows × 4 columns = 12 texts" in out or "6 rows × 2 columns = 12 texts" in out


def torchrun_check(config, *args, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           "-m", "bertino.check", "--config", str(config), *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("gather", [True, False])
def test_two_processes_check_against_one_at_the_global_batch(dropout_model_dir, tmp_path, gather):
    """W = 2 ranks × 3 rows, after DDP's all-reduce, against one process: at the global batch of 6 rows with the
    gather (every candidate), or each rank's own batch, averaged, without it."""
    config = write_config(tmp_path, train_config(tmp_path, dropout_model_dir, per_device_train_batch_size=3,
                                                 mini_batch_size=5, gather_across_devices=gather))
    proc = torchrun_check(config, "--steps", 2)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout and proc.stdout.count("6 rows × 4 columns = 24 texts") == 2
    assert "verdict: OK" in proc.stdout


def test_two_processes_on_the_graph_path_check_against_one(dropout_model_dir, tmp_path):
    """The graph path under DDP (2 gloo ranks): every mini-batch but the last graphed (uncaptured on a CPU), the
    last through the wrapper after the flush, so the one all-reduce carries the whole gradient."""
    config = write_config(tmp_path, train_config(tmp_path, dropout_model_dir, per_device_train_batch_size=3,
                                                 mini_batch_size=5, gather_across_devices=True))
    proc = torchrun_check(config, "speedups.length_multiple=8", "speedups.cuda_graphs=true", "--steps", 2)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "CUDA graphs" in proc.stdout and "verdict: OK" in proc.stdout


def test_the_check_refuses_stream_masks_across_processes(dropout_model_dir, tmp_path):
    proc = torchrun_check(write_config(tmp_path, train_config(tmp_path, dropout_model_dir)), "--dropout", "stream")
    assert proc.returncode != 0 and "error: --dropout stream" in proc.stderr


def test_the_demo_config_on_a_tiny_model_checks_out(dropout_model_dir, tmp_path, capsys):
    rows = [{"query": r["query"], "positive": r["positive"], "hard_negatives": [r["negative_1"], r["negative_2"]]}
            for r in retrieval_rows(32)]  # as bertino.mine writes them, as configs/demo.json reads them
    data = write_jsonl(tmp_path / "mined.jsonl", rows)
    code, out = run_check(capsys, "--config", ROOT / "configs" / "demo.json", f"model.name_or_path={dropout_model_dir}",
                          f"tasks.retrieval.dataset={data}", "matryoshka.dims=[32,16,8,4]", "eval.dims=null",
                          "eval.ir=[]")
    assert code == 0 and "verdict: OK" in out, out
