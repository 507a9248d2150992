"""Entry point for worker processes forked by the chaos test (importable by a forkserver)."""

from __future__ import annotations

import os

from glisk.workers import noop


def run_noop_worker(argv: list[str], log_path: str) -> None:
    # stderr to a file per worker, so the test can read what a worker said before it was killed.
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    noop.main(argv)
