"""What every benchmark shares: a durable scratch database (glisk.testing's, on a private server),
the tokens the workers drain, processes that start their clock together, servers waited for until
/health answers, and the tables printed."""

from __future__ import annotations

import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import text

from glisk.core import processes
from glisk.core.database import engine_of, setup_db_session
from glisk.embedded import EmbeddedPostgres, free_port
from glisk.testing import connect, scratch_database
from glisk.uow import create_uow_factory

AUTHOR = "00000000-0000-0000-0000-000000000001"
HTTP = "http://127.0.0.1"  # the only host a benchmark sends requests to
PYCACHE = str(Path(tempfile.gettempdir()) / "glisk-bench-pycache")
Ready = Callable[[], float]


@contextmanager
def database(connections: int = 100, bindir: Path | None = None) -> Iterator[tuple[Any, str]]:
    """A private PostgreSQL as ``glisk serve`` runs it (durable) and a migrated scratch database."""
    base = Path(tempfile.mkdtemp(prefix="glisk-bench-"))
    base.chmod(0o755)  # as root, the server runs as an unprivileged account that must reach it
    try:
        server = EmbeddedPostgres(base / "data", free_port(), connections, bindir=bindir)
        with server, scratch_database(server.url) as url:
            say(server_line(url))
            yield server, url
    finally:
        shutil.rmtree(base, ignore_errors=True)


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
    query(
        url,
        "WITH author AS (INSERT INTO authors (id, wallet_address, prompt_text, created_at) VALUES "
        "(%s, '0x' || repeat('ab', 20), 'a bench prompt', now()) RETURNING id) INSERT INTO "
        "tokens_s0 (id, token_id, author_id, minter_address, status, mint_timestamp, created_at) "
        "SELECT gen_random_uuid(), g, author.id, '0x' || repeat('cd', 20), 'detected', timestamp "
        "'2025-01-01' + g * interval '1 second', now() FROM author, generate_series(1, %s) AS g",
        params=[AUTHOR, tokens],
    )


def reset(url: str) -> None:
    """Tokens back to detected and unclaimed; VACUUM ANALYZE and a CHECKPOINT (none in a cell)."""
    query(
        url,
        "UPDATE tokens_s0 SET status = 'detected', claim_id = NULL, lease_expires_at = NULL, "
        "claimed_by = NULL, attempts = 0, deferrals = 0, not_before = NULL, image_path = NULL "
        "WHERE status <> 'detected' OR claimed_by IS NOT NULL",
        "VACUUM ANALYZE tokens_s0",
        "CHECKPOINT",
    )


def server_line(url: str) -> str:
    names = ("server_version", "fsync", "synchronous_commit", "max_connections")
    (row,) = query(url, "SELECT " + ", ".join(f"current_setting('{name}')" for name in names))
    return "PostgreSQL {}, fsync={}, synchronous_commit={}, max_connections={}".format(*row)


# --- processes started together ---------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """Per process: what it moved, its seconds from the common start, its CPU seconds."""

    moved: tuple[int, ...]
    seconds: tuple[float, ...]
    cpu: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.moved or min(self.moved) <= 0 or min(self.seconds) <= 0:
            raise RuntimeError(f"a cell measured nothing: {self}")

    @property
    def rate(self) -> float:
        return sum(self.moved) / max(self.seconds)

    @property
    def cpu_ms(self) -> float:
        return 1000 * sum(self.cpu) / sum(self.moved)


def _child(target: Callable[..., Any], args: tuple[Any, ...], barrier: Any, out: Any) -> None:
    marks: list[float] = []

    def ready() -> float:
        barrier.wait(120)
        marks[:] = [time.monotonic(), time.process_time()]
        return marks[0]

    try:
        result = target(*args, ready)
        moved, end = result if isinstance(result, tuple) else (result, time.monotonic())
        if not marks:
            raise RuntimeError(f"{target.__name__} never called ready()")
        out.put((moved, end - marks[0], time.process_time() - marks[1]))
    except BaseException:
        barrier.abort()
        out.put(traceback.format_exc())


def run_processes(target: Callable[..., Any], jobs: Sequence[tuple[Any, ...]]) -> Cell:
    """``target(*job, ready)`` in a forked process per job; ``ready()`` returns, and the clock
    starts, once every process is ready. A target returns what it moved (and when it ended)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([target.__module__])
    barrier, out = context.Barrier(len(jobs) + 1), context.Queue()
    job = {"target": _child, "daemon": True}
    children = [context.Process(args=(target, j, barrier, out), **job) for j in jobs]
    for child in children:
        child.start()
    with suppress(threading.BrokenBarrierError):  # a child failed: its traceback follows
        barrier.wait(120)
    outcomes = [out.get(timeout=900) for _ in children]  # daemons: killed if this raises
    for child in children:
        child.join(10)
    if failed := [o for o in outcomes if isinstance(o, str)]:
        raise RuntimeError("a benchmark process failed:\n" + failed[0])
    return Cell(*zip(*outcomes, strict=True))


async def until(url: str, seconds: float, ready: Ready, step: Callable[..., Awaitable[int]]) -> int:
    """``step(uow, moved so far)``, each in a unit of work, for ``seconds`` or until it moves 0."""
    factory = setup_db_session(url, pool_size=1, max_overflow=0)
    uow_factory, done = create_uow_factory(factory), 0
    async with uow_factory() as uow:
        await uow.session.execute(text("SELECT 1"))
    end = ready() + seconds
    while time.monotonic() < end:
        async with uow_factory() as uow:
            moved = await step(uow, done)
        if not moved:
            break
        done += moved
    await engine_of(factory).dispose()
    return done


# --- servers and output -----------------------------------------------------------------------


def quiet_env(**extra: str) -> dict[str, str]:
    """The environment of a glisk child: no .env, DATABASE_URL or APP_ENV; logs at WARNING;
    bytecode cached in PYCACHE whatever PYTHONDONTWRITEBYTECODE says."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "APP_ENV")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env |= {"GLISK_ENV_FILE": os.devnull, "LOG_LEVEL": "WARNING", "PYTHONPYCACHEPREFIX": PYCACHE}
    return env | extra


def start_server(command: list[str], env: dict, port: int, log: Path) -> tuple[Any, float]:
    """Start a server on 127.0.0.1:``port``; the seconds until GET /health answered 200."""
    started = time.perf_counter()
    with log.open("ab") as sink:
        server = subprocess.Popen(command, env=env, stdout=sink, stderr=sink)
    while time.perf_counter() - started < 60 and server.poll() is None:
        with suppress(OSError), urllib.request.urlopen(f"{HTTP}:{port}/health", timeout=2) as r:  # noqa: S310
            if r.status == 200:
                return server, time.perf_counter() - started
        time.sleep(0.02)
    stop_server(server)
    raise RuntimeError(f"{' '.join(command)} did not serve:\n{log.read_text()[-2000:]}")


def stop_server(server: subprocess.Popen[bytes]) -> float:
    """SIGTERM; the seconds until the server exited (killed after 30 s)."""
    started = time.perf_counter()
    processes.stop(server, 30)
    return time.perf_counter() - started


def percentile(values: Sequence[float], percent: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(len(ordered) * percent / 100) - 1)]


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (first column left-aligned), then the load average."""
    lines = ["| " + " | ".join(headers) + " |", "|---" + "|---:" * (len(headers) - 1) + "|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return "\n".join(lines) + f"\n\n(load average {load} on {os.cpu_count()} cores)"


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
