"""The preemption flag of cluster.TrainTask: its signal handler only records the signal, and the
log line comes when the training loop polls the flag, never from inside the handler."""

from __future__ import annotations

import logging
import os
import signal
import time

from multieye_dist.train.signals import StopFlag


def test_signal_handler_only_sets_the_flag_and_the_poll_logs_once(caplog):
    flag = StopFlag()
    assert flag() is False
    previous = signal.signal(signal.SIGUSR2, flag.set)
    try:
        with caplog.at_level(logging.DEBUG, logger="multieye_dist.cluster.submit"):
            os.kill(os.getpid(), signal.SIGUSR2)  # a real signal, through the installed handler
            deadline = time.monotonic() + 5
            while flag.signum is None and time.monotonic() < deadline:
                time.sleep(0.001)  # Python runs the handler at the next bytecode boundary
            assert flag.signum == signal.SIGUSR2
            assert caplog.records == []  # the handler itself logged nothing
            assert flag() is True  # the training loop's poll
            assert [r.getMessage() for r in caplog.records] == [
                "caught SIGUSR2: saving at the next step, then requeueing"
            ]
            assert caplog.records[0].levelno == logging.WARNING
            assert flag() is True and flag() is True
            assert len(caplog.records) == 1  # logged once, not at every step
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_handler_logs_nothing_even_when_called_directly(caplog):
    flag = StopFlag()
    with caplog.at_level(logging.DEBUG):
        flag.set(signal.SIGUSR2, None)
        flag.set(signal.SIGUSR2, None)  # a second signal before the poll
    assert caplog.records == []
    with caplog.at_level(logging.DEBUG):
        assert flag()
    assert len(caplog.records) == 1
