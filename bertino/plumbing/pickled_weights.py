"""Pickled weights (`pytorch_model.bin`, or its shards) → safetensors, without running pickled code.

bertino loads weights only from safetensors (weights.py). A checkpoint that ships only a pickle — `indigo-ai/BERTino`,
the card's base model, is one — is read with `torch.load(weights_only=True)`: torch's restricted unpickler accepts
tensors and plain containers only, and refuses, before anything runs, a pickle that names any other callable (the
way a malicious pickle runs code). The tensors are written unchanged (copied apart where a checkpoint ties two
names to one storage, which safetensors does not allow), atomically, in one of two places:

* `cached_safetensors(folder)`, what loading does on its own (through `load_pickled_weights`):
  `<bertino cache>/converted/<sha256>/model.safetensors`, keyed by the pickle's content, with a one-line notice
  the first time. Not next to the pickle: a hub snapshot is the hub client's (its files are links into its blob
  store, and a write there would make the snapshot differ from the repo), and a read-only model folder must load
  too. The key is the content (every pickle file's name and bytes), so an edited pickle is converted again, two
  models never share an entry, and a second load reads the cache without unpickling anything.
* `convert(folder)`, the explicit `python -m bertino.convert FOLDER`: FOLDER/model.safetensors, next to the pickle.

A cache entry is a folder published whole (written as `.tmp-<sha256>.<host>.<pid>/`, then renamed), holding the
safetensors file and `entry.json`, its size and sha256. Every load checks both: an entry that does not match (a
damaged disk, a truncated copy, an edited file) is deleted and converted again, with a notice. The temp folders a
killed conversion leaves are deleted by the next load (a dead process's on this host; elsewhere, after a day). A
cache that cannot be written (read-only, no permission, `BERTINO_CACHE` pointing at a file) is no error: the
weights are converted in memory, with a notice naming `BERTINO_CACHE`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from .files import atomic_write_with, publish_dir, sha256_file, write_failure
from .model_folder import missing_file, shard_files
from .sources import cache_root

ENTRY = "entry.json"  # {"size": bytes, "sha256": hex} of the entry's model.safetensors
STALE_SECONDS = 24 * 3600  # a temp folder of another host is a killed conversion's after this long
_TEMP = re.compile(r"\.tmp-[0-9a-f]{64}\.(.+)\.(\d+)")  # .tmp-KEY.HOST.PID: a conversion being written


def pickle_files(folder: Path) -> list[str]:
    """The pickled weight files of a folder: its shards by the index, or `pytorch_model.bin`; [] when none."""
    index = folder / "pytorch_model.bin.index.json"
    if index.exists():
        return shard_files(index)
    return ["pytorch_model.bin"] if (folder / "pytorch_model.bin").exists() else []


def read_pickled_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's pickles, read with `torch.load(weights_only=True)` (no pickled code runs)."""
    files = pickle_files(folder)
    if not files:
        raise CheckpointError(f"{folder}: no pytorch_model.bin (or pytorch_model.bin.index.json) to convert"
                              + (f"; {missing_file(folder / 'pytorch_model.bin')}"
                                 if (folder / "pytorch_model.bin").is_symlink() else ""))
    state: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            part = torch.load(folder / name, map_location="cpu", weights_only=True)
        except OSError as e:  # unreadable, not refused: say so, not that torch.load refused it
            raise CheckpointError(f"{folder / name}: cannot read: {e.strerror or e}") from None
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
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    target = folder / "model.safetensors"
    if target.exists():
        raise CheckpointError(f"{target} already exists; nothing to convert")
    state = read_pickled_state(folder)
    try:
        _write(state, target)
    except Exception as e:
        reason = write_failure(e)
        if reason is None:
            raise
        raise CheckpointError(f"cannot write {target}: {reason} (a read-only model folder loads as it is: bertino "
                              f"converts its pickle into its own cache, $BERTINO_CACHE)") from None
    return target


def load_pickled_weights(folder: Path, cache_dir: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The tensors of FOLDER's pickled weights, through bertino's cache; converted in memory, with a notice, when
    the cache cannot be written."""
    try:
        return _load_entry(cached_safetensors(folder, cache_dir))
    except CacheNotWritable as e:
        print(f"bertino: cannot write bertino's cache ({e}): converting {folder}'s pickled weights in memory, "
              f"safely (torch.load weights_only=True), on every load; set BERTINO_CACHE to a writable folder to "
              f"convert them once", file=sys.stderr)
        return e.state if e.state is not None else read_pickled_state(folder)


class CacheNotWritable(Exception):
    """The conversion cache cannot be written (its message: where, and why); `state`: the tensors, when they were
    already read (a write failed after the pickle was read: no need to read it twice)."""

    def __init__(self, message: str, state: dict[str, torch.Tensor] | None = None):
        super().__init__(message)
        self.state = state


def cached_safetensors(folder: Path, cache_dir: str | Path | None = None) -> Path:
    """The safetensors copy of FOLDER's pickled weights in bertino's cache, converted on first use (and again
    when the entry is damaged). Raises `CacheNotWritable` when it would have to write and cannot."""
    files = pickle_files(folder)
    converted = cache_root(cache_dir) / "converted"
    entry = converted / _content_key(folder, files)
    target = entry / "model.safetensors"
    _remove_stale_temp_folders(converted)
    if entry.is_dir():
        problem = _entry_problem(entry)
        if problem is None:
            return target
        print(f"bertino: the cached conversion {entry} is damaged ({problem}): converting again", file=sys.stderr)
        try:
            shutil.rmtree(entry)
        except OSError as e:
            raise CacheNotWritable(f"cannot delete the damaged {entry}: {e.strerror or e}") from None
    where = f" (BERTINO_CACHE={os.environ['BERTINO_CACHE']})" if cache_dir is None and "BERTINO_CACHE" in os.environ \
        else ""
    tmp = converted / f".tmp-{entry.name}.{socket.gethostname()}.{os.getpid()}"
    try:  # before the pickle is read: an unwritable cache is known at once
        tmp.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CacheNotWritable(f"{converted}{where}: {e.strerror or e}") from None
    print(f"bertino: {folder} has only pickled weights ({files[0]}); converting them once, safely "
          f"(torch.load weights_only=True), to {target}", file=sys.stderr)
    try:
        state = read_pickled_state(folder)  # a refused pickle leaves nothing behind in the cache
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        _write(state, tmp / "model.safetensors")
        (tmp / ENTRY).write_text(json.dumps(_describe(tmp / "model.safetensors")) + "\n", encoding="utf-8")
        publish_dir(tmp, entry, replace=False)  # another process that published it first wins: the same bytes
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = e.strerror if isinstance(e, OSError) else write_failure(e)
        if reason is None and not isinstance(e, OSError):
            raise
        raise CacheNotWritable(f"{converted}{where}: {reason or e}", state) from None
    return target


def _entry_problem(entry: Path) -> str | None:
    """What is wrong with a cache entry, or None: its file against the size and sha256 in its entry.json."""
    target, record = entry / "model.safetensors", entry / ENTRY
    if not target.is_file():
        return "no model.safetensors"
    try:
        want = json.loads(record.read_text(encoding="utf-8"))
        size, digest = int(want["size"]), str(want["sha256"])
    except FileNotFoundError:
        return f"no {ENTRY}: written by an earlier bertino, which did not record a checksum"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{record} is unreadable: {type(e).__name__}"
    found = target.stat().st_size
    if found != size:
        return f"model.safetensors has {found} bytes, {ENTRY} says {size}"
    if sha256_file(target).hexdigest() != digest:
        return f"model.safetensors does not match the sha256 in {ENTRY}"
    return None


def _load_entry(target: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(target))
    except Exception as e:  # checked a moment ago: only a change since then gets here
        raise CheckpointError(f"{target}: cannot read this cached conversion ({type(e).__name__}: {e}); delete "
                              f"{target.parent} and load again to convert once more") from None


def _describe(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": sha256_file(path).hexdigest()}


def _remove_stale_temp_folders(converted: Path) -> None:
    """Delete what killed conversions left: `.tmp-KEY.HOST.PID/` of a dead process on this host, or older than
    STALE_SECONDS; and, in entries, the temp files of the single-file writes of earlier versions."""
    if not converted.is_dir():
        return
    host, now = socket.gethostname(), time.time()
    leftovers = list(converted.glob(".tmp-*")) + [p for p in converted.glob("*/.tmp-*")
                                                  if not p.parent.name.startswith(".tmp-")]
    for path in leftovers:
        try:
            age = now - path.stat().st_mtime
        except OSError:
            continue  # gone meanwhile: published or removed by its writer
        writer = _TEMP.fullmatch(path.name) if path.parent == converted else None
        dead = writer is not None and writer.group(1) == host and not _alive(int(writer.group(2)))
        if dead or age > STALE_SECONDS:
            try:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            except OSError:
                pass  # removed meanwhile, or a cache we cannot write: nothing of ours to clean


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, under another user
        return True
    return True


def _content_key(folder: Path, files: list[str]) -> str:
    """sha256 over the pickle files' bytes (and names): the cache entry belongs to exactly this content."""
    digest = hashlib.sha256()
    for name in files:
        digest.update(name.encode("utf-8") + b"\0")
        sha256_file(folder / name, digest)
    return digest.hexdigest()


def _write(state: dict[str, torch.Tensor], target: Path) -> None:
    atomic_write_with(target, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
