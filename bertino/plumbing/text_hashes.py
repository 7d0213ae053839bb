"""64-bit hashes of a task's texts: what the no-duplicates sampler and the ranks' data fingerprint compare.

    text_hashes(table, spec) → (N_src, t) uint64: xxh3-64 of each text's UTF-8 bytes (0 where a row has none)

The sampler only asks "are these two texts equal?", so it can work on hashes instead of strings: 8 bytes per text
instead of a Python `str` (~50 bytes + the text), computed once, straight from the Arrow buffers (~0.5 s per
million texts), and for a memory-mapped table stored next to it (`hashes-KEY.npy`) and memory-mapped too, so a
second run, and every rank of a torchrun job, reads them instead of hashing again.

Equal texts always get equal hashes. Two different texts get the same 64-bit hash with probability ~2⁻⁶⁴ per
pair: for 40 million distinct texts, about 1 in 20,000 for the whole data set; the only effect would be that those
two texts are never put in one batch. (xxh3 is the hash `datasets` itself uses for its fingerprints.)
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from .arrow_arrays import is_list_of_texts, is_text_type, list_item, to_numpy
from .readers import Table, cache_lock


def text_hashes(table: Table, spec: tuple[tuple[str, int | None], ...]) -> np.ndarray:
    """(N_src, t) uint64 hashes of the texts `spec` names (row_checks.text_spec), in memory or memory-mapped."""
    t = len(spec)
    if table.cache_dir is None:
        out = np.zeros((table.num_rows, t), dtype=np.uint64)
        _fill(table, spec, out)
        return out
    key = hashlib.sha256(json.dumps([list(s) for s in spec]).encode()).hexdigest()[:24]
    path = table.cache_dir / f"hashes-{key}.npy"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with cache_lock(path):
            if not path.is_file():
                tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint64, shape=(table.num_rows, t))
                _fill(table, spec, out)  # written through the mapping: page cache, not this process's memory
                out.flush()
                del out
                os.replace(tmp, path)
    return np.load(path, mmap_mode="r")


def _fill(table: Table, spec, out: np.ndarray) -> None:
    row = 0
    for batch in table.table.to_batches(max_chunksize=1 << 16):
        n = batch.num_rows
        for k, (column, item) in enumerate(spec):
            array = batch.column(column)
            if item is not None:
                array = list_item(array, item) if is_list_of_texts(array.type) else None
            out[row:row + n, k] = hash_strings(array) if array is not None and is_text_type(array.type) else 0
        row += n


def hash_strings(array) -> np.ndarray:
    """(n,) uint64 xxh3-64 of each string of an Arrow string Array (one chunk); 0 for a null."""
    import pyarrow as pa
    import xxhash

    if pa.types.is_string_view(array.type):
        array = array.cast(pa.large_string())
    n = len(array)
    _, offsets, data = array.buffers()[:3]
    dtype = np.int64 if pa.types.is_large_string(array.type) else np.int32
    o = np.frombuffer(offsets, dtype=dtype)[array.offset:array.offset + n + 1].tolist()  # (n + 1,)
    view = memoryview(data) if data is not None else memoryview(b"")
    digest = xxhash.xxh3_64_intdigest
    out = np.fromiter((digest(view[a:b]) for a, b in zip(o, o[1:])), dtype=np.uint64, count=n)
    if array.null_count:
        out[~to_numpy(array.is_valid())] = 0
    return out


class RowsOf:
    """`ids[rows]` as an (N, C) array-like, gathered only when indexed: the sampler's view of the hashes of a
    task's rows (after drops, the hold-out and balance_to) without an (N, C) copy."""

    ndim = 2

    def __init__(self, ids: np.ndarray, rows: np.ndarray):
        self.ids, self.rows = ids, rows
        self.dtype = ids.dtype
        self.shape = (len(rows), ids.shape[1])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index) -> np.ndarray:
        return np.asarray(self.ids[self.rows[index]])
