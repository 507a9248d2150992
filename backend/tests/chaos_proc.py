"""Entry point for worker processes forked by the chaos test (importable by a forkserver)."""

from __future__ import annotations

import os

from glisk.workers import noop
from glisk.workers.worker import hold_stop_signals


def run_noop_worker(argv: list[str], log_path: str) -> None:
    # SIGTERM before the worker is up (nothing claimed yet) is a clean stop: say so from the
    # first instruction on, not only once the worker has installed its handlers.
    hold_stop_signals()
    # stderr to a file per worker, so the test can read what a worker said before it was killed.
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    noop.main(argv)
