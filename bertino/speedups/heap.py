"""Keeping freed memory in the process (`speedups.keep_freed_memory`): glibc's malloc tuned for a training loop.

A training step allocates and frees the same large temporaries over and over: activations, casts, weight
gradients (MiniLM's FFN weight gradient alone is 2.4 MB, made 16 times a step under GradCache). glibc's malloc
serves a block of more than M_MMAP_THRESHOLD bytes with its own mmap and unmaps it when freed, and returns the free
top of its heap to the kernel once it exceeds M_TRIM_THRESHOLD; both thresholds start at 128 KiB and adapt. So
memory the step frees is often given back to the kernel and asked for again a moment later, and every fresh page
is a page fault: ≈ 67,000 faults (260 MB) per bf16 step of benchmarks/vs_sentence_transformers.py on the 2-core
machine of benchmarks/README.md, a few microseconds each inside a virtual machine.

`keep_freed_memory()` sets M_MMAP_THRESHOLD to glibc's largest (32 MiB on 64-bit systems: larger blocks are
always mapped separately; the embedding gradient buffer, sparse_embeddings.py, keeps the one such tensor of a step)
and M_TRIM_THRESHOLD to 2 GiB, so freed blocks stay in the heap for the next step: ≈ 27,000 faults per step, the
rest being the embedding tables' fresh (V, D) gradients, and ≈ 3,500 with those kept too (embedding_grad_buffer);
a step 3–14% shorter (benchmarks/README.md). It changes where memory comes from, never a number; the cost is that the
process keeps the memory it freed (its peak) instead of returning it. It is process-wide and stays set; where
the C library is not glibc (macOS, Windows, musl), it does nothing.
"""

from __future__ import annotations

import ctypes
import platform
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (glibc's malloc.h)
LARGEST_MMAP_THRESHOLD = 32 * 2**20  # glibc refuses more on 64-bit systems (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: 2 GiB of free heap top before any is returned


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse (module docstring) → whether it took effect."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # the C library this process already uses
    mmap_ok = libc.mallopt(M_MMAP_THRESHOLD, LARGEST_MMAP_THRESHOLD) == 1
    trim_ok = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return mmap_ok and trim_ok
