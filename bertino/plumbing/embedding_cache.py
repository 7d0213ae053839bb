"""Embeddings of a long list of texts, computed a chunk at a time into files: resumable after a kill, reused by a
later run with the same model and texts, shared out between the processes of a torchrun job.

    folder/chunk-000000.npy  (C, D) float32   texts [0, C)          written atomically (temp file, then rename)
    folder/chunk-000001.npy  (C, D) float32   texts [C, 2C)         a chunk file exists ⇔ it is complete
    ...
    folder/NAME.npy          (n, D) float32   rows gathered in another order (`gather`), built once

The folder's name is a hash of everything the numbers depend on (`cache_key`): the model's weights and tokenizer,
its max_seq_length and pooling, the texts in order, the chunk size and the encoding batch size. So a chunk on disk
is exactly what encoding it again would give, and a killed run resumes by skipping the chunks that exist.
Memory: one chunk's texts, token ids and (C, D) embeddings at a time; everything else is memory-mapped.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import BertinoError
from .files import atomic_write_with

CACHE_VERSION = 1


def model_fingerprint(encoder) -> str:
    """blake2b of what an encoder's embeddings depend on: every weight (name, shape, dtype, bytes), the tokenizer,
    max_seq_length, pooling, lower-casing and output normalisation."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(encoder.model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    tok = encoder.tokenizer
    h.update((tok.backend_tokenizer.to_str() if hasattr(tok, "backend_tokenizer") else repr(sorted(
        tok.get_vocab().items()))).encode())
    h.update(repr((encoder.max_seq_length, encoder.pooling, encoder.do_lower_case,
                   encoder.normalize_output)).encode())
    return h.hexdigest()


def cache_key(model: str, text_hashes: np.ndarray, chunk: int, batch_size: int) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((CACHE_VERSION, model, chunk, batch_size, len(text_hashes))).encode())
    for start in range(0, len(text_hashes), 1 << 20):
        h.update(np.ascontiguousarray(text_hashes[start:start + (1 << 20)], dtype="<u8").tobytes())
    return h.hexdigest()


class EmbeddingCache:
    """The chunk files of `n` texts' embeddings in `folder`, `chunk` texts each (the last one shorter)."""

    def __init__(self, folder: str | os.PathLike, n: int, chunk: int):
        self.folder, self.n, self.chunk = Path(folder), int(n), int(chunk)
        self.n_chunks = -(-self.n // self.chunk)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BertinoError(f"--cache-dir: cannot create {self.folder}: {e.strerror or e}") from None

    def path(self, i: int) -> Path:
        return self.folder / f"chunk-{i:06d}.npy"

    def span(self, i: int) -> tuple[int, int]:
        """The texts [start, end) of chunk i."""
        return i * self.chunk, min((i + 1) * self.chunk, self.n)

    def missing(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """The chunks not on disk yet that process `rank` of `world_size` encodes (round-robin shares)."""
        return [i for i in range(rank, self.n_chunks, world_size) if not self.path(i).is_file()]

    def write(self, i: int, embeddings: np.ndarray) -> None:
        start, end = self.span(i)
        assert embeddings.shape[0] == end - start, (embeddings.shape, start, end)
        atomic_write_with(self.path(i), lambda tmp: _save(tmp, np.ascontiguousarray(embeddings, dtype=np.float32)))

    def wait_for_all(self, timeout: float, poll: float = 2.0) -> None:
        """Wait until every chunk is on disk (the other ranks' shares); an error if none appears for `timeout` s."""
        missing, last_change = self.missing(), time.monotonic()
        while missing:
            time.sleep(poll)
            now_missing = self.missing()
            if len(now_missing) < len(missing):
                last_change = time.monotonic()
            elif time.monotonic() - last_change > timeout:
                raise BertinoError(f"{self.folder}: {len(now_missing)} embedding chunk(s) still missing after waiting "
                                   f"{timeout:.0f} s for the other processes (chunks {now_missing[:5]}...); run the "
                                   f"same command again to resume")
            missing = now_missing

    def chunk_array(self, i: int) -> np.ndarray:
        return np.load(self.path(i), mmap_mode="r")

    def gather(self, name: str, rows: np.ndarray) -> np.ndarray:
        """(len(rows), D) float32: the embeddings of texts `rows`, in that order, as a memory-mapped file `name.npy`
        in the folder (built once, one chunk at a time)."""
        target = self.folder / f"{name}-{_rows_key(rows)}.npy"
        if not target.is_file():
            dim = self.chunk_array(0).shape[1]
            tmp = target.with_name(f".tmp-{target.name}.{os.getpid()}")
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(rows), dim))
            order = np.argsort(rows, kind="stable")  # positions of `rows`, by text index
            sorted_rows = rows[order]
            for i in range(self.n_chunks):
                start, end = self.span(i)
                lo, hi = np.searchsorted(sorted_rows, [start, end])
                if hi > lo:
                    out[order[lo:hi]] = self.chunk_array(i)[sorted_rows[lo:hi] - start]
            out.flush()
            del out
            os.replace(tmp, target)
        return np.load(target, mmap_mode="c")  # copy-on-write: writable for torch.from_numpy, never written


def _save(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)


def _rows_key(rows: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(rows, dtype="<i8").tobytes(), digest_size=8).hexdigest()
