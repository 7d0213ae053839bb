"""train.py end to end on a tiny random DistilBERT: GradCache ≡ no caching, 2 processes ≡ 1, schedule, run folder."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import (ROOT, assert_same_steps, listed_negatives, read_metrics, rel_update_diff, retrieval_rows,
                     run_train, sts_rows, train_config, weights, write_config, write_jsonl)

from bertino import SentenceEncoder
from bertino.optim import decays, lr_multiplier, make_optimizer, make_scheduler, warmup_steps


def test_grad_cache_training_equals_no_caching(nodrop_model_dir, tmp_path):
    w0 = weights(nodrop_model_dir)
    cached = write_config(tmp_path, train_config(tmp_path, nodrop_model_dir, output_dir=str(tmp_path / "cached")), "a.json")
    run_train(cached)
    plain_cfg = train_config(tmp_path, nodrop_model_dir, output_dir=str(tmp_path / "plain"), mini_batch_size=6)
    plain_cfg["tasks"]["retrieval"]["loss"] = "mnrl"  # one plain forward/backward of the whole batch
    run_train(write_config(tmp_path, plain_cfg, "b.json"))
    w_cached, w_plain = weights(tmp_path / "cached" / "final"), weights(tmp_path / "plain" / "final")
    diff = rel_update_diff(w0, w_cached, w_plain)
    print(f"3 steps, GradCache (mini-batch 3) vs no caching: ‖Δw₁ − Δw₂‖/‖Δw₂‖ = {diff:.2e}")
    assert diff <= 1e-3
    assert assert_same_steps(tmp_path / "cached", tmp_path / "plain", rel=1e-5) == 3  # every step's loss and norm
    moved = sum(float((w_plain[k] - w0[k]).double().norm()) for k in w0)
    assert moved > 1e-3  # the weights did move: the comparison above is not between two untrained models


def test_same_seed_with_dropout_is_bitwise_reproducible(tiny_model_dir, tmp_path):
    cfg = write_config(tmp_path, train_config(tmp_path, tiny_model_dir))
    run_train(cfg, f"train.output_dir={tmp_path / 'r1'}")
    run_train(cfg, f"train.output_dir={tmp_path / 'r2'}")
    w1, w2 = weights(tmp_path / "r1" / "final"), weights(tmp_path / "r2" / "final")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    run_train(cfg, f"train.output_dir={tmp_path / 'r3'}", "train.seed=8")
    w3 = weights(tmp_path / "r3" / "final")
    assert not all(torch.equal(w1[k], w3[k]) for k in w1)


TWO_VS_ONE = {"cached_mnrl": dict(loss="cached_mnrl", mini=2), "mnrl": dict(loss="mnrl", mini=6),
              "cached_mnrl, every graph kept": dict(loss="cached_mnrl", mini=2, budget=99),
              "cosent": dict(loss="cosent", mini=6), "cosine": dict(loss="cosine", mini=6)}


@pytest.mark.parametrize("case", TWO_VS_ONE)
def test_two_processes_equal_one(nodrop_model_dir, tmp_path, case):
    """torchrun 2×(B/2) with gathered candidates ≡ 1 process with batch B (dropout 0: ranks' RNG streams differ) —
    the weights, and the logged loss and gradient norm of every step: a uniform factor on the gradient (AdamW and
    clipping hide it in the weights) shows in the norm."""
    loss, mini, budget = TWO_VS_ONE[case]["loss"], TWO_VS_ONE[case]["mini"], TWO_VS_ONE[case].get("budget", 0)
    w0 = weights(nodrop_model_dir)
    base = train_config(tmp_path, nodrop_model_dir, gather_across_devices=True, mini_batch_size=mini)
    base["speedups"] = {"memory_budget": budget}
    if loss in ("cosent", "cosine"):
        base["tasks"] = {"sts": {"dataset": str(write_jsonl(tmp_path / "sts.jsonl", sts_rows(24))),
                                 "columns": ["sentence1", "sentence2", "score"], "loss": loss, "score_scale": 5.0}}
    else:
        base["tasks"]["retrieval"]["loss"] = loss
    one = dict(base, train={**base["train"], "per_device_train_batch_size": 6, "output_dir": str(tmp_path / "one")})
    two = dict(base, train={**base["train"], "per_device_train_batch_size": 3, "mini_batch_size": min(mini, 3),
                            "output_dir": str(tmp_path / "two")})
    run_train(write_config(tmp_path, one, "one.json"))
    run_train(write_config(tmp_path, two, "two.json"), nproc=2)
    diff = rel_update_diff(w0, weights(tmp_path / "two" / "final"), weights(tmp_path / "one" / "final"))
    print(f"{case}: 2 processes × 3 vs 1 process × 6: ‖Δw₂ − Δw₁‖/‖Δw₁‖ = {diff:.2e}")
    assert diff <= 1e-3
    task = next(iter(base["tasks"]))
    assert assert_same_steps(tmp_path / "two", tmp_path / "one", rel=1e-4, keys=(f"loss/{task}", "grad_norm")) == 3


def test_schedule_formulas_and_weight_decay_groups(tiny_model_dir):
    enc = SentenceEncoder.from_pretrained(tiny_model_dir)
    total, ratio, peak = 50, 0.1, 2e-5
    warm = warmup_steps(total, ratio)
    assert warm == 5
    # a product that is not whole rounds UP (the HF Trainer's ceil): 45 × 0.1 = 4.5 → 5 steps, 3 × 0.5 → 2
    assert warmup_steps(45, 0.1) == 5 and warmup_steps(3, 0.5) == 2 and warmup_steps(10, 0.0) == 0
    for kind in ("cosine", "linear", "constant"):
        opt = make_optimizer(enc, peak, 0.01)
        sched = make_scheduler(opt, total, ratio, kind)
        lrs = []
        for _ in range(total):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert lrs[0] == 0.0  # step 0: warm-up starts at zero
        assert lrs[warm] == pytest.approx(peak)  # end of warm-up: the peak
        assert lrs[2] == pytest.approx(peak * 2 / warm)
        last = {"cosine": 0.5 * (1 + math.cos(math.pi * (total - 1 - warm) / (total - warm))),
                "linear": 1 / (total - warm), "constant": 1.0}[kind]
        assert lrs[-1] == pytest.approx(peak * last)
    assert lr_multiplier(warm + (total - warm) // 2, total, warm, "cosine") == pytest.approx(0.5, abs=0.04)

    opt = make_optimizer(enc, peak, 0.01)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    names = dict(enc.named_parameters())
    for name, p in names.items():
        want = not (name.endswith(".bias") or "LayerNorm" in name or "layer_norm" in name)
        assert (id(p) in decayed) == want, name
    assert opt.param_groups[0]["weight_decay"] == 0.01 and opt.param_groups[1]["weight_decay"] == 0.0
    assert not decays("model.embeddings.LayerNorm.weight") and decays("model.embeddings.word_embeddings.weight")
    assert sum(len(g["params"]) for g in opt.param_groups) == len(names)


def test_multi_task_steps_come_from_one_task_in_proportion(tiny_model_dir, tmp_path):
    cfg = train_config(tmp_path, tiny_model_dir, max_steps=-1, num_train_epochs=1, per_device_train_batch_size=4)
    cfg["tasks"]["sts"] = {"dataset": str(write_jsonl(tmp_path / "sts.jsonl", sts_rows(8))),
                           "columns": ["sentence1", "sentence2", "score"], "loss": "cosent", "score_scale": 5.0}
    run_train(write_config(tmp_path, cfg))
    steps = [r for r in read_metrics(tmp_path / "run") if "lr" in r]
    tasks = [[k for k in r if k.startswith("loss/") and k.count("/") == 1] for r in steps]  # totals, not per dim
    assert all(len(t) == 1 for t in tasks)  # logging_steps=1: each step's batch is from one task
    counts = {name: sum(t == [f"loss/{name}"] for t in tasks) for name in ("retrieval", "sts")}
    assert counts == {"retrieval": 24 // 4, "sts": 8 // 4}


def test_v5_config_with_overrides_runs_and_writes_the_run_folder(tiny_model_dir, tmp_path):
    ret = write_jsonl(tmp_path / "retrieval.jsonl", listed_negatives(retrieval_rows(32)))  # v5: a list column
    sts = write_jsonl(tmp_path / "sts_train.jsonl", sts_rows(40, score_key="similarity_score"))
    dev_ir = write_jsonl(tmp_path / "dev_ir.jsonl", [{"query": r["query"], "positive": r["positive"]}
                                                      for r in retrieval_rows(10, seed=1)])
    dev_sts = write_jsonl(tmp_path / "dev_sts.jsonl", sts_rows(12, seed=2))
    run = tmp_path / "run"
    proc = run_train(ROOT / "configs" / "v5.json", f"model.name_or_path={tiny_model_dir}",
                     f"tasks.retrieval.dataset={ret}", f"tasks.sts.dataset={sts}", "train.max_steps=4",
                     "train.per_device_train_batch_size=8", "train.mini_batch_size=4", "matryoshka.dims=[32,16,8,4]",
                     "eval.dims=[32,8]", f"eval.ir=[\"{dev_ir}\"]", f"eval.sts=[\"{dev_sts}\"]",
                     "train.save_steps=2", "train.eval_steps=2", "model.max_seq_length=64", "train.logging_steps=1",
                     f"train.output_dir={run}")
    assert "fp16 needs CUDA" in proc.stderr  # v5.json asks for fp16; this machine has no CUDA
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["max_steps"] == 4 and saved["matryoshka"]["dims"] == [32, 16, 8, 4]
    metrics = read_metrics(run)
    assert [r["step"] for r in metrics if "lr" in r] == [1, 2, 3, 4]
    assert any("eval" in r for r in metrics)
    for key in ("loss_scale", "grad_norm", "examples_per_sec", "lr"):
        assert key in metrics[0]
    assert (run / "checkpoint-2" / "trainer_state.json").exists()
    assert not list(run.glob(".tmp-*"))
    for folder in ("final", "best"):
        enc = SentenceEncoder.from_pretrained(run / folder)
        emb = enc.encode(["il gatto", "il cane"], truncate_dim=8)
        assert emb.shape == (2, 8) and np.isfinite(emb).all()
    card = (run / "final" / "README.md").read_text()
    assert "**retrieval**: CachedMultipleNegativesRankingLoss (GradCache)" in card
    assert "**sts**: CoSENTLoss" in card
    # the final table: one block per eval set, a column per eval dim
    assert "### dev_ir\n\n| metric | 32d | 8d |" in proc.stdout
    assert "### dev_sts\n\n| metric | 32d | 8d |" in proc.stdout and "| Spearman Cosine |" in proc.stdout


def test_loss_goes_down_on_a_learnable_task(tiny_model_dir, tmp_path):
    cfg = train_config(tmp_path, tiny_model_dir, max_steps=40, learning_rate=3e-3, per_device_train_batch_size=8,
                       mini_batch_size=8, logging_steps=1, lr_scheduler_type="linear", warmup_ratio=0.1)
    run_train(write_config(tmp_path, cfg))
    losses = [r["loss/retrieval"] for r in read_metrics(tmp_path / "run") if "loss/retrieval" in r]
    first, last = np.mean(losses[:6]), np.mean(losses[-6:])
    print(f"loss: first 6 steps {first:.3f}, last 6 steps {last:.3f}")
    assert last < 0.7 * first


def test_linear_tape_and_memory_budget_train_like_classic_grad_cache(nodrop_model_dir, tmp_path):
    """`speedups.linear_tape` and `speedups.memory_budget` change cost, not the updates: every step's loss and
    gradient norm are classic GradCache's."""
    w0 = weights(nodrop_model_dir)
    run_train(write_config(tmp_path, train_config(tmp_path, nodrop_model_dir, output_dir=str(tmp_path / "classic")), "c.json"))
    fast = train_config(tmp_path, nodrop_model_dir, output_dir=str(tmp_path / "fast"))
    fast["speedups"] = {"linear_tape": True, "memory_budget": 2}
    run_train(write_config(tmp_path, fast, "f.json"))
    diff = rel_update_diff(w0, weights(tmp_path / "fast" / "final"), weights(tmp_path / "classic" / "final"))
    print(f"3 steps, linear tape + memory budget 2 vs classic GradCache: {diff:.2e}")
    assert diff <= 1e-3
    assert assert_same_steps(tmp_path / "fast", tmp_path / "classic", rel=1e-5) == 3


@pytest.mark.parametrize("loss,mini", [("cached_mnrl", 5), ("mnrl", 24)])
def test_two_processes_equal_one_with_keyed_dropout_on(tiny_model_dir, tmp_path, loss, mini):
    """Dropout ON with keyed masks: every text draws the same masks on rank r of 2 as in one process with the
    global batch, so 2 × 3 rows equal 1 × 6 rows — weights, and the logged loss and gradient norm of every step."""
    w0 = weights(tiny_model_dir)
    base = train_config(tmp_path, tiny_model_dir, gather_across_devices=True, mini_batch_size=mini, logging_steps=1)
    base["model"]["dropout_masks"] = "keyed"
    base["tasks"]["retrieval"]["loss"] = loss
    one = dict(base, train={**base["train"], "per_device_train_batch_size": 6, "output_dir": str(tmp_path / "one")})
    two = dict(base, train={**base["train"], "per_device_train_batch_size": 3, "output_dir": str(tmp_path / "two")})
    run_train(write_config(tmp_path, one, "one.json"))
    run_train(write_config(tmp_path, two, "two.json"), nproc=2)
    diff = rel_update_diff(w0, weights(tmp_path / "two" / "final"), weights(tmp_path / "one" / "final"))
    print(f"{loss}, keyed dropout on: 2 processes × 3 vs 1 process × 6: ‖Δw₂ − Δw₁‖/‖Δw₁‖ = {diff:.2e}")
    assert diff <= 1e-3
    assert assert_same_steps(tmp_path / "two", tmp_path / "one", rel=1e-4, keys=("loss/retrieval", "grad_norm")) == 3
    # and the masks were live: another seed trains to other weights
    run_train(write_config(tmp_path, dict(one, train={**one["train"], "seed": 8,
                                                      "output_dir": str(tmp_path / "seed8")}), "s.json"))
    assert rel_update_diff(w0, weights(tmp_path / "seed8" / "final"), weights(tmp_path / "one" / "final")) > 1e-2


def test_per_dim_losses_are_logged_and_add_up_to_the_weighted_total(tiny_model_dir, tmp_path):
    cfg = train_config(tmp_path, tiny_model_dir, max_steps=3, logging_steps=1)
    run_train(write_config(tmp_path, cfg))
    dims, w = cfg["matryoshka"]["dims"], cfg["matryoshka"]["weights"]
    for record in [r for r in read_metrics(tmp_path / "run") if "lr" in r]:
        parts = [record[f"loss/retrieval/{d}d"] for d in dims]
        assert record["loss/retrieval"] == pytest.approx(sum(wd * p for wd, p in zip(w, parts)), rel=1e-5)
        assert len(set(parts)) == len(parts)  # each dim its own loss, not one number logged twice


def test_a_larger_first_pass_trains_like_the_usual_one(tiny_model_dir, tmp_path):
    w0 = weights(tiny_model_dir)
    runs = {}
    for name, speedups in (("same", {}), ("larger", {"first_pass_mini_batch_size": 24})):
        cfg = train_config(tmp_path, tiny_model_dir, mini_batch_size=3, output_dir=str(tmp_path / name))
        cfg["model"]["dropout_masks"] = "keyed"
        cfg["speedups"] = speedups
        run_train(write_config(tmp_path, cfg, f"{name}.json"))
        runs[name] = weights(tmp_path / name / "final")
    assert rel_update_diff(w0, runs["larger"], runs["same"]) <= 1e-3
    assert assert_same_steps(tmp_path / "larger", tmp_path / "same", rel=1e-5) == 3


@pytest.mark.parametrize("dropout", ["keyed masks", "off"])
def test_speedups_null_trains_the_textbook_and_the_same_steps(tiny_model_dir, nodrop_model_dir, tmp_path, monkeypatch, dropout):
    """`speedups=null`: nothing is installed into the plain model and every GradCache step runs the textbook
    (bertino/grad_cache.py), never the fast passes; and each step's loss and gradient norm equal the default run's
    (every safe speed-up on) to float32 rounding — with dropout on (keyed masks: the same masks whatever runs) and
    off."""
    import sys

    sys.path.insert(0, str(ROOT))
    import train
    from bertino import step as step_module
    from bertino.speedups import fast_grad_cache

    calls, built = {"textbook": 0, "fast": 0}, {}

    def counting(module, key):
        original = getattr(module, "grad_cache_step")

        def wrapped(*args, **kwargs):
            calls[key] += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(module, "grad_cache_step", wrapped)

    counting(step_module, "textbook")
    counting(fast_grad_cache, "fast")
    original_build = train.build_step
    monkeypatch.setattr(train, "build_step", lambda *a: built.setdefault(len(built), original_build(*a)))
    model = tiny_model_dir if dropout == "keyed masks" else nodrop_model_dir
    for name, extra in (("default", []), ("textbook", ["speedups=null"])):
        cfg = train_config(tmp_path, model, output_dir=str(tmp_path / name))
        if dropout == "keyed masks":
            cfg["model"]["dropout_masks"] = "keyed"
        train.main(["--config", str(write_config(tmp_path, cfg, f"{name}.json")), *extra])
    default, textbook = built[0], built[1]
    speedup_modules = [type(m).__name__ for m in textbook.encoder.modules()
                       if type(m).__module__.startswith("bertino.speedups")]
    assert textbook.fast is None and speedup_modules == []  # the plain model: nothing installed
    assert default.fast is not None and any(type(m).__module__.startswith("bertino.speedups")
                                            for m in default.encoder.modules())
    assert calls == {"textbook": 3, "fast": 3}  # the default run's 3 steps went the fast way, the textbook's not
    assert assert_same_steps(tmp_path / "textbook", tmp_path / "default", rel=1e-5) == 3


def test_gradient_clipping_bounds_the_norm_the_optimizer_sees(tiny_model_dir, tmp_path, monkeypatch):
    """AdamW hides a uniform gradient scale, so clipping would not show in the weights: the gradient norm the
    optimizer sees is ≤ max_grad_norm whenever the step's norm (logged) is above it, and untouched with 0."""
    import sys

    sys.path.insert(0, str(ROOT))
    import train

    seen = []
    original = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        grads = [p.grad.double() for g in self.param_groups for p in g["params"] if p.grad is not None]
        seen.append(float(torch.sqrt(sum((g ** 2).sum() for g in grads))))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    for max_norm in (0.05, 0.0):
        seen.clear()
        out = tmp_path / f"clip{max_norm}"
        cfg = train_config(tmp_path, tiny_model_dir, max_grad_norm=max_norm, output_dir=str(out))
        train.main(["--config", str(write_config(tmp_path, cfg, f"c{max_norm}.json"))])
        logged = [r["grad_norm"] for r in read_metrics(out) if "grad_norm" in r]
        assert len(seen) == len(logged) == 3 and all(n > 0.05 for n in logged)  # clipping had work to do
        if max_norm:
            assert all(n <= max_norm * (1 + 1e-5) for n in seen), seen
        else:
            assert seen == pytest.approx(logged, rel=1e-5)
