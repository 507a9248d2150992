"""What every benchmark shares: a durable scratch database (glisk.testing's harness on a private
embedded PostgreSQL), one token table to drain, worker processes that start their clock together,
a server waited for until /health answers, and the tables printed. Method: docs/benchmarks.md."""

from __future__ import annotations

import math
import multiprocessing
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glisk.embedded_pg import EmbeddedPostgres, free_port
from glisk.testing import connect, scratch_database

AUTHOR = "00000000-0000-0000-0000-000000000001"
READY_TIMEOUT = 120.0
HTTP = "http://127.0.0.1"  # the only host a benchmark sends requests to
PYCACHE = str(Path(tempfile.gettempdir()) / "glisk-bench-pycache")


@contextmanager
def workdir() -> Iterator[Path]:
    """A fresh directory on disk, removed afterwards, that the unprivileged account the embedded
    server runs as (when we are root) may traverse."""
    base = Path(tempfile.mkdtemp(prefix="glisk-bench-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def database(
    max_connections: int = 100, *, bindir: Path | None = None
) -> Iterator[tuple[EmbeddedPostgres, str]]:
    """A private PostgreSQL with ``glisk serve``'s durable settings (fsync and synchronous_commit
    on, data on disk), and the URL of a migrated scratch database on it."""
    with workdir() as base:
        server = EmbeddedPostgres(base / "data", free_port(), max_connections, bindir=bindir)
        with server, scratch_database(server.url) as url:
            yield server, url


def query(url: str, *statements: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Run ``statements`` on a new autocommit connection; the rows of the last one."""
    rows: list[tuple[Any, ...]] = []
    with connect(url) as conn:
        for statement in statements:
            cursor = conn.execute(statement, params)  # type: ignore[arg-type]
            rows = cursor.fetchall() if cursor.description else []
    return rows


def seed(url: str, tokens: int = 0) -> None:
    """One author and ``tokens`` detected tokens, minted a second apart."""
    with connect(url) as conn:
        conn.execute(
            "INSERT INTO authors (id, wallet_address, prompt_text, created_at) "
            "VALUES (%s, '0x' || repeat('ab', 20), 'a bench prompt', now())",
            (AUTHOR,),
        )
        conn.execute(
            "INSERT INTO tokens_s0 (id, token_id, author_id, minter_address, status, "
            "mint_timestamp, created_at) SELECT gen_random_uuid(), g, %s, '0x' || repeat('cd', 20),"
            " 'detected', timestamp '2025-01-01' + g * interval '1 second', now() "
            "FROM generate_series(1, %s) AS g",
            (AUTHOR, tokens),
        )


def reset(url: str) -> None:
    """Every token back to detected and unclaimed, then VACUUM ANALYZE and a CHECKPOINT, so each
    cell starts alike and no checkpoint lands inside it."""
    query(
        url,
        "UPDATE tokens_s0 SET status = 'detected', claim_id = NULL, lease_expires_at = NULL, "
        "claimed_by = NULL, attempts = 0, deferrals = 0, not_before = NULL, image_path = NULL "
        "WHERE status <> 'detected' OR claimed_by IS NOT NULL",
        "VACUUM ANALYZE tokens_s0",
        "CHECKPOINT",
    )


def server_line(url: str) -> str:
    (row,) = query(
        url,
        "SELECT current_setting('server_version'), current_setting('fsync'), "
        "current_setting('synchronous_commit'), current_setting('max_connections')",
    )
    return "PostgreSQL {}, fsync={}, synchronous_commit={}, max_connections={}".format(*row)


# --- worker processes started together ------------------------------------------------------

Ready = Callable[[], float]


@dataclass(frozen=True)
class Outcome:
    """What one process moved from the common start to its end, and the CPU (user + sys) it
    spent meanwhile."""

    moved: int
    seconds: float
    cpu_seconds: float


@dataclass(frozen=True)
class Cell:
    """The processes of one measurement. A process that moved nothing fails the cell: a cell
    that measured nothing is an error, never a 0 in a table."""

    outcomes: tuple[Outcome, ...]

    def __post_init__(self) -> None:
        if not self.outcomes or any(o.moved <= 0 or o.seconds <= 0 for o in self.outcomes):
            raise RuntimeError(f"a cell measured nothing: {self.outcomes}")

    @property
    def moved(self) -> int:
        return sum(o.moved for o in self.outcomes)

    @property
    def rate(self) -> float:
        return self.moved / max(o.seconds for o in self.outcomes)

    @property
    def cpu_ms(self) -> float:
        """CPU of the processes per item moved, in ms."""
        return 1000 * sum(o.cpu_seconds for o in self.outcomes) / self.moved


def _child(target: Callable[..., Any], args: tuple[Any, ...], barrier: Any, out: Any) -> None:
    marks: list[float] = []

    def ready() -> float:
        barrier.wait(READY_TIMEOUT)
        marks[:] = [time.monotonic(), time.process_time()]
        return marks[0]

    try:
        result = target(*args, ready)
        moved, end = result if isinstance(result, tuple) else (result, time.monotonic())
        if not marks:
            raise RuntimeError(f"{target.__name__} never called ready()")
        out.put(Outcome(moved, end - marks[0], time.process_time() - marks[1]))
    except BaseException:
        barrier.abort()
        out.put(traceback.format_exc())


def run_processes(target: Callable[..., Any], jobs: Sequence[tuple[Any, ...]]) -> Cell:
    """``target(*job, ready)`` in one forkserver process per job. Each connects, then calls
    ``ready()``, which returns (the clock starts) once every process is ready; it returns how
    much it moved, optionally with the ``time.monotonic()`` its work ended."""
    context = multiprocessing.get_context("forkserver")
    # What the target's module imports is imported once, in the forkserver, and then forked.
    found = vars(sys.modules[target.__module__]).values()
    names = {getattr(v, "__module__", None) or getattr(v, "__name__", "") for v in found}
    names &= sys.modules.keys() - {"__main__", target.__module__}
    context.set_forkserver_preload(sorted(names))
    barrier, out = context.Barrier(len(jobs) + 1), context.Queue()
    children = [context.Process(target=_child, args=(target, j, barrier, out)) for j in jobs]
    for child in children:
        child.start()
    with suppress(threading.BrokenBarrierError):  # a child failed: its traceback follows
        barrier.wait(READY_TIMEOUT)
    outcomes: list[Outcome | str] = []
    try:
        outcomes += [out.get(timeout=900) for _ in children]
    except queue.Empty:
        outcomes.append("no result within 900 s")
    for child in children:
        child.join(10)
        child.kill()
    if failed := [o for o in outcomes if isinstance(o, str)]:
        raise RuntimeError("a benchmark process failed:\n" + failed[0])
    return Cell(tuple(o for o in outcomes if isinstance(o, Outcome)))


# --- servers --------------------------------------------------------------------------------


Server = subprocess.Popen[bytes]


def start_server(
    command: Sequence[str], env: dict[str, str], port: int, log: Path
) -> tuple[Server, float]:
    """Start ``command``, a server on 127.0.0.1:``port``, and wait until GET /health answers
    200; the server and the seconds that took. Raises with the end of ``log`` if it exits
    first or takes over a minute."""
    started = time.perf_counter()
    with log.open("ab") as sink:
        server = subprocess.Popen(command, env=env, stdout=sink, stderr=sink)
    health = f"{HTTP}:{port}/health"
    while time.perf_counter() - started < 60 and server.poll() is None:
        with suppress(OSError), urllib.request.urlopen(health, timeout=2) as answer:  # noqa: S310
            if answer.status == 200:
                return server, time.perf_counter() - started
        time.sleep(0.02)
    stop_server(server)
    raise RuntimeError(f"{' '.join(command)} did not serve:\n{log.read_text()[-2000:]}")


def stop_server(server: Server) -> float:
    """SIGTERM; the seconds until the server exited (killed after 30 s)."""
    started = time.perf_counter()
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
    return time.perf_counter() - started


def quiet_env(**extra: str) -> dict[str, str]:
    """This environment for a glisk child process: no developer's .env, DATABASE_URL or APP_ENV,
    logs at WARNING, bytecode cached in PYCACHE whatever PYTHONDONTWRITEBYTECODE says; then
    ``extra``."""
    drop = ("DATABASE_URL", "APP_ENV", "PYTHONDONTWRITEBYTECODE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return (
        env
        | {"GLISK_ENV_FILE": os.devnull, "LOG_LEVEL": "WARNING", "PYTHONPYCACHEPREFIX": PYCACHE}
        | extra
    )


# --- output -----------------------------------------------------------------------------------


def percentile(values: Sequence[float], percent: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(len(ordered) * percent / 100) - 1)]


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} on {os.cpu_count()} cores"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table, first column left-aligned, the others right; then the load average."""
    lines = ["| " + " | ".join(headers) + " |", "|---" + "|---:" * (len(headers) - 1) + "|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines) + f"\n\n({load_line()})"


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
