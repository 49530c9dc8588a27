"""Stop signals: a flag the training loop polls, set by SIGUSR2 (Slurm's warning before a time
limit or preemption) or by SIGTERM and SIGINT (``multieye-dist train``), and the exit that
follows a clean checkpoint. The cluster layer installs the SIGUSR2 handler for its jobs
(:class:`multieye_dist.cluster.submit.TrainTask`); the loop installs the other two itself.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger(__name__)


class Interrupted(SystemExit):
    """A stop signal ended the run: after a clean checkpoint (exit status 128 + the signal: 143
    for SIGTERM, 130 for SIGINT) or aborted by a second SIGINT (130, nothing saved since the
    last checkpoint). A SystemExit: every caller (the CLI, the demo's stages) unwinds and the
    process exits with that status, without a traceback."""


class StopFlag:
    """Set by a stop signal's handler, polled by the training loop (``stop_requested``).

    SIGUSR2 (Slurm's warning before a time limit or preemption): save at the next step, then
    requeue (:class:`TrainTask`). SIGTERM and SIGINT (``multieye-dist train``,
    :func:`handle_stop_signals`): save at the next step, then exit. A second SIGINT (Ctrl-C
    again) aborts at once: the handler raises KeyboardInterrupt, as Python's own does, and
    restores the default action, so that a third one kills outright even a process stuck in a
    call that does not return to Python. (torchrun starts its workers in sessions of their own
    and forwards a signal once: a worker never gets one Ctrl-C twice.)
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._reported = False

    def set(self, signum: int, frame: Any) -> None:
        # The signal handler: it only records the signal. Python runs it in the main thread
        # between two bytecodes of whatever that thread was doing, possibly inside logging's
        # own emit with the handler lock held and a stream half written: logging from here
        # could re-enter that stream or wait on a lock this thread's interrupted code holds.
        if signum == signal.SIGINT and self.signum is not None:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum

    @property
    def name(self) -> str | None:
        if self.signum is None:
            return None
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return str(self.signum)

    def __call__(self) -> bool:
        # Outside the handler: the log line is emitted here, once, when the loop first sees it.
        if self.signum is not None and not self._reported:
            self._reported = True
            if self.signum == signal.SIGUSR2:
                logger.warning("caught SIGUSR2: saving at the next step, then requeueing")
            else:
                logger.warning(
                    "caught %s: saving a checkpoint at the next step, then exiting "
                    "(Ctrl-C again to abort without saving)",
                    self.name,
                )
        return self.signum is not None


@contextmanager
def handle_stop_signals(
    flag: StopFlag, signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)
) -> Iterator[StopFlag]:
    """Route `signums` to `flag` for the duration (the previous handlers come back after).
    Only the main thread may install handlers: elsewhere (a thread running a job) the signals
    keep their handlers and `flag` is never set."""
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.signal(s, flag.set) for s in signums}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
