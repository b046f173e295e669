"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Temporary files and folders are created private (``tempfile`` uses mode 0600/0700) and given the usual permissions
(0666/0777 minus the umask) before they are renamed into place, so results are readable like any other file.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from pathlib import Path
from typing import Iterator


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back (read once per process)
    os.umask(mask)
    return mask


def publish_mode(path: str | os.PathLike) -> None:
    """Give a temporary file or folder the permissions a normally created one would have."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~_umask())


def temp_dir(final: str | os.PathLike, suffix: str = ".tmp") -> Path:
    """A new empty folder beside ``final`` (same file system, so ``os.replace`` onto ``final`` is atomic)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=suffix, dir=final.parent))
    publish_mode(folder)
    return folder


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it is published and renamed over ``path``,
    on any error it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        publish_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file in the same folder, flush it to disk, then rename it over ``path``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def replace_folder(tmp: str | os.PathLike, out: str | os.PathLike) -> None:
    """Put the finished folder ``tmp`` (made by ``temp_dir(out)``) at ``out``. An existing ``out`` is first moved
    aside into a hidden sibling and deleted after the swap, so ``out`` is never half-written (it is missing only
    between two renames). When a rename fails, the previous ``out`` is put back and no hidden folder is left."""
    import shutil

    tmp, out = Path(tmp), Path(out)
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    try:
        os.replace(out, old / "model")
    except BaseException:
        shutil.rmtree(old, ignore_errors=True)  # still empty
        raise
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old / "model", out)  # the previous folder back where it was
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def safetensors_os_errors() -> Iterator[None]:
    """Inside, a write that safetensors' ``save_file`` fails for the system's reason (a full disk, a quota, a file
    system gone read-only) raises that reason as an ``OSError`` (errno and strerror, no file name), as Python's own
    writes do, so the callers' ``except OSError`` give one line and remove their temporary folder. safetensors
    reports it only as a ``SafetensorError`` (an ``Exception``) whose message ends '... (os error 28)': without this
    the CLI printed a traceback. Any other error passes unchanged."""
    import errno
    import re

    try:
        yield
    except OSError:
        raise
    except Exception as error:
        found = re.search(r"I/O error: .*\(os error (\d+)\)", str(error))
        if type(error).__name__ != "SafetensorError" or found is None or int(found.group(1)) not in errno.errorcode:
            raise
        number = int(found.group(1))
        raise OSError(number, os.strerror(number)) from None


def backslash_hint(given: str | os.PathLike) -> str:
    """'; did you mean a/b? ...' when the path ``given`` holds Windows separators (``runs\\mine``, from a config file
    written on Windows) and the path with '/' in their place exists, else ''. On Linux and macOS a backslash is part
    of a file name, so such a path was "not found" (a model's was even told to be downloaded) without saying why."""
    text = os.fspath(given)
    if os.sep == "\\" or "\\" not in text:
        return ""
    fixed = text.replace("\\", "/")
    if not os.path.exists(os.path.expanduser(fixed)):
        return ""
    return f"; did you mean {fixed}? (a '\\' is part of a file name here, not a folder separator: write '/')"


def broken_link(path: str | os.PathLike) -> str:
    """'a link to T, which does not exist' (or '..., a loop of links') when ``path`` is a symbolic link that leads
    nowhere, else ''. Such a path reads as missing, and as a folder it exists all the same (mkdir: 'File exists')."""
    import errno

    if not os.path.islink(path):
        return ""
    try:
        os.stat(path)
    except OSError as error:
        target = os.readlink(path)
        return f"a link to {target}, {'a loop of links' if error.errno == errno.ELOOP else 'which does not exist'}"
    return ""
