"""Pickled weights (`pytorch_model.bin`, or its shards) → safetensors, without running pickled code.

bertino loads weights only from safetensors (weights.py). A checkpoint that ships only a pickle — `indigo-ai/BERTino`,
the card's base model, is one — is read with `torch.load(weights_only=True)`: torch's restricted unpickler accepts
tensors and plain containers only, and refuses, before anything runs, a pickle that names any other callable (the
way a malicious pickle runs code). The tensors are written unchanged (copied apart where a checkpoint ties two
names to one storage, which safetensors does not allow), atomically, in one of two places:

* `cached_safetensors(folder)`, what loading does on its own: `<bertino cache>/converted/<sha256>/model.safetensors`,
  keyed by the pickle's content, with a one-line notice the first time. Not next to the pickle: a hub snapshot is
  the hub client's (its files are links into its blob store, and a write there would make the snapshot differ from
  the repo), and a read-only model folder must load too. The key is the content, so an edited pickle is converted
  again, and a second load reads the cache without unpickling anything.
* `convert(folder)`, the explicit `python -m bertino.convert FOLDER`: FOLDER/model.safetensors, next to the pickle.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import CheckpointError
from .files import atomic_write_with, read_json
from .sources import cache_root


def pickle_files(folder: Path) -> list[str]:
    """The pickled weight files of a folder: its shards by the index, or `pytorch_model.bin`; [] when none."""
    index = folder / "pytorch_model.bin.index.json"
    if index.exists():
        return sorted(set(read_json(index)["weight_map"].values()))
    return ["pytorch_model.bin"] if (folder / "pytorch_model.bin").exists() else []


def read_pickled_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's pickles, read with `torch.load(weights_only=True)` (no pickled code runs)."""
    files = pickle_files(folder)
    if not files:
        raise CheckpointError(f"{folder}: no pytorch_model.bin (or pytorch_model.bin.index.json) to convert")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            part = torch.load(folder / name, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError: it holds more than tensors (or is corrupt)
            raise CheckpointError(f"{folder / name}: refused by torch.load(weights_only=True), which loads "
                                  f"tensors only and never runs pickled code: {type(e).__name__}: "
                                  f"{(str(e).strip().splitlines() or [''])[0]}") from None
        if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
            raise CheckpointError(f"{folder / name}: expected a dict of tensors (a state_dict)")
        state.update({k: v.detach().clone().contiguous() for k, v in part.items()})  # no shared storage
    return state


def convert(folder: str | os.PathLike) -> Path:
    """Write FOLDER/model.safetensors from FOLDER/pytorch_model.bin (or its shards); return its path."""
    folder = Path(folder)
    target = folder / "model.safetensors"
    if target.exists():
        raise CheckpointError(f"{target} already exists; nothing to convert")
    _write(read_pickled_state(folder), target)
    return target


def cached_safetensors(folder: Path, cache_dir: str | Path | None = None) -> Path:
    """The safetensors copy of FOLDER's pickled weights in bertino's cache, converted on first use."""
    files = pickle_files(folder)
    target = cache_root(cache_dir) / "converted" / _content_key(folder, files) / "model.safetensors"
    if not target.exists():
        print(f"bertino: {folder} has only pickled weights ({files[0]}); converting them once, safely "
              f"(torch.load weights_only=True), to {target}", file=sys.stderr)
        state = read_pickled_state(folder)  # first: a refused pickle leaves nothing behind in the cache
        target.parent.mkdir(parents=True, exist_ok=True)
        _write(state, target)
    return target


def _content_key(folder: Path, files: list[str]) -> str:
    """sha256 over the pickle files' bytes (and names): the cache entry belongs to exactly this content."""
    digest = hashlib.sha256()
    for name in files:
        digest.update(name.encode("utf-8") + b"\0")
        with (folder / name).open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _write(state: dict[str, torch.Tensor], target: Path) -> None:
    atomic_write_with(target, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
