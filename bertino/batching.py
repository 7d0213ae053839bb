"""From texts to padded batches: the one token store, the one padder and the one length-sorted batcher.

Shapes: N texts, B texts in a batch, L its longest text (in tokens).

Both `SentenceEncoder.encode` (inference) and GradCache's mini-batching (grad_cache.py) sort texts by token count
and pad each batch only to its own longest text: a batch of short queries then costs little, instead of being
padded to the longest passage. They differ only in direction, which `length_sorted_batches` spells out.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


class PackedTokenIds:
    """The token ids of N texts in one flat int32 array: text i is `flat[offsets[i] : offsets[i] + lengths[i]]`.

    A Python list of lists costs ~36 bytes per token (an int object and a pointer); this costs 4, so encoding a
    large corpus does not hold hundreds of MB of token lists. Texts are tokenized `chunk` at a time.
    """

    def __init__(self, flat: np.ndarray, lengths: np.ndarray):
        self.flat = flat  # (Σ lengths,) int32
        self.lengths = lengths  # (N,) int64
        self.offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)  # (N,)

    @classmethod
    def from_lists(cls, ids: Sequence[Sequence[int]]) -> "PackedTokenIds":
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter((t for row in ids for t in row), dtype=np.int32, count=int(lengths.sum()))
        return cls(flat, lengths)

    @classmethod
    def tokenize(cls, encoder, texts: Sequence[str], chunk: int = 4096) -> "PackedTokenIds":
        """`encoder.token_ids` (unpadded, truncated token ids) of every text, `chunk` texts at a time."""
        parts = [cls.from_lists(encoder.token_ids(texts[s : s + chunk])) for s in range(0, len(texts), chunk)]
        return cls(np.concatenate([p.flat for p in parts]), np.concatenate([p.lengths for p in parts]))

    def __len__(self) -> int:
        return len(self.lengths)

    def pad(self, rows: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
        """The texts `rows`, padded to their own longest → input_ids, attention_mask (B, L) int64."""
        rows = np.asarray(rows, dtype=np.int64)
        n = self.lengths[rows]  # (B,)
        L = int(n.max())
        which = np.repeat(np.arange(len(rows)), n)  # (Σ n,) the batch row of each token
        col = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)  # (Σ n,) its position in the row
        ids = np.full((len(rows), L), pad_id, dtype=np.int64)  # (B, L)
        ids[which, col] = self.flat[np.repeat(self.offsets[rows], n) + col]
        mask = (np.arange(L)[None, :] < n[:, None]).astype(np.int64)  # (B, L)
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}


def length_sorted_batches(lengths: Sequence[int] | np.ndarray, size: int, *, shortest_first: bool = False,
                          grow: bool = False) -> list[list[int]]:
    """Group N texts by token count into batches of `size` → lists of text indices (ties keep input order).

    Batches are cut from the longest text down, so the one smaller batch (when `size` does not divide N) holds
    the shortest texts. By default they come longest first (`encode`: the memory peak comes first, and a bar's
    time estimate only gets better); `shortest_first` reverses it (GradCache: pass 1 then ends with a full
    mini-batch of the longest texts, whose graph a plan can keep for free).

    `grow` (longest first only): a batch that pads to L₀ keeps taking texts of exactly L₀ tokens — they add no
    padding — while it holds at most `size × (the longest text of all)` tokens, which is what `size` texts of the
    longest length would use anyway. Short texts (queries) thus run in large batches, often with no padding.
    """
    if grow and shortest_first:
        raise ValueError("grow applies to longest-first batches only")
    lengths = np.asarray(lengths, dtype=np.int64)
    N = len(lengths)
    if shortest_first:  # the reverse of a longest-first order whose ties run backwards
        order = np.argsort(lengths, kind="stable")[::-1]
    else:
        order = np.argsort(-lengths, kind="stable")
    sorted_lengths = lengths[order]
    budget = size * int(sorted_lengths[0]) if N else 0
    ascending = -sorted_lengths  # (N,) ascending, for searchsorted
    batches, i = [], 0
    while i < N:
        end = min(i + size, N)
        if grow:
            L0 = max(int(sorted_lengths[i]), 1)
            same_end = int(np.searchsorted(ascending, -L0, side="right"))  # end of the texts of exactly L0 tokens
            end = max(end, min(same_end, i + max(budget // L0, 1)))
        batches.append(order[i:end].tolist())
        i = end
    if shortest_first:
        return [batch[::-1] for batch in reversed(batches)]
    return batches
