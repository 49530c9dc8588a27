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

Failures name the target: an OS error while creating, writing, syncing or renaming (disk full,
quota, read-only file system, a parent that is a file) is re-raised as an ``OSError`` of the same
errno whose text is ``cannot write TARGET: REASON``, also when a C++ writer (``torch.save``)
turned the write error into its own ``RuntimeError``. :func:`remove_temp_files` is how a command
clears what a killed run of it left in its own output directory.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"
# .NAME.<8 hex>.tmp: what _create_temp makes, and nothing a user would name a file by chance.
_TEMP_RE = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")
# Errors that can only come from writing: relabelled when the writer's own code (or a C++ writer
# that wraps them) raises them without a file name. EIO is not among them: a read can raise it.
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# torch.save's legacy format writes tensors to the file descriptor in C++ and reports a failure
# only as text: RuntimeError("write(): fd 12 failed with No space left on device").
_FD_WRITE_RE = re.compile(r"\bfd \d+ failed with (.+?)\s*$")
_BY_STRERROR = {os.strerror(code): code for code in _WRITE_ERRNOS}


def write_error(exc: OSError, path: str | os.PathLike[str]) -> OSError:
    """`exc` as the error of writing `path`: same errno (so the same OSError subclass), text
    ``cannot write PATH: REASON``. Chain it: ``raise write_error(exc, path) from exc``."""
    return OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}")


def _write_cause(exc: BaseException) -> OSError | None:
    """The write error behind `exc`: itself, or the OSError a wrapping writer (torch.save's
    "unexpected pos" RuntimeError) left as its cause or context; None if there is none."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.filename is None and cur.errno in _WRITE_ERRNOS:
            return cur
        match = _FD_WRITE_RE.search(str(cur)) if isinstance(cur, RuntimeError) else None
        if match and match.group(1) in _BY_STRERROR:
            return OSError(_BY_STRERROR[match.group(1)], match.group(1))
        cur = cur.__cause__ or cur.__context__
    return None


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
        raise write_error(exc, path) from exc


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
        try:
            try:
                yield fh
            except Exception as exc:
                cause = _write_cause(exc)  # the caller's writes hit a full disk (or quota)
                if cause is None:
                    raise
                raise write_error(cause, path) from exc
            try:
                fh.flush()
                if fsync:
                    os.fsync(fh.fileno())
                fh.close()
            except OSError as exc:
                raise write_error(exc, path) from exc
        finally:
            if not fh.closed:  # after an error: closing flushes the buffered rest, which may
                with contextlib.suppress(OSError):  # not fit either; the first error counts
                    fh.close()
        _replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a read-only remount cannot delete it either
            os.unlink(tmp)
        raise
    if fsync:
        _fsync_dir(path.parent)


def _replace(src: Path, dst: Path) -> None:
    """os.replace, its errors naming `dst` (errno-less ones, e.g. a test's, unchanged)."""
    try:
        os.replace(src, dst)
    except OSError as exc:
        if exc.errno is None:
            raise
        raise write_error(exc, dst) from exc


def move_into_place(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Rename the complete file `src` over `dst` (same file system) and make it durable: a
    reader sees the old `dst` or the new one. For files written (with :func:`open_atomic`) to a
    staging place first and published later, all together."""
    src, dst = Path(src), Path(dst)
    _replace(src, dst)
    _fsync_dir(dst.parent)
    if src.parent != dst.parent:
        _fsync_dir(src.parent)


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


def remove_temp_files(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files a killed or failed writer left in `directory` (not below it;
    only names :func:`is_temp_name` accepts: never a user's file). Call it where a command
    starts writing into its own output directory, before any writer of it runs. Returns them."""
    removed = []
    for tmp in temp_files(directory) if Path(directory).is_dir() else []:
        with contextlib.suppress(FileNotFoundError):  # a sibling rank removed it first
            tmp.unlink()
            removed.append(tmp)
            logger.info("removed %s: left by an interrupted write", tmp)
    return removed
