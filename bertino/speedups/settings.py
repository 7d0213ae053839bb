"""The `speedups` section of a config: every training-time speed-up, one named switch each.

    "speedups": null          the textbook: the plain model, grad_cache.grad_cache_step, nothing installed
    "speedups": {...}         the switches below (absent keys take their defaults: what is fastest and safe today)

Every switch changes time or memory, never the gradient: each is proven against the textbook in tests
(tests/test_speedups.py, tests/test_static_shapes.py, tests/test_cuda_graphs.py, tests/test_memory_fit.py). So a
resume may change them (a smaller GPU after a pre-emption), with a notice that the run is no longer bitwise the
uninterrupted one. What each does to GradCache's passes is written out in fast_grad_cache.py.

| key                          | default | what it does, and what it costs                                           |
|------------------------------|---------|---------------------------------------------------------------------------|
| `keep_last_graph`            | true    | pass 1's last mini-batch keeps its autograd graph; pass 3 recomputes one  |
|                              |         | mini-batch fewer. Free: classic GradCache holds that graph anyway         |
| `sparse_embedding_grads`     | true    | every backward but the last makes sparse embedding-table gradients        |
|                              |         | (sparse_embeddings.py): no (V, D) zero-fill per mini-batch                |
| `embedding_grad_buffer`      | true    | with sparse_embedding_grads: the tables' `.grad` is a dense buffer kept   |
|                              |         | from step to step and every backward, the last too, adds its sparse rows  |
|                              |         | into it: no (V, D) gradient made per step (2 × 47 MB of fresh memory for  |
|                              |         | MiniLM). The same sum in another order: fp32 rounding                     |
| `cpu_dropout`                | true    | stream dropout masks drawn from 32 random bits on CPU tensors, attention  |
|                              |         | written out around them (cpu_dropout.py). Other draws of the same masks'  |
|                              |         | distribution than torch's dropout: runs are not bitwise those without it  |
| `lazy_mask_bits`             | true    | with cpu_dropout: each mask element from 8 random bits, 24 more only for  |
|                              |         | the 1 in 256 whose 8 tie with the threshold's (cpu_dropout.py): the same  |
|                              |         | Bernoulli variable as 32 bits, a quarter of the generator's draws. Other  |
|                              |         | bits, other masks: runs are not bitwise those without it                  |
| `keep_dropout_masks`         | true    | pass 3 takes pass 1's `cpu_dropout` masks from a tape (tapes.py) instead  |
|                              |         | of drawing them again: the same masks, so the same numbers, with half the |
|                              |         | random bits (≈ 0.05 s of a 1.3 s bf16 step). Costs one byte per mask      |
|                              |         | element of every recomputed mini-batch from pass 1 to pass 3 (MiniLM, 128 |
|                              |         | texts of ≤ 64 tokens: 42 MB; at the card's lengths 455 MB). CPU tensors   |
|                              |         | only                                                                      |
| `keep_freed_memory`          | true    | glibc's malloc keeps the memory a step frees for the next step instead of |
|                              |         | returning it to the kernel (heap.py): 20× fewer page faults per step, a   |
|                              |         | bf16 step 3–14% shorter. Never changes a number; the process keeps its    |
|                              |         | peak memory. Process-wide; nothing where the C library is not glibc       |
| `memory_budget`              | 0       | m more mini-batches keep their pass-1 graph (m × one mini-batch's graph   |
|                              |         | of memory, m fewer recomputations)                                        |
| `linear_tape`                | false   | pass 3 replays pass 1's q/k/v/out_lin/lin2 outputs (linear_tape.py):      |
|                              |         | 5·D floats per token and layer of memory for 2/3 of pass 3's matmuls      |
| `first_pass_mini_batch_size` | null    | pass 1 in chunks of this many texts (fewer, larger no-grad forwards; a    |
|                              |         | GPU lever). Needs keyed masks; no kept graph, no tape                     |
| `length_multiple`            | null    | mini-batches padded to a multiple of q tokens: shapes repeat step to step |
|                              |         | (static_shapes.py); costs the padding                                     |
| `mini_batch_tokens`          | null    | a mini-batch of padded length L holds ⌊K / L⌋ texts instead of            |
|                              |         | train.mini_batch_size                                                     |
| `cuda_graphs`                | false   | passes 1 and 3 replayed as CUDA graphs, one per shape (cuda_graphs.py;    |
|                              |         | uncaptured on a CPU). Needs keyed masks and length_multiple; runs every   |
|                              |         | task's loss through GradCache                                             |
| `auto_mini_batch_gib`        | null    | CUDA: the largest mini-batch whose forward + backward fits in G GiB,      |
|                              |         | measured at start, replaces train.mini_batch_size (memory_fit.py)         |
| `adamw_fused`                | true    | torch's fused AdamW kernel (one pass over every parameter, CUDA and CPU)  |
|                              |         | instead of the multi-tensor one: 3× faster on 2 CPU cores (a step −2%);   |
|                              |         | the same update up to fp32 rounding (5e-8 relative). A torch without the  |
|                              |         | kernel for the device falls back to the multi-tensor one                  |
| `onednn_linear`              | "auto"  | fp32 linear layers in CPU training through oneDNN's kernels, forward and  |
|                              |         | backward (onednn_linear.py): on an AMD EPYC with AVX-512, whose MKL runs  |
|                              |         | AVX2 code, 2.2× the GEMM rate, a fp32 step 0.6× as long. The same         |
|                              |         | products in another summation order (fp32 rounding, ≈ 1e-7). "auto": on   |
|                              |         | AMD CPUs with AVX-512 only (elsewhere unmeasured or equal), for products  |
|                              |         | of ≥ 2²¹ multiply-adds (below, its Python costs more than it saves);      |
|                              |         | true: everywhere, every size. No effect on bf16/fp16 autocast (already    |
|                              |         | oneDNN), CUDA, eval mode or float64                                       |

`check_speedups` holds the combinations that cannot work together; it is called with the rest of the config's
checks (plumbing/config.py), and names the keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError


@dataclass(frozen=True)
class SpeedupsConfig:
    keep_last_graph: bool = True  # pass 1's last mini-batch keeps its graph (free: classic GradCache holds it too)
    sparse_embedding_grads: bool = True  # sparse embedding gradients in every GradCache backward but the last
    embedding_grad_buffer: bool = True  # sparse_embedding_grads add into a dense .grad buffer kept across steps
    cpu_dropout: bool = True  # stream dropout masks from random bits on CPU tensors (with model.dropout_masks
    #                           "stream"; CUDA tensors keep torch's dropout)
    lazy_mask_bits: bool = True  # cpu_dropout's masks from ≈ 8 random bits per element instead of 32 (same variable)
    keep_dropout_masks: bool = True  # pass 3 replays pass 1's cpu_dropout masks instead of drawing them again
    keep_freed_memory: bool = True  # glibc's malloc keeps freed memory for reuse (heap.py; process-wide)
    memory_budget: int = 0  # mini-batches whose pass-1 graph is kept besides the last one (0: classic memory)
    linear_tape: bool = False  # pass 3 replays pass 1's q/k/v/out_lin/lin2 outputs instead of recomputing them
    first_pass_mini_batch_size: int | None = None  # texts per chunk of pass 1 when larger than mini_batch_size
    #                                                (needs model.dropout_masks "keyed"); null: the same
    length_multiple: int | None = None  # pad every GradCache mini-batch to a multiple of this many tokens
    mini_batch_tokens: int | None = None  # a token budget per mini-batch (⌊tokens / L⌋ texts at padded length L)
    cuda_graphs: bool = False  # passes 1 and 3 as CUDA graphs, one per mini-batch shape (keyed masks, buckets)
    auto_mini_batch_gib: float | None = None  # CUDA: the largest mini-batch that fits in this many GiB, at start
    adamw_fused: bool = True  # torch's fused AdamW kernel (CUDA and CPU; the multi-tensor one where it has none)
    onednn_linear: bool | Literal["auto"] = "auto"  # fp32 CPU linear layers' GEMMs through oneDNN, not MKL;
    #                                                  "auto": on an AMD CPU with AVX-512 (onednn_linear.py)


def require(ok: bool, key: str, value, expected: str) -> None:
    if not ok:
        raise ConfigError(f"speedups.{key}: expected {expected}, found {value!r}")


def check_speedups(s: SpeedupsConfig, dropout_masks: str) -> None:
    """The speed-ups that cannot be combined (each message names the keys). `dropout_masks`: model.dropout_masks."""
    require(s.memory_budget >= 0, "memory_budget", s.memory_budget, "≥ 0 (0 = classic GradCache's memory)")
    for key in ("first_pass_mini_batch_size", "length_multiple", "mini_batch_tokens"):
        value = getattr(s, key)
        require(value is None or value >= 1, key, value, "≥ 1 or null")
    gib = s.auto_mini_batch_gib
    require(gib is None or gib > 0, "auto_mini_batch_gib", gib, "> 0 (GiB) or null")
    if s.first_pass_mini_batch_size is not None:
        if dropout_masks != "keyed":
            raise ConfigError("speedups.first_pass_mini_batch_size: pass 1 in other chunks than pass 3 needs dropout "
                              "masks that do not depend on the chunk: set model.dropout_masks to \"keyed\" "
                              f"(found {dropout_masks!r})")
        if s.memory_budget or s.linear_tape:
            raise ConfigError("speedups.first_pass_mini_batch_size: a separate first pass recomputes every "
                              "mini-batch in pass 3, so it cannot be combined with speedups.memory_budget or "
                              "speedups.linear_tape; set those to 0 / false")
        for key in ("length_multiple", "mini_batch_tokens"):
            if getattr(s, key) is not None:
                raise ConfigError(f"speedups.{key}: static shapes cut pass 1 and pass 3 alike, so they cannot be "
                                  "combined with speedups.first_pass_mini_batch_size; set one of them to null")
    if s.cuda_graphs:
        if dropout_masks != "keyed":
            raise ConfigError("speedups.cuda_graphs: pass 3's replay must draw pass 1's dropout masks without a "
                              f"random generator: set model.dropout_masks to \"keyed\" (found {dropout_masks!r})")
        if s.length_multiple is None:
            raise ConfigError("speedups.cuda_graphs: graphs need mini-batch shapes that repeat: set "
                              "speedups.length_multiple (e.g. 32)")
        if s.memory_budget or s.linear_tape:
            raise ConfigError("speedups.cuda_graphs: graphed passes recompute every mini-batch, so they cannot be "
                              "combined with speedups.memory_budget or speedups.linear_tape; set those to 0 / false")
