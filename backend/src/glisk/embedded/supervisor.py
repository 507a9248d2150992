"""Restarting an embedded server that dies under the process that started it (``glisk serve``,
``glisk worker``), or reporting that it cannot be.

``EmbeddedPostgres.supervise()`` starts a ``Supervisor`` on the server's ``LaunchedProcess``: the
process, and the lock that ``start()``, ``stop()`` and a restart hold, so a stop never races a
restart. This module knows nothing else of the server: it is handed a way to start it again.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from glisk.errors import EmbeddedPostgresError

# After a crash the supervisor retries a start that fails because the dead server is not quite
# gone (its backends still hold its shared memory, its lock files) for this long, then gives up.
RESTART_WINDOW_SECONDS = 20.0
# What postgres says when a start failed for that reason; any other failure is not retried.
NOT_GONE_YET = ("pre-existing shared memory block", "lock file", "Address already in use")


def exit_status(code: int) -> str:
    """How a process ended, in words: ``exit code 1``, ``killed by SIGKILL``."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


@dataclass
class LaunchedProcess:
    """The server process an ``EmbeddedPostgres`` launched (None when there is none), whether a
    stop has begun, and the lock held by ``start()``, ``stop()`` and a restart."""

    process: subprocess.Popen[bytes] | None = None
    stopping: bool = False
    lock: threading.RLock = field(default_factory=threading.RLock)


def relaunch_patiently(launch: Callable[[], None]) -> None:
    """``launch()``, retried for up to ``RESTART_WINDOW_SECONDS`` while it fails because the dead
    server is not gone yet (``NOT_GONE_YET``); any other EmbeddedPostgresError, or the last one,
    is raised."""
    deadline = time.monotonic() + RESTART_WINDOW_SECONDS
    while True:
        try:
            launch()
            return
        except EmbeddedPostgresError as exc:
            transient = any(marker in str(exc) for marker in NOT_GONE_YET)
            if not transient or time.monotonic() >= deadline:
                raise
        time.sleep(0.5)


@dataclass
class Supervisor:
    """Watches ``launched`` from a daemon thread (``start()``) until the server is stopped: when
    it exits on its own, ``relaunch()`` starts it again (as it was first started, setting
    ``launched.process``) and ``say`` is told. When it cannot be restarted, or dies more than
    ``max_restarts`` times within ``period`` seconds, ``on_failure`` is called once with one line
    and the thread ends."""

    launched: LaunchedProcess
    relaunch: Callable[[], None]
    data_dir: Path
    log_file: Path | None
    on_failure: Callable[[str], None]
    say: Callable[[str], None]
    max_restarts: int
    period: float

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._watch, name="glisk-embedded-postgres", daemon=True)
        thread.start()
        return thread

    def _watch(self) -> None:
        restarts: list[float] = []
        launched = self.launched
        while True:
            with launched.lock:
                process = launched.process
            if process is None:
                return
            code = process.wait()
            failure = None
            with launched.lock:
                if launched.stopping or launched.process is not process:
                    return
                launched.process = None
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < self.period]
                if len(restarts) >= self.max_restarts:
                    failure = (
                        f"died {len(restarts) + 1} times within {self.period:.0f} s (last: "
                        f"{exit_status(code)}); giving up"
                    )
                else:
                    restarts.append(now)
                    self.say(f"The embedded PostgreSQL exited ({exit_status(code)}); restarting it")
                    try:
                        relaunch_patiently(self.relaunch)
                    except EmbeddedPostgresError:
                        failure = (
                            f"exited ({exit_status(code)}) and could not be restarted "
                            f"(see {self.log_file})"
                        )
            if failure is not None:
                self.on_failure(f"The embedded PostgreSQL in {self.data_dir} {failure}")
                return
            back = launched.process
            self.say(f"The embedded PostgreSQL is back (pid {back.pid if back else None})")
