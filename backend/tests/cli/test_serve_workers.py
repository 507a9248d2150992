"""`glisk serve --workers N` (several API processes, one embedded database) and `glisk db check`,
run as an operator runs them: real processes, real signals, a real server's pg_stat_activity."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from glisk.embedded import free_port, password_file, read_password
from glisk.testing import libpq_kwargs
from tests.support.database import Database
from tests.support.processes import (
    GLISK,
    SERVE_START_SECONDS,
    child_pids,
    owned_scratch_dir,
    postmaster_pid,
    postmaster_port,
    serve_env,
    start_serve,
    wait_gone,
    wait_serving,
)

# End to end (processes, tens of seconds each): .ci/run runs them, the default run leaves them out.
pytestmark = pytest.mark.slow

GONE_SECONDS = 15.0


@pytest.fixture
def data_root(tmp_path: Path) -> Iterator[Path]:
    base = owned_scratch_dir(tmp_path, "glisk-serve", Path(os.environ.get("TMPDIR", "/tmp")))
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _api_processes(children: set[int]) -> set[int]:
    # uvicorn's workers are multiprocessing "spawn" children; the parent's other children are
    # postgres and multiprocessing's resource tracker.
    found = set()
    for pid in children:
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.add(pid)
        except OSError:
            continue
    return found


def _serving(process: subprocess.Popen[str], data_dir: Path, port: int) -> set[int]:
    """Wait until /health answers 200 and both API processes run; return every child's pid
    (postgres, the API processes, multiprocessing's resource tracker)."""
    found: set[int] = set()

    def both_api_processes() -> bool:
        nonlocal found
        found = child_pids(process.pid)
        return len(_api_processes(found)) == 2

    wait_serving(
        process,
        port,
        SERVE_START_SECONDS,
        what="glisk serve --workers 2",
        also=both_api_processes,
        poll=0.2,
        timeout=2,
    )
    assert postmaster_pid(data_dir) in found
    return found


def test_serve_with_two_workers_runs_two_api_processes_and_sigterm_stops_them_and_postgres(
    data_root: Path,
) -> None:
    data_dir, port = data_root / "pgdata", free_port()
    process = start_serve(data_dir, port, "--workers", "2", pg_port=free_port())
    try:
        children = _serving(process, data_dir, port)
        for _ in range(20):
            assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        with psycopg.connect(
            host=str(data_dir),  # the socket, in the data directory
            port=postmaster_port(data_dir),
            user="postgres",
            dbname="glisk",
            password=read_password(password_file(data_dir)),
        ) as conn:
            # Sized for both processes: 2 x (200 + 10) + 50.
            assert conn.execute("SHOW max_connections").fetchone() == ("470",)
            names = conn.execute(
                "SELECT DISTINCT application_name FROM pg_stat_activity "
                "WHERE backend_type = 'client backend' AND application_name LIKE 'glisk%'"
            ).fetchall()
            assert ("glisk-api",) in names
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0]
    assert process.returncode == 0, output
    assert "Traceback" not in output
    assert wait_gone(children, GONE_SECONDS) == set(), output


def test_sigkill_of_serve_with_two_workers_leaves_no_api_process_or_postgres_behind(
    data_root: Path,
) -> None:
    data_dir, port = data_root / "pgdata", free_port()
    process = start_serve(data_dir, port, "--workers", "2", pg_port=free_port())
    try:
        children = _serving(process, data_dir, port)
    finally:
        process.kill()
        process.communicate(timeout=10)
    assert wait_gone(children, GONE_SECONDS) == set(), "orphans after SIGKILL"
    with pytest.raises(httpx.ConnectError):  # nobody holds the listening socket any more
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


def _db_check(url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GLISK, "db", "check", *args],
        env=serve_env(DATABASE_URL=url, DB_POOLER="none", **env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_db_check_counts_connections_per_application_name_and_warns_near_the_limit(
    postgres_container: Database,
) -> None:
    url = postgres_container.direct_url or postgres_container.url
    held = [
        psycopg.connect(**libpq_kwargs(url), application_name="glisk-worker")  # type: ignore[arg-type]
        for _ in range(3)
    ]
    try:
        calm = _db_check(url)
        alarmed = _db_check(url, "--warn-at", "0")
    finally:
        for conn in held:
            conn.close()

    assert calm.returncode == 0, calm.stderr
    rows = {line.split()[0]: line.split()[1:] for line in calm.stdout.splitlines()}
    assert rows["glisk-worker"][0] == "3"
    assert rows["glisk-cli"][0] == "1"  # the check's own connection
    [total] = [line for line in calm.stdout.splitlines() if line.startswith("in use ")]
    in_use, usable = int(total.split()[2]), int(total.split()[4])
    assert 4 <= in_use < usable  # ours, plus whatever else the suite holds open
    assert "max_connections" in total
    assert alarmed.returncode == 3
    [warning] = [line for line in alarmed.stderr.splitlines() if line.startswith("warning:")]
    assert "connections in use" in warning


def test_db_check_warns_when_one_api_pool_exceeds_what_the_server_allows(
    postgres_container: Database,
) -> None:
    url = postgres_container.direct_url or postgres_container.url
    with psycopg.connect(**libpq_kwargs(url)) as conn:  # type: ignore[arg-type]
        row = conn.execute("SHOW max_connections").fetchone()
    assert row is not None
    result = _db_check(url, DB_POOL_SIZE=str(int(row[0])))
    assert result.returncode == 3
    assert "one API process may open DB_POOL_SIZE + DB_MAX_OVERFLOW" in result.stderr
