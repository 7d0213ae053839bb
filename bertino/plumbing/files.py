"""Reading and writing files: one JSON reader, one JSON-lines reader, one atomic write, one atomic folder commit.

* Every read error names the file, and for text formats the line (`FILE:LINE: ...`, as compilers do), so a user
  can open the file at the spot. A UTF-8 byte-order mark is accepted wherever text is read.
* Every write is atomic: the data goes to a temp file next to its final place, is fsync'ed, and is renamed over
  the final name (atomic on one file system), then the folder is fsync'ed. A reader sees the old file or the whole
  new one, never half of it, even after `kill -9` or a power cut. Folders (checkpoints, final/, best/, unpacked
  wheels) are published the same way with `publish_dir`.
"""

from __future__ import annotations

import gzip
import json
import hashlib
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import BertinoError, CheckpointError, DataError


# ------------------------------------------------------------------------------------------------ reading
def read_json(path: str | os.PathLike, error: type[BertinoError] = CheckpointError,
              object_pairs_hook: Callable | None = None) -> Any:
    """One JSON document (`.gz`: gzipped); any problem is an `error` naming the file (and the line and column)."""
    path = Path(path)
    try:
        with open_maybe_gzip(path) as f:
            text = f.read().decode("utf-8-sig")
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except (OSError, EOFError, zlib.error) as e:
        raise error(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text, object_pairs_hook=object_pairs_hook)
    except json.JSONDecodeError as e:
        raise error(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None


def open_maybe_gzip(path: Path):
    """A binary reader of `path`, decompressing a `.gz` name."""
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (line number, row) for each non-blank line of a JSON-lines file (`.gz`: gzipped).

    Every problem is a DataError: `FILE:LINE: ...` for a bad line, `FILE: ...` for an unreadable file.
    """
    for line_no, row, problem in read_jsonl_lines(path):
        if problem is not None:
            raise DataError(f"{path}:{line_no}: {problem[1]}")
        yield line_no, row


def read_jsonl_lines(path: str | os.PathLike) -> Iterator[tuple[int, dict | None, tuple[str, str] | None]]:
    """Yield (line number, row, None) for each non-blank line that holds a JSON object, and (line number, None,
    (reason, message)) for one that does not — so a caller can count and report every bad line, not only the
    first. reason: "not UTF-8 text", "invalid JSON" or "not a JSON object"; the message says more.

    An unreadable file (missing, not gzip, truncated) is a DataError naming it.
    """
    path = Path(path)
    decode = json.JSONDecoder().decode  # what json.loads(str) calls, without its per-call overhead
    try:
        with open_maybe_gzip(path) as f:
            for line_no, raw in enumerate(f, start=1):  # bytes, so a bad byte is reported with its line
                if not raw.strip():
                    continue  # blank lines (e.g. a trailing newline) are not rows
                try:
                    text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
                    row = decode(text)
                except json.JSONDecodeError as e:
                    # past the line's own newline (an object cut short): the column just after its last character
                    column = e.colno if e.lineno == 1 else len(text.rstrip("\r\n")) + 1
                    yield line_no, None, ("invalid JSON", f"invalid JSON: {e.msg} (column {column})")
                    continue
                except UnicodeDecodeError as e:
                    yield line_no, None, ("not UTF-8 text", f"not UTF-8 text ({e.reason})")
                    continue
                if not isinstance(row, dict):
                    yield line_no, None, ("not a JSON object",
                                          f"expected a JSON object, found {type(row).__name__} {short(row)}")
                    continue
                yield line_no, row, None
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, EOFError, zlib.error) as e:  # unreadable, not gzip, truncated gzip
        raise DataError(f"{path}: cannot read: {type(e).__name__}: {e}") from None


def sha256_file(path: str | os.PathLike, digest=None):
    """Feed the bytes of `path` into `digest` (a new sha256 when None), 1 MiB at a time; returns the digest."""
    digest = hashlib.sha256() if digest is None else digest
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest


def short(value: Any, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters, for messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------------ writing
def atomic_write_with(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """`write(tmp)` writes the content to a temp path beside `path`; it is fsync'ed and renamed to `path`."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        _fsync_file(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; the file should read like any other
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write `data` (str: UTF-8) to `path` atomically. A `.gz` name is gzipped with mtime 0 and no file name in
    the header, so the same data always gives the same bytes."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if str(path).lower().endswith(".gz"):
        with tempfile.SpooledTemporaryFile() as buf:
            with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz:
                gz.write(raw)
            buf.seek(0)
            raw = buf.read()
    atomic_write_with(path, lambda tmp: tmp.write_bytes(raw))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Pretty JSON, atomically."""
    atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_failure(error: BaseException) -> str | None:
    """Why a write failed, if `error` is a failed write (a full disk, a quota, a file size limit), else None.

    Libraries report it their own way: OSError (ENOSPC, EFBIG, EDQUOT), torch.save's RuntimeError from its zip
    writer ("inline_container", "PytorchStreamWriter"), safetensors' SafetensorError ("I/O error: ...")."""
    text = str(error)
    if isinstance(error, OSError):
        return error.strerror or text
    if type(error).__name__ == "SafetensorError" and "I/O error" in text:
        return text.split("I/O error:", 1)[1].strip()
    if isinstance(error, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text):
        return "the file could not be written in full"
    return None


def publish_dir(tmp: Path, final: Path, replace: bool = True) -> None:
    """Publish the folder `tmp` as `final` with a rename, after flushing every file in it to disk.

    `replace`: an existing `final` (best/, final/) is replaced — through `.old-NAME`, which `restore_half_replaced`
    puts back if a run is killed between the two renames. Without `replace`, an existing `final` wins (another
    process published the same thing first) and `tmp` is removed.
    """
    fsync_tree(tmp)
    if final.exists() and not replace:
        shutil.rmtree(tmp, ignore_errors=True)
        return
    if final.exists():
        old = final.parent / f".old-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)  # killed between these two renames: `restore_half_replaced` puts `.old-X` back
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        try:
            os.replace(tmp, final)
        except OSError:
            if replace or not final.is_dir():  # not a lost race with another process publishing the same folder
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(final.parent)


def restore_half_replaced(folder: Path) -> None:
    """Remove temp files/folders a killed writer left in `folder` (`.tmp-*`); put back a folder killed between
    the two renames of `publish_dir` (`.old-X` without `X`)."""
    for p in folder.iterdir():
        if p.name.startswith(".tmp-"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        elif p.name.startswith(".old-"):
            final = folder / p.name[len(".old-"):]
            if final.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.replace(p, final)


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder` to disk (a killed process keeps its page cache; a pre-empted
    machine may not)."""
    for root, _, files in os.walk(folder):
        for name in files:
            _fsync_file(Path(root) / name)
        fsync_dir(Path(root))


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
