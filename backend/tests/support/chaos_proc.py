"""Entry point for worker processes forked by the chaos test (importable by a forkserver)."""

from __future__ import annotations

from glisk.workers import noop
from glisk.workers.worker import hold_stop_signals
from tests.support.processes import stderr_to


def run_noop_worker(argv: list[str], log_path: str) -> None:
    # SIGTERM before the worker is up (nothing claimed yet) is a clean stop: say so from the
    # first instruction on, not only once the worker has installed its handlers.
    hold_stop_signals()
    # stderr to a file per worker, so the test can read what a worker said before it was killed.
    stderr_to(log_path, quiet_stdout=True)
    noop.main(argv)
