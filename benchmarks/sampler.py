"""Time one epoch of `NoDuplicatesBatchSampler` on 1,000,000 rows x 4 text columns.

    python benchmarks/sampler.py [--rows 1000000] [--columns 4] [--batch-size 128] [--replicas 1] [--hot 0]

The texts are random strings drawn from a vocabulary about as large as the number of text values, so about a
third of the values are duplicated somewhere: a realistic mix for (query, positive, negative, negative) rows.
The target is < 10 s for building the epoch on a 2-core CPU. The epoch is cached, so a second `len()` is free.
`--hot 0.05` puts one text in 5% of the rows (say a "N/A" negative): more rows than the epoch has batches, the
worst case of the greedy algorithm (those rows wait in the pool, and every batch looks at them again).
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
from bertino.sampler import NoDuplicatesBatchSampler, PlainBatchSampler  # noqa: E402


def random_texts(rows: int, columns: int, hot: float = 0.0, seed: int = 0) -> list[tuple[str, ...]]:
    """rows x columns random strings; vocabulary of rows*columns entries, so duplicates are common.

    A fraction `hot` of the rows get the same text in their last column.
    """
    rng = np.random.default_rng(seed)
    vocab = [f"text {i:x} {'x' * (i % 37)}" for i in range(rows * columns)]  # distinct strings, varied length
    picks = rng.integers(0, len(vocab), size=(rows, columns)).tolist()
    texts = [tuple(vocab[i] for i in row) for row in picks]
    for i in np.flatnonzero(rng.random(rows) < hot).tolist():
        texts[i] = (*texts[i][:-1], "N/A")
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--columns", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128, help="per rank")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--hot", type=float, default=0.0, help="fraction of rows sharing one text")
    args = parser.parse_args()

    texts = random_texts(args.rows, args.columns, args.hot)
    distinct = len(set(t for row in texts for t in row))
    print(f"{args.rows:,} rows x {args.columns} columns, {distinct:,} distinct texts, "
          f"batch {args.batch_size} x {args.replicas} replicas")

    def timed(fn):
        """(result, wall seconds, CPU seconds): CPU time is the steadier figure on a shared machine."""
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        return result, time.perf_counter() - wall, time.process_time() - cpu

    sampler, wall, cpu = timed(lambda: NoDuplicatesBatchSampler(
        texts, args.batch_size, num_replicas=args.replicas, drop_last=True))
    print(f"no-duplicates  {'__init__ (texts -> ids)':<24} {wall:6.2f} s wall, {cpu:6.2f} s CPU")
    for epoch in range(2):
        sampler.set_epoch(epoch)
        n_batches, wall, cpu = timed(lambda: len(sampler))  # len() builds and caches the epoch
        print(f"no-duplicates  {f'epoch {epoch}':<24} {wall:6.2f} s wall, {cpu:6.2f} s CPU: "
              f"{n_batches:,} batches, {len(sampler.remainder):,} rows left over")
    plain = PlainBatchSampler(args.rows, args.batch_size, num_replicas=args.replicas)
    n_batches, wall, cpu = timed(lambda: len(plain))
    print(f"plain          {'epoch 0':<24} {wall:6.2f} s wall, {cpu:6.2f} s CPU: {n_batches:,} batches")

if __name__ == "__main__":
    main()
