"""What ``glisk serve`` and the commands do around their embedded PostgreSQL, as an operator and
an attacker meet it: a process holding the port never receives the password (nor does a server
at DATABASE_URL that asks for it in clear), and a postmaster that dies under serve is restarted,
or serve exits non-zero when it cannot be. Real processes, real signals; the port thief runs as
another local account when we are root."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from glisk.api.health import DatabaseProbe
from glisk.core.config import load_settings
from glisk.core.database import psycopg_connect_kwargs
from glisk.embedded import free_port
from tests.support.accounts import SYSTEM_PYTHON, as_account, throwaway_account
from tests.support.fake_pg import PortThief, fake_server_command
from tests.support.processes import (
    GLISK,
    alive,
    health_status,
    owned_scratch_dir,
    postmaster_pid,
    serve_env,
    start_serve,
    wait_gone,
    wait_serving,
)

# End to end (processes, tens of seconds each): .ci/run runs them, the default run leaves them out.
pytestmark = pytest.mark.slow

START_SECONDS = 60.0
# How long a restart may take on a loaded machine: a promise, asserted with a wide margin.
BACK_WITHIN_SECONDS = 60.0


@pytest.fixture
def data_root(tmp_path: Path) -> Iterator[Path]:
    base = owned_scratch_dir(tmp_path, "glisk-sup", Path(os.environ.get("TMPDIR", "/tmp")))
    yield base
    shutil.rmtree(base, ignore_errors=True)


@contextmanager
def port_thief(port: int) -> Iterator[PortThief]:
    """The stand-in that asks for passwords in clear, on 127.0.0.1:``port``: as a throwaway
    local account when we are root, as ourselves otherwise. Binding may wait for the port."""
    if os.geteuid() == 0 and SYSTEM_PYTHON.exists():
        with throwaway_account() as other:
            thief = PortThief(as_account(other, fake_server_command(str(SYSTEM_PYTHON), port)))
            try:
                yield thief
            finally:
                thief.stop()
        return
    thief = PortThief(fake_server_command(sys.executable, port))
    try:
        yield thief
    finally:
        thief.stop()


def _glisk(*argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GLISK, *argv], env=serve_env(**env), capture_output=True, text=True, timeout=90
    )


def _stop(serve: subprocess.Popen[str]) -> str:
    if serve.poll() is None:
        serve.send_signal(signal.SIGTERM)
    return serve.communicate(timeout=60)[0]


def _wait_restarted(
    serve: subprocess.Popen[str], data_dir: Path, http_port: int, old: int
) -> int | None:
    """Wait until /health answers 200 on a new postmaster: its pid, or None if that did not
    happen within BACK_WITHIN_SECONDS (or serve exited)."""
    deadline = time.monotonic() + BACK_WITHIN_SECONDS
    while time.monotonic() < deadline and serve.poll() is None:
        try:
            pid = postmaster_pid(data_dir)
        except (OSError, ValueError, IndexError):
            pid = old
        if pid != old and alive(pid) and health_status(http_port) == 200:
            return pid
        time.sleep(0.2)
    return None


def test_a_process_holding_the_port_first_gets_nothing_from_serve_its_probe_or_the_commands(
    data_root: Path,
) -> None:
    data_dir, pg_port, http_port = data_root / "pgdata", free_port(), free_port()
    with port_thief(pg_port) as thief:
        thief.wait_listening()
        serve = start_serve(data_dir, http_port, pg_port=pg_port)
        try:
            wait_serving(serve, http_port, START_SECONDS)
            for _ in range(5):
                assert health_status(http_port) == 200
            env = {"GLISK_PG_DATA": str(data_dir), "GLISK_PG_PORT": str(pg_port)}
            # Commands while serve runs use its server (on its socket), not the port.
            for argv in (("status", "--json"), ("db", "psql", "-c", "SELECT 1")):
                result = _glisk(*argv, **env)
                assert result.returncode == 0, (argv, result.stderr)
        finally:
            output = _stop(serve)
        assert serve.returncode == 0, output
    assert thief.passwords() == []
    assert "connection" not in thief.lines, "something of glisk's connected to the port"


def test_serve_restarts_a_killed_postmaster_and_a_thief_waiting_for_the_port_gets_nothing(
    data_root: Path,
) -> None:
    data_dir, pg_port, http_port = data_root / "pgdata", free_port(), free_port()
    serve = start_serve(data_dir, http_port, pg_port=pg_port)
    try:
        wait_serving(serve, http_port, START_SECONDS)
        first = postmaster_pid(data_dir)
        os.kill(first, signal.SIGKILL)
        # An attacker grabs the port the moment it is free, and asks for the password in clear.
        with port_thief(pg_port) as thief:
            thief.wait_listening()
            second = _wait_restarted(serve, data_dir, http_port, first)
            healthy = [health_status(http_port) for _ in range(5)]
        assert thief.passwords() == [], "the API's probe gave the password to the port's holder"
        assert second is not None, f"/health did not come back within {BACK_WITHIN_SECONDS} s"
        assert healthy == [200] * 5
    finally:
        output = _stop(serve)
    assert serve.returncode == 0, output
    assert "restarting it" in output
    assert not wait_gone([second], 15), "the restarted postgres outlived glisk serve"


def test_serve_exits_non_zero_when_its_postmaster_dies_and_cannot_be_restarted(
    data_root: Path,
) -> None:
    data_dir, http_port = data_root / "pgdata", free_port()
    serve = start_serve(data_dir, http_port, pg_port=free_port())
    try:
        wait_serving(serve, http_port, START_SECONDS)
        pid = postmaster_pid(data_dir)
        # A cluster that cannot start again: its control file is gone.
        (data_dir / "global" / "pg_control").rename(data_dir / "pg_control.moved")
        os.kill(pid, signal.SIGKILL)
        output = serve.communicate(timeout=110)[0]
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.communicate()
    assert serve.returncode == 1, output
    assert "could not be restarted" in output
    assert "Traceback" not in output


def test_no_command_sends_the_password_to_a_server_that_asks_for_it_in_clear() -> None:
    port, secret = free_port(), "not-for-a-thief-7d1e"
    url = f"postgresql://glisk:{secret}@127.0.0.1:{port}/glisk"
    with port_thief(port) as thief:
        thief.wait_listening()
        results = {
            argv: _glisk(*argv, DATABASE_URL=url)
            # Each of glisk's ways to connect: SQLAlchemy's engine (every command's start-up
            # check, the API's pool), the worker runtime's psycopg connections, psql.
            for argv in (
                ("db", "current"),
                ("db", "psql", "-c", "SELECT 1"),
                ("worker", "image", "--handler", "noop"),
                ("serve", "--host", "127.0.0.1", "--port", str(free_port())),
            )
        }
        assert "connection" in thief.lines  # they did knock
    assert thief.passwords() == []
    for argv, result in results.items():
        assert result.returncode != 0, argv
        assert "scram-sha-256" in result.stderr, (argv, result.stderr)
        assert secret not in result.stderr


async def test_the_health_probe_never_sends_the_password_in_clear() -> None:
    port, secret = free_port(), "not-for-a-thief-probe"
    settings = load_settings(os.devnull, database_url=f"postgresql://u:{secret}@127.0.0.1:{port}/d")
    assert settings.database_url is not None
    with port_thief(port) as thief:
        thief.wait_listening()
        probe = DatabaseProbe(psycopg_connect_kwargs(settings.database_url))
        try:
            with pytest.raises(Exception, match="scram-sha-256"):
                await probe.check(within=10)
        finally:
            await probe.aclose()
    assert thief.passwords() == []
