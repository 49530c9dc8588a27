"""Process pools for the data tools (synth, convert, verify)."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os


def resolve_workers(n: int) -> int:
    """`n` processes, or all cores when n <= 0 (the command-line default)."""
    return n if n > 0 else (os.cpu_count() or 1)


def process_pool(workers: int) -> cf.ProcessPoolExecutor:
    # forkserver: workers start clean even if the parent has threads (progress bar, OpenCV).
    return cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("forkserver"))
