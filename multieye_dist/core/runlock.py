"""The run directory's lock: one training at a time writes a run directory.

Rank 0 of the job that trains into ``<train.out_dir>`` holds ``<train.out_dir>/train.lock`` with
``flock`` (the other ranks of the job never take it), and writes into it who holds it: host, PID,
Slurm job, since when, the command. A second training into the same directory is refused with
that record. The kernel drops a flock when its process dies, however it dies (``kill -9``
included), so a lock file left behind by a dead process is not held: the next training takes it
over with a warning naming the old holder (and whether its PID is gone from this host). On a file
system that has no flock (some parallel file systems are mounted without it) nothing can be
locked: the training goes on with a warning saying that a concurrent one would not be detected.

The lock is released (the file removed) when the training ends, normally, with an error or
after a stop signal; :func:`holder` lets the Slurm launchers refuse to queue a job into a run
directory a training is using, without creating anything there.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LOCK_FILE = "train.lock"
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunLocked(ValueError):
    """Another live training holds the run directory (a usage error: the CLI exits 2)."""


def _record() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "since": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": " ".join(sys.argv)[:300],
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def describe(record: dict[str, Any] | None) -> str:
    """``host H, pid P, Slurm job J, since T`` (what is known of a holder)."""
    if not record:
        return "a holder that has not written its record yet"
    parts = [f"host {record.get('host')}", f"pid {record.get('pid')}"]
    if record.get("slurm_job"):
        parts.append(f"Slurm job {record['slurm_job']}")
    parts.append(f"since {record.get('since')}")
    return ", ".join(parts)


def _read(fd: int) -> dict[str, Any] | None:
    raw = os.pread(fd, 65536, 0)
    try:
        record = json.loads(raw.decode("utf-8")) if raw.strip() else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None  # being written, or not ours: nothing to name
    return record if isinstance(record, dict) else None


def _refusal(path: Path, record: dict[str, Any] | None) -> RunLocked:
    return RunLocked(
        f"{path.parent} is in use: another training holds {path} ({describe(record)}); wait for "
        "it or stop it, or choose another train.out_dir"
    )


class RunLock:
    """A held lock (rank 0 of a training); :meth:`release` when the training ends."""

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path, self._fd = path, fd

    def release(self) -> None:
        """Remove the lock file, then drop the flock (in that order: a waiting process that
        gets the flock of the removed file sees that it is not the path's file and retries)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None
            logger.debug("released %s", self.path)


class NoLock(RunLock):
    """What ranks other than 0 hold, and rank 0 where the file system cannot lock."""

    def __init__(self) -> None:
        super().__init__(Path(), None)


def _try_flock(fd: int, path: Path, op: int) -> bool | None:
    """True: locked; False: held by another; None: the file system cannot flock."""
    try:
        fcntl.flock(fd, op | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in _NO_FLOCK:
            return None
        raise OSError(exc.errno, f"cannot lock {path}: {exc.strerror}") from None
    return True


def acquire(run_dir: str | os.PathLike[str]) -> RunLock:
    """Take ``run_dir/train.lock`` (creating ``run_dir``) or raise :class:`RunLocked` naming the
    live holder. A lock file whose holder is gone is taken over with a warning."""
    path = Path(run_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):  # retried only when a holder removed the file while we opened it
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            got = _try_flock(fd, path, fcntl.LOCK_EX)
            if got is None:
                os.close(fd)
                logger.warning(
                    "%s: this file system cannot lock files (flock): a second training into "
                    "%s at the same time would not be detected",
                    path,
                    path.parent,
                )
                return NoLock()
            if not got:
                raise _refusal(path, _read(fd))
            if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    else:  # pragma: no cover - a lock file replaced 100 times in a row
        raise RunLocked(f"{path}: could not lock it (it keeps being replaced)")
    try:
        _take_over(path, _read(fd))
        data = json.dumps(_record()).encode("utf-8")
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    logger.debug("locked %s", path)
    return RunLock(path, fd)


def _take_over(path: Path, old: dict[str, Any] | None) -> None:
    """A record in a file nobody holds is a stale lock: say whose it was."""
    if old is None:
        return
    why = "that process no longer holds it"
    if old.get("host") == socket.gethostname() and isinstance(old.get("pid"), int):
        if not _pid_alive(old["pid"]):
            why = f"no process {old['pid']} on this host"
    logger.warning("%s: taking over a stale lock of %s (%s)", path, describe(old), why)


def holder(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The record of the live training holding ``run_dir``'s lock, else None. Creates nothing
    (a shared lock on the existing file, dropped at once)."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        if _try_flock(fd, path, fcntl.LOCK_SH) is not False:
            return None  # free (a stale file), or a file system without flock
        return _read(fd) or {}
    finally:
        os.close(fd)


def check_free(run_dir: str | os.PathLike[str]) -> None:
    """Raise :class:`RunLocked` if a live training holds ``run_dir`` (for the launchers)."""
    path = Path(run_dir) / LOCK_FILE
    record = holder(run_dir)
    if record is not None:
        raise _refusal(path, record or None)
