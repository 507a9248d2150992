"""Processes the tests start and watch: glisk commands in a clean environment, ``glisk serve``
until it answers /health, processes (and their children) until they are gone, worker processes
stopped at the end of a test, and the entry points' stderr in a log file."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import httpx

from glisk.core import processes as core_processes

GLISK = (sys.executable, "-m", "glisk.cli")  # this interpreter's glisk, whatever is on PATH
# How long a test waits for `glisk serve` (or the container entrypoint) to answer /health: a hang
# guard, not a speed. It starts in seconds, but far slower while a loaded 2-core machine also runs
# other suites, and a slow start is no failure.
SERVE_START_SECONDS = 90.0


def glisk_env(*drop: str, **extra: str) -> dict[str, str]:
    """This process's environment for a glisk child: without DATABASE_URL, APP_ENV and every
    variable named in ``drop`` (``NAME*``: every one starting with NAME), with GLISK_ENV_FILE
    empty (a developer's own .env must not leak into the test), then ``extra``."""
    names = {"DATABASE_URL", "APP_ENV", *(name for name in drop if not name.endswith("*"))}
    prefixes = tuple(name[:-1] for name in drop if name.endswith("*"))
    env = {k: v for k, v in os.environ.items() if k not in names and not k.startswith(prefixes)}
    env["GLISK_ENV_FILE"] = os.devnull
    env.update(extra)
    return env


def serve_env(**extra: str) -> dict[str, str]:
    """The environment of ``glisk serve`` and ``glisk db`` in the CLI tests: on its own embedded
    server or the DATABASE_URL given, directly (no pooler, no LISTEN setting), quiet. Each API
    process checks its database at start-up within DB_CONNECT_TIMEOUT: given room here, since a
    process importing the app on a loaded 2-core machine can take longer than the 5 s default."""
    extra = {"DB_CONNECT_TIMEOUT": "60", **extra}
    return glisk_env("DB_POOLER", "WORKER_LISTEN", LOG_LEVEL="WARNING", **extra)


def start_serve(data_dir: Path, http_port: int, *args: str, pg_port: int) -> subprocess.Popen[str]:
    """``glisk serve ARGS`` on 127.0.0.1:``http_port``, its embedded server's data in ``data_dir``
    on ``pg_port``; stdout and stderr together in ``stdout``."""
    return subprocess.Popen(
        [*GLISK, "serve", "--host", "127.0.0.1", "--port", str(http_port), *args],
        env=serve_env(GLISK_PG_DATA=str(data_dir), GLISK_PG_PORT=str(pg_port)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def owned_scratch_dir(tmp_path: Path, name: str, parent: Path) -> Path:
    """A fresh directory ``parent/name-PID-TEST`` that, as root, the unprivileged account the
    embedded server runs as can traverse (``tmp_path`` cannot: it is private)."""
    base = parent / f"{name}-{os.getpid()}-{tmp_path.name}"
    base.mkdir(mode=0o755)
    return base


def postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "postmaster.pid").read_text().splitlines()[0])


def postmaster_port(data_dir: Path) -> int:
    return int((data_dir / "postmaster.pid").read_text().splitlines()[3])


def health_status(port: int, timeout: float = 2.0) -> int | None:
    """Status of GET http://127.0.0.1:PORT/health, or None while nothing answers."""
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=timeout).status_code
    except httpx.HTTPError:
        return None


def wait_serving(
    process: subprocess.Popen[Any],
    port: int,
    seconds: float,
    *,
    what: str = "the server",
    also: Callable[[], bool] = lambda: True,
    poll: float = 0.05,
    timeout: float = 1.0,
    output: Callable[[], str] | None = None,
) -> float:
    """Wait until /health on ``port`` answers 200 and ``also()`` holds; return the seconds that
    took. Fails at once, with what the process said (``output()``, or its stdout), if it exits;
    after ``seconds``, stops it (SIGTERM) and fails with what it said."""
    started = time.monotonic()
    status = None
    while time.monotonic() - started < seconds:
        if process.poll() is not None:
            said = output() if output else process.stdout.read() if process.stdout else ""
            raise AssertionError(f"{what} exited with {process.returncode}:\n{said}")
        status = health_status(port, timeout)
        if status == 200 and also():
            return time.monotonic() - started
        time.sleep(poll)
    if output is not None:
        said = output()
    elif process.stdout is not None:  # what it said before it hung: stop it, then read it all
        process.terminate()
        try:
            said = str(process.communicate(timeout=30)[0])
        except subprocess.TimeoutExpired:
            said = "(no output: it did not stop within 30 s of SIGTERM)"
    else:
        said = ""
    raise AssertionError(f"{what}: /health answered {status} after {seconds:.0f} s\n{said}")


def child_pids(pid: int) -> set[int]:
    """The processes whose parent is ``pid``, now."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


def wait_gone(pids: Iterable[int], seconds: float = 15.0) -> set[int]:
    """Wait up to ``seconds`` for every process of ``pids`` to exit; those still alive."""
    pids = set(pids)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(alive(pid) for pid in pids):
            return set()
        time.sleep(0.1)
    return {pid for pid in pids if alive(pid)}


def stop_all(processes: Sequence[BaseProcess], seconds: float = 15.0) -> None:
    """SIGTERM every process (a worker drains), SIGKILL those still running ``seconds`` later."""
    core_processes.stop_all(processes, seconds)


def stderr_to(log_path: str, *, quiet_stdout: bool = False) -> None:
    """In a child process: stderr appended to ``log_path`` (what the test reads once the child was
    killed), stdout to /dev/null when ``quiet_stdout``."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    if quiet_stdout:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
