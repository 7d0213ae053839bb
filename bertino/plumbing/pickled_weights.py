"""Pickled weights (`pytorch_model.bin`, or its shards) → `model.safetensors`, without running pickled code.

bertino loads weights only from safetensors (weights.py), so an older checkpoint that ships only a pickle needs
this one step. The pickle is read with `torch.load(weights_only=True)`: tensors and plain containers only, an object
that would run code while unpickling is refused. The tensors are written unchanged (copied apart where a checkpoint
ties two names to one storage, which safetensors does not allow), next to the pickle, atomically; the pickle is left
in place. The command is `python -m bertino.convert FOLDER` (bertino/convert.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import CheckpointError
from .files import atomic_write_with, read_json


def convert(folder: str | os.PathLike) -> Path:
    """Write FOLDER/model.safetensors from FOLDER/pytorch_model.bin (or its shards); return its path."""
    folder = Path(folder)
    target = folder / "model.safetensors"
    if target.exists():
        raise CheckpointError(f"{target} already exists; nothing to convert")
    index = folder / "pytorch_model.bin.index.json"
    if index.exists():
        files = sorted(set(read_json(index)["weight_map"].values()))
    elif (folder / "pytorch_model.bin").exists():
        files = ["pytorch_model.bin"]
    else:
        raise CheckpointError(f"{folder}: no pytorch_model.bin (or pytorch_model.bin.index.json) to convert")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            part = torch.load(folder / name, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError: it holds more than tensors (or is corrupt)
            raise CheckpointError(f"{folder / name}: refused by torch.load(weights_only=True): "
                                  f"{type(e).__name__}: {str(e).strip().splitlines()[0]}") from None
        if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
            raise CheckpointError(f"{folder / name}: expected a dict of tensors (a state_dict)")
        state.update({k: v.detach().clone().contiguous() for k, v in part.items()})  # no shared storage
    atomic_write_with(target, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    return target
