"""Training-time speed-ups: the same gradient as the textbook code, in less time. Each one is a named switch of the
config's `speedups` section (settings.py: the switches, their defaults and their costs); `"speedups": null` runs
the textbook with nothing installed. Each is tested against the code it replaces (tests/test_speedups.py).

They reach the textbook through two seams, and nothing else (plus one process-wide setting, heap.py's
`keep_freed_memory`, which changes where memory comes from and never a number):

1. **Module replacement.** `replace_modules(model, replace)` swaps submodules of the plain DistilBERT
   (bertino/model.py) for equivalent ones. A replacement keeps the parameters (the same tensors, so state-dict
   keys, the optimizer and DDP are unchanged) and behaves exactly like the module it replaces in eval mode, so
   `encode` and `save_pretrained` do not see it. `fast_grad_cache.install_speedups` installs them once, when
   bertino/build.py builds the step:
     - `cpu_dropout.install_cpu_dropout` (`cpu_dropout`): dropout masks from random bits, and attention written out
       around them, for CPU tensors in training mode (torch's own modules elsewhere);
     - `sparse_embeddings.install_sparse_embedding_grads` (`sparse_embedding_grads`): embedding tables that produce
       sparse gradients while their switch is on;
     - `linear_tape.install_linear_tape` (`linear_tape`): linear layers that can record their outputs in GradCache's
       pass 1 and replay them in pass 3 (on a `tapes.TapeDeck`; `cpu_dropout`'s masks use one too, with
       `keep_dropout_masks`).
2. **GradCache's passes with switches** (fast_grad_cache.py): the textbook's three passes (bertino/grad_cache.py)
   written out again with an `if` per switch — kept graphs, sparse backwards, the tape, CUDA graphs
   (cuda_graphs.py), static shapes (static_shapes.py), a larger first pass — decided per step by `plan_step`.
"""

from __future__ import annotations

from typing import Callable

from torch import nn


def replace_modules(model: nn.Module, replace: Callable[[str, nn.Module], nn.Module | None]) -> int:
    """Swap, in place, every submodule `m` (attribute name `name`) for which `replace(name, m)` returns a module.

    Returns how many were replaced. The model's own submodules only: a replacement is not visited again.
    """
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = replace(name, child)
            if new is not None:
                setattr(parent, name, new)
                count += 1
    return count
