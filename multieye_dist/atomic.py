"""Atomic file writes: the one way this project writes a file.

Every writer goes through :func:`open_atomic` (or :func:`write_bytes` / :func:`write_text` on
top of it): the data goes to a temporary sibling ``.NAME.XXXXXXXX.tmp`` in the target's
directory, is flushed and fsynced, renamed over the target with ``os.replace``, and the directory
is fsynced. A reader, or a job restarted after a crash or a kill, sees the old file or the new
one, never half of one. On any error, ``KeyboardInterrupt`` included, the temporary file is
removed and the old target is left as it was.

The temporary name starts with a dot and ends in ``.tmp``: globs for shards (``*.tar``,
``fundus-train-*.tar``), manifests, checkpoints or exports never match one, and
:func:`temp_files` finds those a killed process left behind.

Permissions are those of a plain ``open(path, "w")``: 0666 minus the umask (0644 under 022, 0664
under 002), not mkstemp's 0600.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

TMP_SUFFIX = ".tmp"
# .NAME.<8 hex>.tmp: what _create_temp makes, and nothing a user would name a file by chance.
_TEMP_RE = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")


def _create_temp(path: Path) -> tuple[int, Path]:
    """Create and open a new temporary sibling of `path` (and its parent directories)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")
            try:
                # The mode is not read from the umask but given to the kernel, which applies the
                # umask (and any default ACL of the directory) exactly as for open(path, "w").
                # Reading the umask would mean os.umask(0) then restoring it: the umask is
                # process-global, so another thread creating a file between the two calls
                # would get a world-writable file; not reading it at all has no such window and
                # follows umask changes made at any time. O_EXCL: never reuse an existing file.
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                continue  # 32 random bits taken: draw again
            return fd, tmp
    except OSError as exc:
        # The error names the target, not only a temporary name the caller never chose.
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror}") from exc


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable. POSIX only (Windows cannot open a directory); file systems that
    refuse to fsync a directory (some network and FUSE ones) raise, and the rename has happened
    already, so that is not an error."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def open_atomic(
    path: str | os.PathLike[str],
    mode: str = "wb",
    *,
    encoding: str = "utf-8",
    fsync: bool = True,
) -> Iterator[IO[Any]]:
    """A new file object (``"wb"``, or ``"w"``: text in `encoding`) whose contents replace
    `path` atomically when the ``with`` block ends without an exception; an exception (any
    BaseException) removes the temporary file and leaves `path` untouched.

    ``fsync=False`` skips both fsyncs: the rename still makes the file appear whole or not at
    all to other processes and after a kill, but not after a power loss. For regenerable
    outputs only (synthetic images), where thousands of fsyncs would dominate the run time.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"open_atomic mode {mode!r}: only 'wb' and 'w' (a new file)")
    path = Path(path)
    fd, tmp = _create_temp(path)
    try:
        try:
            fh = os.fdopen(fd, mode, encoding=None if "b" in mode else encoding)
        except BaseException:
            os.close(fd)
            raise
        with fh:
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if fsync:
        _fsync_dir(path.parent)


def write_bytes(path: str | os.PathLike[str], data: bytes, *, fsync: bool = True) -> Path:
    """Replace `path` with `data` atomically; returns `path` as a Path."""
    with open_atomic(path, "wb", fsync=fsync) as fh:
        fh.write(data)
    return Path(path)


def write_text(
    path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8", fsync: bool = True
) -> Path:
    """Replace `path` with `text` (UTF-8 unless told) atomically; returns `path` as a Path."""
    return write_bytes(path, text.encode(encoding), fsync=fsync)


def is_temp_name(name: str) -> bool:
    """Whether `name` is one of this module's temporary file names."""
    return bool(_TEMP_RE.match(name))


def temp_files(directory: str | os.PathLike[str]) -> list[Path]:
    """The temporary files in `directory` (not below it): in-flight writes, or what a killed
    writer left behind. Only delete them when no writer can be running there."""
    return sorted(p for p in Path(directory).glob(f".*{TMP_SUFFIX}") if is_temp_name(p.name))
