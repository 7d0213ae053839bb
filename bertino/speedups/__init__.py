"""Training-time speed-ups: the same gradient as the plain code, in less time. Each one sits in its own module,
beside the code it accelerates, and is tested against it (tests/test_speedups.py).

They reach the plain code through two seams, and nothing else:

1. **Module replacement.** `replace_modules(model, replace)` swaps submodules of the plain DistilBERT
   (bertino/model.py) for equivalent ones. A replacement keeps the parameters (the same tensors, so state-dict
   keys, the optimizer and DDP are unchanged) and behaves exactly like the module it replaces in eval mode, so
   `encode` and `save_pretrained` do not see it. `train.py` installs them once, right after loading the model:
     - `cpu_dropout.install_cpu_dropout`: dropout masks from random bits, and attention written out around them,
       for CPU tensors in training mode (torch's own modules elsewhere);
     - `sparse_embeddings.install_sparse_embedding_grads`: embedding tables that produce sparse gradients while
       their switch is on;
     - `linear_tape.install_linear_tape` (`train.grad_cache_linear_tape`): linear layers that can record their
       outputs in GradCache's pass 1 and replay them in pass 3.
2. **The GradCache plan** (`grad_cache.Plan`, `grad_cache.Recompute`): for each mini-batch, how pass 1 runs it and
   how pass 3 gets its autograd graph back, and the order of pass 3. Classic GradCache recomputes every
   mini-batch; `grad_cache_plan.GradCacheSpeedups` keeps some graphs instead (the memory budget, the free last
   graph), turns on the sparse embedding gradients for every backward but the last, and replays the tape.
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
