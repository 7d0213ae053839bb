"""Static mini-batch shapes: GradCache's mini-batches padded to a few length buckets, with a fixed row count per
bucket or a token budget, so that the shapes repeat from step to step (what captured CUDA graphs need).

Shapes: T texts in the logical batch, n_t the token count of text t, q the length multiple, L_max the longest
length (the encoder's max_seq_length), L a mini-batch's padded length, C its rows, K a token budget.

`grad_cache.make_mini_batches` pads each chunk of C texts to its own longest text, so the lengths — and the shapes
of every kernel — change from step to step. `StaticShapes` cuts the batch instead as

    bucket length     L(t) = min(q · ⌈n_t / q⌉, L_max)                 train.grad_cache_length_multiple = q
    texts per chunk   C_L  = max(1, ⌊K / L⌋)                           train.grad_cache_mini_batch_tokens = K
                           = train.mini_batch_size                     without a token budget
    rows (pad_rows)   C_L for a full chunk; a bucket's last chunk of r < C_L texts gets min(C_L, 2^⌈log₂ r⌉)
                      rows, the missing ones empty

so with `pad_rows` every chunk has one of a small fixed set of shapes (C, L): L one of ⌈L_max / q⌉ lengths, C
either C_L or a power of two below it. A token budget without buckets cuts chunks from the longest text down: a
chunk padded to its longest text L₀ holds ⌊K / L₀⌋ texts (sentence-transformers' `mini_batch_num_tokens` idea:
short texts in large chunks, long texts in small ones, about K tokens each).

Why the gradient does not change. GradCache's gradient is Σ_chunks J_chunkᵀ g_chunk for ANY partition of the texts
into chunks (docs/gradcache.md §1). A text's embedding does not depend on the other texts of its chunk (attention
runs within a text, LayerNorm within a token) nor on extra padding (masked keys get weight exp(−∞) = 0, mean
pooling skips them); with keyed dropout masks its masks do not either (bertino/keyed_dropout.py). An empty row —
pad tokens with only position 0 unmasked, so that its attention stays finite — is cut off the chunk's output
(`fast_grad_cache.real_rows`): its cache gradient is zero, so it adds exactly 0 to every parameter's gradient.
tests/test_static_shapes.py proves it in float64 with dropout on (keyed masks): every option against one plain
full batch to 1e-10.

The host side: every chunk of a step is padded on the host and the whole step goes to the device in ONE copy
(pinned and non-blocking on CUDA) instead of three small copies per chunk, each of which, from pageable memory,
waits for the GPU's queue.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..batching import PackedTokenIds
from ..grad_cache import MiniBatch


@dataclass(frozen=True)
class StaticShapes:
    """How a step's texts are cut into mini-batches of repeating shapes (module docstring)."""

    max_length: int  # L_max: the longest bucket (the encoder's max_seq_length)
    mini_batch_size: int  # C_L without a token budget
    length_multiple: int | None = None  # q; None: each chunk padded to its own longest text
    mini_batch_tokens: int | None = None  # K; None: mini_batch_size texts per chunk
    pad_rows: bool = False  # fill a bucket's last chunk with empty rows up to a power of two (≤ C_L)

    @property
    def active(self) -> bool:
        """Does this cut the batch differently from `grad_cache.make_mini_batches`?"""
        return self.length_multiple is not None or self.mini_batch_tokens is not None or self.pad_rows

    def bucket(self, n: int) -> int:
        """L(t) for a text of n tokens."""
        q = self.length_multiple
        return n if q is None else min(q * -(-n // q), self.max_length)

    def texts_per_chunk(self, L: int) -> int:
        """C_L."""
        return self.mini_batch_size if self.mini_batch_tokens is None else max(1, self.mini_batch_tokens // L)

    def rows(self, r: int, L: int) -> int:
        """The rows of a chunk of r texts at length L."""
        full = self.texts_per_chunk(L)
        return min(full, 1 << (r - 1).bit_length()) if self.pad_rows else r

    def chunks(self, lengths) -> list[tuple[list[int], int, int]]:
        """The mini-batches of texts with these token counts (T,) → [(text indices, L, rows)], shortest first.

        Buckets: the texts of one bucket length, shortest first, cut into chunks of C_L; the one smaller chunk of a
        bucket comes first. No buckets: chunks cut from the longest text down, each holding C_L of its own length.
        """
        lengths = np.asarray(lengths, dtype=np.int64)
        out = []
        if self.length_multiple is not None:
            buckets = np.array([self.bucket(int(n)) for n in lengths], dtype=np.int64)
            order = np.lexsort((np.arange(len(lengths)), lengths, buckets))  # by bucket, then length, then index
            for L in np.unique(buckets):
                texts = [int(t) for t in order if buckets[t] == L]
                C = self.texts_per_chunk(int(L))
                first = len(texts) % C or C
                for start in [0, *range(first, len(texts), C)]:
                    rows = texts[start : first if start == 0 else start + C]
                    out.append((rows, int(L), self.rows(len(rows), int(L))))
            return out
        order = np.argsort(-lengths, kind="stable")  # longest first
        i = 0
        while i < len(order):
            L = int(lengths[order[i]])
            rows = [int(t) for t in order[i : i + self.texts_per_chunk(max(L, 1))]]
            out.append((rows[::-1], L, self.rows(len(rows), L)))
            i += len(rows)
        return out[::-1]


def static_mini_batches(ids: PackedTokenIds, shapes: StaticShapes, pad_id: int, device="cpu",
                        text_keys: torch.Tensor | None = None) -> list[MiniBatch]:
    """The T texts of `ids` in the mini-batches of `shapes`, on `device` in one copy.

    Each MiniBatch holds features (rows, L) — its texts, then empty rows (pad ids, attention only at position 0) —
    and `texts` (r,) for its r real texts; with keyed masks its features also hold `dropout_keys` (rows,): the
    texts' keys, 0 for the empty rows (whose masks do not matter: their outputs are cut off). `text_keys` (T,) on
    the host.
    """
    parts, layout = [], []
    for texts, L, rows in shapes.chunks(ids.lengths):
        real = ids.pad(texts, pad_id)  # (r, L_own)
        r, own = real["input_ids"].shape
        input_ids = torch.full((rows, L), pad_id, dtype=torch.int64)  # (rows, L)
        mask = torch.zeros((rows, L), dtype=torch.int64)  # (rows, L)
        input_ids[:r, :own], mask[:r, :own], mask[r:, 0] = real["input_ids"], real["attention_mask"], 1
        index = torch.as_tensor(texts, dtype=torch.int64)  # (r,)
        chunk = [input_ids.view(-1), mask.view(-1), index]
        if text_keys is not None:
            keys = torch.zeros(rows, dtype=torch.int64)  # (rows,)
            keys[:r] = text_keys.cpu()[index]
            chunk.append(keys)
        parts += chunk
        layout.append((rows, L, r))
    flat = torch.cat(parts)  # every chunk of the step, int64
    device = torch.device(device)
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)  # one copy, the host does not wait
    batches, at = [], 0
    for rows, L, r in layout:
        views = []
        for n in (rows * L, rows * L, r, rows if text_keys is not None else 0):
            views.append(flat[at : at + n])
            at += n
        features = {"input_ids": views[0].view(rows, L), "attention_mask": views[1].view(rows, L)}
        if text_keys is not None:
            features["dropout_keys"] = views[3]  # (rows,)
        batches.append(MiniBatch(features, views[2]))
    return batches
