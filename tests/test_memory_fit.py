"""The largest mini-batch that fits (bertino/speedups/memory_fit.py), with fake memory probes on the CPU: the search
picks the largest size within the budget, never beyond the batch, halves when the configured size does not fit,
says so when nothing fits, leaves the random streams alone — and the chosen size gives the same gradient.
"""

from __future__ import annotations

import pytest
import torch
from helpers import max_rel_error, train_config, write_config

from bertino import SentenceEncoder
from bertino.build import Process, build_step
from bertino.distributed import DistInfo
from bertino.plumbing.config import load_config
from bertino.plumbing.data import load_tasks
from bertino.speedups.memory_fit import choose_mini_batch_size, fit_mini_batch

MiB = 2**20


def linear(per_text_mib: float, oom_above: int | None = None):
    """A fake probe: memory grows linearly with C; out of memory (None) above `oom_above`."""
    calls = []

    def probe(C):
        calls.append(C)
        return None if oom_above is not None and C > oom_above else C * per_text_mib * MiB

    probe.calls = calls
    return probe


def test_the_largest_power_of_two_multiple_within_the_budget():
    probe = linear(100)
    assert choose_mini_batch_size(probe, 16, 512, 1000 * MiB)[0] == 8  # 16 → 1.6 GB too much: halve
    assert choose_mini_batch_size(linear(10), 16, 512, 1000 * MiB)[0] == 64  # 16, 32, 64 fit; 128 does not
    c, measured = choose_mini_batch_size(linear(10), 16, 512, 1000 * MiB)
    assert sorted(measured) == [16, 32, 64, 128]  # stops at the first size that does not fit
    assert choose_mini_batch_size(linear(1), 16, 512, 10**6 * MiB)[0] == 512  # capped by the batch's texts
    assert choose_mini_batch_size(linear(1), 16, 200, 10**6 * MiB)[0] == 200  # ... also when not a power of two
    assert choose_mini_batch_size(linear(1, oom_above=40), 16, 512, 10**6 * MiB)[0] == 32  # OOM = does not fit
    with pytest.raises(RuntimeError, match="not even one text"):
        choose_mini_batch_size(linear(100), 4, 512, 50 * MiB)


def make_step(tmp_path, model_dir, **speedups):
    cfg = train_config(tmp_path, model_dir, per_device_train_batch_size=6, mini_batch_size=4)
    cfg["model"]["dropout_masks"] = "keyed"
    cfg["speedups"] = speedups
    cfg = load_config(write_config(tmp_path, cfg))
    enc = SentenceEncoder.from_pretrained(model_dir, max_seq_length=cfg.model.max_seq_length).double()
    step = build_step(cfg, enc, Process(DistInfo(), torch.device("cpu"), None))  # off CUDA: nothing fitted yet
    return step, cfg


def test_the_chosen_size_replaces_the_configured_one_and_changes_nothing_else(dropout_model_dir, tmp_path, capsys):
    step, cfg = make_step(tmp_path, dropout_model_dir, auto_mini_batch_gib=1.0)
    capsys.readouterr()
    fitted = fit_mini_batch(step, 1.0, 24, probe=linear(100))  # 4 → 8 → 16 → 1.6 GB: 8
    assert fitted.mini_batch_size == 8 and step.mini_batch_size == 4 and cfg.train.mini_batch_size == 4
    assert "mini-batches of 8 texts" in capsys.readouterr().err
    assert fitted.fast.settings == step.fast.settings  # nothing else changed
    tokens, _ = make_step(tmp_path, dropout_model_dir, auto_mini_batch_gib=1.0, mini_batch_tokens=64, length_multiple=8)
    assert fit_mini_batch(tokens, 1.0, 24, probe=linear(100)).fast.settings.mini_batch_tokens == 8 * 32  # C · L_max
    # the same gradient: GradCache at the chosen size vs at the configured one (float64, keyed dropout on)
    data = load_tasks(cfg)["retrieval"]
    got = {}
    for name, s in (("configured", step), ("fitted", fitted)):
        s.loss_and_gradient("retrieval", data, list(range(6)), 0)
        got[name] = {n: p.grad.clone() for n, p in s.encoder.named_parameters()}
        s.encoder.zero_grad(set_to_none=True)
    assert max_rel_error(got["fitted"], got["configured"]) <= 1e-10


def test_off_cuda_without_a_probe_it_warns_and_keeps_the_size(dropout_model_dir, tmp_path, capsys):
    step, _ = make_step(tmp_path, dropout_model_dir, auto_mini_batch_gib=1.0)  # build_step itself fits: it warns here
    assert "warning: speedups.auto_mini_batch_gib measures GPU memory" in capsys.readouterr().err
    assert fit_mini_batch(step, 1.0, 24) is step


def test_probing_leaves_the_random_streams_alone(dropout_model_dir, tmp_path):
    step, _ = make_step(tmp_path, dropout_model_dir, auto_mini_batch_gib=1.0)

    def noisy(C):  # a probe that draws random numbers, as a forward with stream dropout would
        torch.rand(1000)
        return C * MiB

    torch.manual_seed(3)
    expected = torch.rand(5)
    torch.manual_seed(3)
    fit_mini_batch(step, 1.0, 24, probe=noisy)
    assert torch.equal(torch.rand(5), expected)
