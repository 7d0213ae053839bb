"""Tests for bertino/sampler.py: batch invariants, W ranks == 1 process, determinism, multi-task schedules.

The no-duplicates sampler is checked against `reference_greedy`, a line-by-line port of sentence-transformers'
dict-based loop (slow but obviously right), on the same permutation.
"""

import itertools
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bertino.sampler import MultiTaskBatchSampler, NoDuplicatesBatchSampler, PlainBatchSampler

REPO = Path(__file__).resolve().parents[1]
FAST = settings(max_examples=150, deadline=None)


def reference_greedy(texts, size, order):
    """sentence-transformers' NoDuplicatesBatchSampler loop, stopped at the first batch it cannot fill.

    Returns (full batches, the partial batch, rows left over).
    """
    remaining = dict.fromkeys(order)  # insertion-ordered: the shuffled order
    batches = []
    while remaining:
        batch, values = [], set()
        for i in remaining:
            if set(texts[i]) & values:
                continue
            batch.append(i)
            values |= set(texts[i])
            if len(batch) == size:
                break
        else:
            return batches, batch, [i for i in remaining if i not in batch]
        for i in batch:
            del remaining[i]
        batches.append(batch)
    return batches, [], []


def random_texts(rng, rows, columns, vocab):
    """rows x columns texts from a small vocabulary, so duplicates are frequent."""
    return [tuple(f"t{v}" for v in rng.integers(0, vocab, columns)) for _ in range(rows)]


datasets = st.builds(
    lambda seed, rows, columns, vocab: random_texts(np.random.default_rng(seed), rows, columns, vocab),
    st.integers(0, 2**31), st.integers(1, 80), st.integers(1, 3), st.integers(1, 60))


def all_ranks(make, world):
    """Batches of every rank: make(num_replicas, rank) -> sampler. Returns (per-rank batch lists, rank 0)."""
    samplers = [make(world, rank) for rank in range(world)]
    return [list(s) for s in samplers], samplers[0]


# ---------------------------------------------------------------- no-duplicates: the algorithm itself

@FAST
@given(datasets, st.integers(1, 9), st.integers(0, 3), st.integers(0, 3))
def test_no_duplicates_matches_reference_greedy(texts, size, seed, epoch):
    sampler = NoDuplicatesBatchSampler(texts, size, seed=seed)
    sampler.set_epoch(epoch)
    order = np.random.default_rng((seed, epoch)).permutation(len(texts)).tolist()  # the sampler's shuffle
    batches, partial, leftover = reference_greedy(texts, size, order)
    assert list(sampler) == batches + ([partial] if partial else [])
    assert sampler.remainder == sorted(leftover)


@pytest.mark.parametrize("hot_every", [2, 3, 7])
def test_many_rows_sharing_a_text_match_reference(hot_every):
    """A text shared by many rows keeps hundreds of rows waiting: exercises the chunked numpy pre-filter."""
    rng = np.random.default_rng(hot_every)
    texts = [(f"q{rng.integers(0, 300)}", "HOT" if i % hot_every == 0 else f"p{i}") for i in range(1500)]
    sampler = NoDuplicatesBatchSampler(texts, 16, seed=hot_every)
    batches, partial, leftover = reference_greedy(texts, 16, np.random.default_rng((hot_every, 0)).permutation(1500))
    assert list(sampler) == batches + [partial]
    assert sampler.remainder == sorted(leftover)
    assert len(leftover) > 100  # the pre-filter really had a large pool to work on


# ---------------------------------------------------------------- invariants, single and multi-rank

def check_epoch(per_rank, first, single, num_rows, texts, size, world, drop_last):
    """Invariants of one epoch: per_rank[r] are rank r's batches, single the 1-process batches of W*size."""
    counts = {len(batches) for batches in per_rank}
    assert counts == {len(first)}, "every rank must yield the same number of batches (else DDP hangs)"
    steps = [sum(step, []) for step in zip(*per_rank)]  # global batch of each step, rank order
    for step in zip(*per_rank):
        assert len({len(shard) for shard in step}) == 1 and len(step[0]) > 0
    if drop_last:
        assert all(len(step) == size * world for step in steps)
    else:
        assert all(len(step) == size * world for step in steps[:-1])
    used = [row for step in steps for row in step]
    assert len(used) == len(set(used)), "a row was used twice in one epoch"
    assert sorted(used + first.remainder) == list(range(num_rows)), "every row is yielded once or in remainder"
    # W ranks with batch B together make exactly the batches of one process with batch W*B (the last one
    # cut to a multiple of W).
    assert steps == [batch[:len(batch) - len(batch) % world] for batch in single if len(batch) >= world]
    if texts is not None:
        for step in steps:
            values = [value for row in step for value in set(texts[row])]
            assert len(values) == len(set(values)), "a text value appears twice in a global batch"


@FAST
@given(datasets, st.integers(1, 6), st.integers(1, 4), st.booleans(), st.integers(0, 5))
def test_no_duplicates_invariants_across_ranks(texts, size, world, drop_last, seed):
    def make(num_replicas, rank, batch_size=size):
        return NoDuplicatesBatchSampler(texts, batch_size, seed=seed, drop_last=drop_last,
                                        num_replicas=num_replicas, rank=rank)
    per_rank, first = all_ranks(make, world)
    single = list(make(1, 0, size * world))
    check_epoch(per_rank, first, single, len(texts), texts, size, world, drop_last)


@FAST
@given(st.integers(1, 200), st.integers(1, 8), st.integers(1, 4), st.booleans(), st.integers(0, 5))
def test_plain_invariants_across_ranks(num_rows, size, world, drop_last, seed):
    def make(num_replicas, rank, batch_size=size):
        return PlainBatchSampler(num_rows, batch_size, seed=seed, drop_last=drop_last,
                                 num_replicas=num_replicas, rank=rank)
    per_rank, first = all_ranks(make, world)
    single = list(make(1, 0, size * world))
    check_epoch(per_rank, first, single, num_rows, None, size, world, drop_last)
    if drop_last:
        assert len(first) == num_rows // (size * world)


def test_sharding_truncates_the_last_batch_to_a_multiple_of_the_world_size():
    ranks = [PlainBatchSampler(23, 4, num_replicas=3, rank=r) for r in range(3)]  # 23 = 12 + 11 -> 12 + 9
    assert [len(s) for s in ranks] == [2, 2, 2]
    assert [len(list(s)[-1]) for s in ranks] == [3, 3, 3]
    assert len(ranks[0].remainder) == 2


def test_a_row_may_repeat_its_own_text_but_not_another_rows():
    texts = [("a", "a"), ("a", "b"), ("c", "d"), ("d", "e")]
    for seed in range(20):
        for batch in NoDuplicatesBatchSampler(texts, 2, seed=seed):
            values = [v for row in batch for v in set(texts[row])]
            assert len(values) == len(set(values))


def test_rows_of_different_widths():
    texts = [("a", "b", "c"), ("d",), ("b", "e"), ("f", "g", "h"), ("c",)]
    for seed in range(20):
        sampler = NoDuplicatesBatchSampler(texts, 2, seed=seed)
        for batch in sampler:
            values = [v for row in batch for v in texts[row]]
            assert len(values) == len(set(values))
        assert sorted(sum(list(sampler), []) + sampler.remainder) == list(range(5))


# ---------------------------------------------------------------- determinism and epochs

@pytest.mark.parametrize("cls", ["plain", "no_duplicates"])
def test_same_seed_and_epoch_same_batches_and_epochs_differ(cls):
    texts = random_texts(np.random.default_rng(0), 300, 2, 400)
    make = (lambda seed: PlainBatchSampler(300, 8, seed=seed)) if cls == "plain" else \
        (lambda seed: NoDuplicatesBatchSampler(texts, 8, seed=seed))
    a, b = make(1), make(1)
    epochs = []
    for epoch in range(3):
        a.set_epoch(epoch), b.set_epoch(epoch)
        epochs.append(list(a))
        assert epochs[-1] == list(b) and len(a) == len(epochs[-1])
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]
    a.set_epoch(0)
    assert list(a) == epochs[0]  # going back to an epoch rebuilds it identically
    assert list(make(2)) != epochs[0]
    s, e = make(0), make(1)  # (seed 0, epoch 1) is not (seed 1, epoch 0)
    s.set_epoch(1)
    assert list(s) != list(e)


def test_batches_do_not_depend_on_python_hash_randomisation():
    # Load sampler.py by path: `import bertino` would import torch and transformers (seconds per process).
    code = ("import importlib.util as u\n"
            "spec = u.spec_from_file_location('sampler', 'bertino/sampler.py')\n"
            "m = u.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "t = [(f'q{i % 37}', f'p{i % 53}', str(i % 11)) for i in range(400)]\n"
            "print(list(m.NoDuplicatesBatchSampler(t, 7, seed=3)))")
    outputs = {subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": str(h)}).stdout for h in (1, 2)}
    assert len(outputs) == 1 and outputs.pop().startswith("[[")


def test_iterating_twice_and_len_agree_and_set_epoch_does_not_disturb_a_running_iterator():
    sampler = NoDuplicatesBatchSampler(random_texts(np.random.default_rng(1), 100, 2, 50), 6)
    running = iter(sampler)
    first = next(running)
    sampler.set_epoch(1)
    rest = list(running)
    sampler.set_epoch(0)
    assert [first, *rest] == list(sampler)
    assert len(sampler) == len(list(sampler))


@pytest.mark.parametrize("cls", [PlainBatchSampler, NoDuplicatesBatchSampler])
def test_iter_from_yields_the_tail(cls):
    data = 97 if cls is PlainBatchSampler else random_texts(np.random.default_rng(2), 97, 2, 80)
    sampler = cls(data, 5, num_replicas=2, rank=1, seed=4)
    full = list(sampler)
    for start in range(len(full) + 2):
        assert list(sampler.iter_from(start)) == full[start:]


def test_works_as_a_dataloader_batch_sampler():
    torch = pytest.importorskip("torch")
    texts = random_texts(np.random.default_rng(3), 50, 2, 40)
    sampler = NoDuplicatesBatchSampler(texts, 4, seed=1)
    loader = torch.utils.data.DataLoader(texts, batch_sampler=sampler, collate_fn=list)
    assert len(loader) == len(sampler)
    assert list(loader) == [[texts[i] for i in batch] for batch in sampler]


# ---------------------------------------------------------------- input validation

@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "batch_size"), (dict(batch_size=2.5), "batch_size"),
    (dict(num_replicas=0), "num_replicas"), (dict(rank=2, num_replicas=2), "rank"),
    (dict(rank=-1), "rank"), (dict(seed=-1), "seed"),
])
def test_invalid_arguments(kwargs, message):
    args = {"batch_size": 2, **kwargs}
    for make in (lambda **kw: NoDuplicatesBatchSampler([("a",), ("b",)], **kw),
                 lambda **kw: PlainBatchSampler(2, **kw)):
        with pytest.raises(ValueError, match=message):
            make(**args)


def test_invalid_texts_and_epoch():
    with pytest.raises(ValueError, match="at least one row"):
        NoDuplicatesBatchSampler([], 2)
    with pytest.raises(ValueError, match="at least one row"):
        PlainBatchSampler(0, 2)
    with pytest.raises(ValueError, match=r"texts\[1\].*a str"):
        NoDuplicatesBatchSampler([("a",), "bc"], 2)
    with pytest.raises(ValueError, match=r"texts\[0\].*empty"):
        NoDuplicatesBatchSampler([()], 2)
    with pytest.raises(ValueError, match="epoch"):
        PlainBatchSampler(3, 2).set_epoch(-1)
    with pytest.raises(ValueError, match="start"):
        PlainBatchSampler(3, 2).iter_from(-1)


# ---------------------------------------------------------------- multi-task

def tasks(seed=0, num_replicas=1, rank=0):
    rng = np.random.default_rng(7)
    return {
        "nli": NoDuplicatesBatchSampler(random_texts(rng, 230, 3, 300), 4, seed=seed,
                                        num_replicas=num_replicas, rank=rank),
        "qa": NoDuplicatesBatchSampler(random_texts(rng, 90, 2, 150), 4, seed=seed,
                                       num_replicas=num_replicas, rank=rank),
        "sts": PlainBatchSampler(41, 4, seed=seed, num_replicas=num_replicas, rank=rank),
    }


def test_proportional_uses_every_batch_of_every_task_once():
    children = tasks()
    expected = {name: list(s) for name, s in children.items()}
    sampler = MultiTaskBatchSampler(children, seed=3)
    steps = list(sampler)
    assert len(steps) == len(sampler) == sum(len(s) for s in children.values())
    assert Counter(name for name, _ in steps) == {name: len(s) for name, s in children.items()}
    for name in children:  # each task's batches come in that task's own order
        assert [batch for task, batch in steps if task == name] == expected[name]
    names = [name for name, _ in steps]
    assert names != sorted(names, key=list(children).index), "the schedule must interleave the tasks"


def test_proportional_schedule_is_deterministic_per_epoch_and_differs_across_epochs():
    a, b = MultiTaskBatchSampler(tasks(), seed=5), MultiTaskBatchSampler(tasks(), seed=5)
    schedules = []
    for epoch in range(3):
        a.set_epoch(epoch), b.set_epoch(epoch)
        assert list(a) == list(b)
        schedules.append(a.schedule())
    assert schedules[0] != schedules[1] != schedules[2]
    assert all(s.epoch == 2 for s in a.samplers.values()), "set_epoch must reach every child"
    other = MultiTaskBatchSampler(tasks(), seed=6)
    other.set_epoch(2)
    assert other.schedule() != schedules[2]


def test_every_rank_follows_the_same_schedule_and_together_they_make_the_single_process_steps():
    world = 2
    ranks = [MultiTaskBatchSampler(tasks(num_replicas=world, rank=r), seed=1) for r in range(world)]
    per_rank = [list(s) for s in ranks]
    assert len({len(steps) for steps in per_rank}) == 1
    for step in zip(*per_rank):
        assert len({name for name, _ in step}) == 1, "all ranks must draw the same task at each step"


def test_round_robin_alternates_and_stops_with_the_shortest_task():
    children = tasks()
    shortest = min(len(s) for s in children.values())
    sampler = MultiTaskBatchSampler(children, mode="round_robin")
    steps = list(sampler)
    assert len(steps) == len(sampler) == shortest * len(children)
    assert [name for name, _ in steps] == list(children) * shortest
    for name, child in children.items():
        assert [batch for task, batch in steps if task == name] == list(child)[:shortest]


@pytest.mark.parametrize("mode", MultiTaskBatchSampler.MODES)
def test_multi_task_resume_yields_exactly_the_tail(mode):
    sampler = MultiTaskBatchSampler(tasks(seed=2), mode=mode, seed=9)
    sampler.set_epoch(1)
    full = list(sampler)
    for start in range(0, len(full) + 1, 3):
        assert list(sampler.iter_from(start)) == full[start:]


@pytest.mark.parametrize("mode", MultiTaskBatchSampler.MODES)
def test_stream_runs_from_a_position_on_epoch_after_epoch(mode):
    reference = MultiTaskBatchSampler(tasks(seed=2), mode=mode, seed=9)
    epochs = {}
    for epoch in (1, 2, 3):
        reference.set_epoch(epoch)
        epochs[epoch] = list(reference)
    want = [(1, i, name, rows) for i, (name, rows) in enumerate(epochs[1]) if i >= 5]
    want += [(e, i, name, rows) for e in (2, 3) for i, (name, rows) in enumerate(epochs[e])]
    stream = MultiTaskBatchSampler(tasks(seed=2), mode=mode, seed=9).stream(1, 5)
    assert list(itertools.islice(stream, len(want))) == want  # the tail of epoch 1, then whole epochs
    assert next(stream)[:2] == (4, 0)  # and on, for ever


def test_multi_task_validation():
    with pytest.raises(ValueError, match="at least one task"):
        MultiTaskBatchSampler({})
    with pytest.raises(ValueError, match="mode"):
        MultiTaskBatchSampler(tasks(), mode="random")
