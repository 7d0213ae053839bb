"""Batch samplers: no-duplicate batches, plain shuffled batches, and one-task-per-step multi-task mixing.

Why a special sampler? MultipleNegativesRankingLoss treats every other row of the batch as a negative. If the
same text appears in two rows (the same question with two answers, a popular passage), the loss is asked to
push a text away from itself. The no-duplicates sampler builds batches in which no text value occurs twice.

The greedy algorithm (sentence-transformers' `NoDuplicatesBatchSampler`), for one epoch:

    pool  <- all row indices, shuffled with a generator seeded by (seed, epoch)
    while the pool can fill a batch:
        scan the pool in order; take each row that shares no text value with the batch so far;
        stop when the batch is full. Skipped rows stay in the pool, in order, and are tried first next time.

Rows skipped by earlier batches come before all unscanned rows in shuffled order, so the pool is kept as the
sorted array of skipped positions plus a pointer into the permutation: no O(N^2) rescan of the whole pool.
Conflicts are checked on integer text ids: either ids the sampler gives every distinct text value in `__init__`,
or an (N, C) array of ids the caller computed once — training passes 64-bit hashes of the texts
(plumbing/text_hashes.py), read from a memory-mapped file, so ten million rows are never Python strings. Only
equality of ids matters: any ids with "equal id ⇔ equal text" give the same batches. Nothing depends on Python
`set`/`dict` iteration order, which string-hash randomisation makes differ between processes.
Memory: the epoch's plan is kept as numpy arrays (8 bytes a row); the rows' ids are gathered `_SCAN_CHUNK` rows
at a time, so no (N, C) copy or per-row Python list of the whole epoch is ever built.
Cost: ~2 s for 1M rows x 4 columns (benchmarks/sampler.py). A text found in more rows than the epoch has
batches cannot fit: its rows pile up in the pool and every batch re-checks them (vectorised, see step 1).

Distributed training (W = num_replicas ranks): every rank builds the same GLOBAL batches of W*B rows and rank
r yields the slice [r*B, (r+1)*B) of each. The W ranks together therefore see exactly the batches that one
process would see with batch size W*B. Every rank must yield the same number of batches (a rank that stops
early makes DDP hang), so the final partial batch is cut to a multiple of W and split evenly.

Differences from sentence-transformers, on purpose:
- The seed is the pair (seed, epoch), so epochs differ (ST #3069) and (seed=0, epoch=1) != (seed=1, epoch=0).
- `__len__` is exact: the epoch is built once, cached, and counted (ST's N // B hangs DDP: #2816, #3348).
- Once the pool cannot fill a batch, the epoch ends with at most ONE partial batch (dropped with `drop_last`).
  ST keeps yielding ever smaller batches of mutually conflicting rows (batches of one row teach MNRL nothing).
  Rows not yielded this epoch are listed in `remainder`; a new epoch's shuffle gives them another chance.
- Round robin yields `min(len) * num_tasks` batches, which is what ST's `__len__` claims (its iterator yields
  a few more, from the tasks before the shortest one in the last round).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterator, Mapping, Sequence
from itertools import chain

import numpy as np

_SCHEDULE_STREAM = 1  # extra seed word so the task schedule's randomness is independent of the row shuffles
_SCAN_CHUNK = 1 << 16  # rows whose ids are gathered (and turned into Python lists) at a time


def _epoch_rng(seed: int, epoch: int, *stream: int) -> np.random.Generator:
    """A generator that depends only on (seed, epoch, stream): identical on every rank and every run."""
    return np.random.default_rng((seed, epoch, *stream))


def _check_int(name: str, value: int, minimum: int = 0) -> None:
    """Raise a ValueError that names the argument unless `value` is an int >= minimum (bools are not ints)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


class BatchSamplerBase:
    """Epoch bookkeeping shared by the samplers: seeding, caching, sharding across ranks, resuming.

    A subclass only says how one epoch's global batches are built (`_build_global_batches`).
    """

    def __init__(self, num_rows: int, batch_size: int, *, seed: int = 0, drop_last: bool = False,
                 num_replicas: int = 1, rank: int = 0) -> None:
        if num_rows < 1:
            raise ValueError(f"a sampler needs at least one row, got {num_rows} rows")
        _check_int("batch_size", batch_size, 1)
        _check_int("num_replicas", num_replicas, 1)
        _check_int("rank", rank)
        if rank >= num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got {rank!r}")
        _check_int("seed", seed)
        self.num_rows, self.batch_size, self.seed = int(num_rows), int(batch_size), int(seed)
        self.drop_last, self.num_replicas, self.rank = bool(drop_last), int(num_replicas), int(rank)
        self.epoch = 0
        self._cache: tuple[int, list[np.ndarray], np.ndarray] | None = None  # (epoch, global batches, remainder)

    @property
    def global_batch_size(self) -> int:
        """Rows per step across all ranks: batch_size * num_replicas."""
        return self.batch_size * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle of `epoch`; call it before iterating, with the same value on every rank."""
        _check_int("epoch", epoch)
        self.epoch = int(epoch)

    def _build_global_batches(self, rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """Return (full global batches, the partial batch the pool could still make, rows left over), as int64
        arrays of row indices."""
        raise NotImplementedError

    def _epoch_plan(self) -> tuple[list[np.ndarray], np.ndarray]:
        """This epoch's global batches and remainder, built once per epoch (then `len` is free and exact)."""
        if self._cache is None or self._cache[0] != self.epoch:
            batches, partial, leftover = self._build_global_batches(_epoch_rng(self.seed, self.epoch))
            if self.drop_last:
                leftover = np.concatenate([partial, leftover])
            else:
                # Cut the last batch to a multiple of W so every rank gets an equal, non-empty shard (or none).
                keep = len(partial) - len(partial) % self.num_replicas
                if keep:
                    batches.append(partial[:keep])
                leftover = np.concatenate([partial[keep:], leftover])
            self._cache = (self.epoch, batches, np.sort(leftover))
        return self._cache[1], self._cache[2]

    @property
    def remainder(self) -> list[int]:
        """Sorted row indices that no rank yields this epoch (drop_last, conflicts, or sharding truncation)."""
        return self._epoch_plan()[1].tolist()

    def iter_from(self, start: int) -> Iterator[list[int]]:
        """Yield this rank's batches of the current epoch, skipping the first `start` (to resume mid-epoch)."""
        _check_int("start", start)  # checked now, not at the first next()
        return (self._shard(batch).tolist() for batch in self._epoch_plan()[0][start:])

    def _shard(self, batch: np.ndarray) -> np.ndarray:
        """This rank's contiguous slice of a global batch."""
        shard = len(batch) // self.num_replicas  # == batch_size except for the final partial batch
        return batch[self.rank * shard:(self.rank + 1) * shard]

    def __iter__(self) -> Iterator[list[int]]:
        return self.iter_from(0)

    def __len__(self) -> int:
        return len(self._epoch_plan()[0])


class PlainBatchSampler(BatchSamplerBase):
    """Shuffled batches of `batch_size` rows per rank, no duplicate check (in-batch-negative-free losses, STS)."""

    def _build_global_batches(self, rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        order = rng.permutation(self.num_rows)  # (N,) int64
        size = self.global_batch_size
        full = len(order) // size * size
        return list(order[:full].reshape(-1, size)), order[full:], np.empty(0, dtype=np.int64)


class NoDuplicatesBatchSampler(BatchSamplerBase):
    """Shuffled batches in which no text value appears twice (across all ranks' shards of a step).

    Args:
        texts: texts[i] holds the text values of row i (every column except a score); any hashable values.
            Or an (N, C) integer array of text ids, equal ids for equal texts (what training passes: 64-bit
            hashes of the texts); anything with `ndim`, `dtype`, `len()` and numpy row indexing works, so a
            memory-mapped array, or a view that gathers rows of one (plumbing/text_hashes.py's `RowsOf`).
        batch_size: rows per batch on THIS rank; a step uses batch_size * num_replicas rows in all.
        seed: with the epoch (`set_epoch`), the only source of randomness.
        drop_last: drop the final partial batch instead of yielding it (its rows go to `remainder`).
        num_replicas, rank: the world size and this process's rank, as in `DistributedSampler`.
    """

    def __init__(self, texts, batch_size: int, *, seed: int = 0,
                 drop_last: bool = False, num_replicas: int = 1, rank: int = 0) -> None:
        ids = texts if is_id_array(texts) else self._text_ids(texts)
        super().__init__(len(ids), batch_size, seed=seed, drop_last=drop_last,
                         num_replicas=num_replicas, rank=rank)
        self._row_ids = ids  # (N, C) integer ids, possibly memory-mapped: only ever read in chunks

    @staticmethod
    def _text_ids(texts: Sequence[Sequence[str]]) -> np.ndarray:
        """Give every distinct text an integer id: (N, C) array, C = the widest row.

        A shorter row is padded by repeating its last id. Values inside one row act as a set (a row whose
        anchor equals its positive is allowed), so the padding adds no conflict.
        """
        widths = [0 if isinstance(row, str) else len(row) for row in texts]
        for i, width in enumerate(widths):
            if width == 0:
                found = "a str" if isinstance(texts[i], str) else "an empty row"
                raise ValueError(f"texts[{i}] must be a non-empty sequence of the row's text values "
                                 f"(e.g. a tuple (anchor, positive)), found {found}: {texts[i]!r}")
        if not texts:
            return np.empty((0, 1), dtype=np.int64)
        flat = list(chain.from_iterable(texts))  # every text value, row after row
        vocab: dict[Hashable, int] = {}
        flat_ids = np.fromiter((vocab.setdefault(t, len(vocab)) for t in flat), dtype=np.int64, count=len(flat))
        width = max(widths)
        if min(widths) == width:  # the usual case: every row has the same columns
            return flat_ids.reshape(len(texts), width)
        starts = np.cumsum([0, *widths[:-1]])
        columns = np.minimum(np.arange(width), np.array(widths)[:, None] - 1)  # (N, C), repeats the last column
        return flat_ids[starts[:, None] + columns]  # padding by repeating a value of the row itself

    def _build_global_batches(self, rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        order = rng.permutation(self.num_rows)  # (N,) int64: position p in the shuffle holds row order[p]

        def ids_at(positions: np.ndarray) -> np.ndarray:  # (k,) shuffle positions → (k, C) their rows' ids
            return np.asarray(self._row_ids[order[positions]])

        size, n = self.global_batch_size, len(order)
        skipped = np.empty(0, dtype=np.int64)  # positions skipped by earlier batches, ascending
        fresh = 0  # positions >= fresh were never scanned; they all come after `skipped`
        scan_start, scan_rows, scan_order = 0, [], []  # ids and rows of positions [scan_start, +len) as lists
        batches: list[np.ndarray] = []
        while True:
            batch: list[int] = []
            seen: set[int] = set()  # text ids already in the batch
            # 1) Rows skipped earlier go first, in order (ST keeps them in place in its pool). A text shared
            # by many rows can leave thousands of them here, all blocked again by every batch; so each chunk
            # is pre-filtered in numpy against the ids in the batch so far. `seen` only grows during a batch:
            # a row blocked by the pre-filter stays blocked, only the survivors need a look from Python.
            taken: list[int] = []  # indices into `skipped` of rows that joined the batch
            start, chunk = 0, 32  # chunks double: little wasted pre-filtering past the point the batch fills
            while start < len(skipped) and len(batch) < size:
                block = skipped[start:start + chunk]
                ids = ids_at(block)  # (b, C)
                marked = np.fromiter(seen, dtype=ids.dtype, count=len(seen))
                survivors = np.flatnonzero(~np.isin(ids, marked).any(axis=1))
                for j in survivors.tolist():
                    row = ids[j].tolist()
                    if seen.isdisjoint(row):
                        batch.append(int(order[block[j]]))
                        seen.update(row)
                        taken.append(start + j)
                        if len(batch) == size:
                            break
                start, chunk = start + chunk, 2 * chunk
            skipped = np.delete(skipped, taken)
            # 2) Then unscanned rows; those that conflict now join the end of the skipped rows.
            newly_skipped: list[int] = []
            while fresh < n and len(batch) < size:
                if fresh == scan_start + len(scan_rows):  # the next chunk of the shuffle, as Python lists
                    scan_start, stop = fresh, min(fresh + _SCAN_CHUNK, n)
                    scan_rows = ids_at(np.arange(fresh, stop)).tolist()
                    scan_order = order[fresh:stop].tolist()
                row = scan_rows[fresh - scan_start]
                if seen.isdisjoint(row):
                    batch.append(scan_order[fresh - scan_start])
                    seen.update(row)
                else:
                    newly_skipped.append(fresh)
                fresh += 1
            skipped = np.concatenate([skipped, np.asarray(newly_skipped, dtype=np.int64)])
            if len(batch) < size:  # the whole pool was scanned: this is the epoch's last (partial) batch
                return batches, np.asarray(batch, dtype=np.int64), order[skipped]
            batches.append(np.asarray(batch, dtype=np.int64))


def is_id_array(texts) -> bool:
    """Whether `texts` is an (N, C) array of integer text ids rather than a sequence of rows of texts."""
    return getattr(texts, "ndim", None) == 2 and np.issubdtype(getattr(texts, "dtype", np.dtype(object)), np.integer)


class MultiTaskBatchSampler:
    """Mixes the batches of several tasks; every step's batch comes from ONE task.

    mode="proportional": the epoch is a shuffled schedule in which task t appears len(samplers[t]) times,
        so every batch of every task is used once and tasks are interleaved in proportion to their size.
    mode="round_robin": tasks take turns in the mapping's order for min(len) rounds, then the epoch ends.
    The schedule depends only on (seed, epoch) and the child lengths, so all ranks follow it in lockstep.
    Yields (task_name, this rank's row indices).
    """

    MODES = ("proportional", "round_robin")

    def __init__(self, samplers: Mapping[str, BatchSamplerBase], mode: str = "proportional", seed: int = 0) -> None:
        if not samplers:
            raise ValueError("MultiTaskBatchSampler needs at least one task, got an empty mapping")
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        _check_int("seed", seed)
        self.samplers = dict(samplers)  # insertion order = the caller's task order (never hash order)
        self.mode, self.seed, self.epoch = mode, int(seed), 0
        self._cache: tuple[tuple, list[str]] | None = None  # ((epoch, child lengths), schedule)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the schedule and of every child sampler."""
        _check_int("epoch", epoch)
        self.epoch = int(epoch)
        for sampler in self.samplers.values():
            sampler.set_epoch(epoch)

    def schedule(self) -> list[str]:
        """The task name of every step of the current epoch (cached)."""
        names = list(self.samplers)
        lengths = tuple(len(self.samplers[name]) for name in names)
        key = (self.epoch, lengths)
        if self._cache is None or self._cache[0] != key:
            if self.mode == "proportional":
                steps = np.repeat(np.arange(len(names)), lengths)  # task t, len(t) times
                _epoch_rng(self.seed, self.epoch, _SCHEDULE_STREAM).shuffle(steps)
                schedule = [names[t] for t in steps.tolist()]
            else:
                schedule = names * min(lengths)
            self._cache = (key, schedule)
        return list(self._cache[1])

    def iter_from(self, start: int) -> Iterator[tuple[str, list[int]]]:
        """Yield the current epoch's (task, batch) pairs, skipping the first `start` steps."""
        _check_int("start", start)
        schedule = self.schedule()
        done = Counter(schedule[:start])  # batches each task already gave before `start`
        iterators = {name: sampler.iter_from(done[name]) for name, sampler in self.samplers.items()}
        return ((name, next(iterators[name])) for name in schedule[start:])

    def __iter__(self) -> Iterator[tuple[str, list[int]]]:
        return self.iter_from(0)

    def __len__(self) -> int:
        return len(self.schedule())

    def stream(self, epoch: int, start: int) -> Iterator[tuple[int, int, str, list[int]]]:
        """(epoch, index in the epoch, task, rows) from step `start` of `epoch` on, epoch after epoch, for ever:
        a run's whole data, resumable from any position (`train.py` stops taking when its steps are done)."""
        while True:
            self.set_epoch(epoch)
            for index, (name, rows) in enumerate(self.iter_from(start), start=start):
                yield epoch, index, name, rows
            epoch, start = epoch + 1, 0
