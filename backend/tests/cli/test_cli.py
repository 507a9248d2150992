"""`glisk serve` and `glisk db` as an operator runs them: real processes, real signals."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from glisk.embedded import (
    binaries_cache_dir,
    free_port,
    password_file,
    read_password,
    scratch_parent,
)
from glisk.testing import throwaway_database
from tests.support.cli import glisk_in_process
from tests.support.database import Database
from tests.support.processes import (
    GLISK,
    SERVE_START_SECONDS,
    alive,
    owned_scratch_dir,
    postmaster_pid,
    serve_env,
    start_serve,
    wait_gone,
    wait_serving,
)

# A bound that is a promise (serve comes up), not a speed: generous for a loaded 2-core machine,
# where importing the app and a first initdb alone have taken 15 s.


@pytest.fixture
def data_root(tmp_path: Path) -> Iterator[Path]:
    # In RAM when there is room: this server's data is durable (fsync on), which on a busy disk
    # costs seconds in initdb, every commit, and deleting the files afterwards.
    base = owned_scratch_dir(tmp_path, "glisk-cli", scratch_parent())
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _main_in_process(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *argv: str, **env: str
) -> tuple[int, str, str]:
    return glisk_in_process(monkeypatch, capsys, *argv, **env)


@pytest.mark.slow
def test_serve_keeps_data_across_restarts_and_stops_postgres_on_sigterm_and_on_sigkill(
    data_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # One data directory, two runs: the first ends with SIGTERM (a clean exit), the second with
    # SIGKILL (nothing runs in glisk serve then; the kernel's parent-death signal stops postgres).
    data_dir, pg_port, http_port = data_root / "pgdata", free_port(), free_port()

    first = start_serve(data_dir, http_port, pg_port=pg_port)
    try:
        wait_serving(first, http_port, SERVE_START_SECONDS)
        postgres = postmaster_pid(data_dir)
        secret = read_password(password_file(data_dir))
        assert secret is not None
        # `glisk db url` prints the full URL (for tools) while serve runs; nothing else gets in.
        code, out, _ = _main_in_process(
            monkeypatch,
            capsys,
            "db",
            "url",
            GLISK_PG_DATA=str(data_dir),
            GLISK_PG_PORT=str(pg_port),
        )
        assert code == 0
        assert out.startswith(f"postgresql://postgres:{secret}@/glisk?host=")
        assert "require_auth=scram-sha-256" in out
        with pytest.raises(psycopg.OperationalError, match="no password supplied"):
            psycopg.connect(host=str(data_dir), port=pg_port, user="postgres", dbname="glisk")
        with psycopg.connect(out.strip(), autocommit=True) as c:
            # The pool (200 + 10 by default) plus headroom for migrations, psql and workers.
            assert c.execute("show max_connections").fetchone() == ("260",)
            assert c.execute("show fsync").fetchone() == ("on",)  # the app's data is durable
            c.execute(
                "INSERT INTO system_state (key, state_value, updated_at) "
                "VALUES ('last_processed_block', '41', now())"
            )
    finally:
        first.send_signal(signal.SIGTERM)
        output = first.communicate(timeout=20)[0]
    assert first.returncode == 0, repr(output)
    assert f"http://127.0.0.1:{http_port}" in output
    assert str(data_dir) in output
    assert f"password in {password_file(data_dir)}" in output
    assert f"postgresql+psycopg://postgres:***@/glisk?host={data_dir}&port={pg_port}" in output
    assert secret not in output
    assert not wait_gone([postgres], 10), "postgres still running after glisk serve exited"

    second = start_serve(data_dir, http_port, pg_port=pg_port)
    try:
        wait_serving(second, http_port, SERVE_START_SECONDS)
        assert read_password(password_file(data_dir)) == secret
        with psycopg.connect(out.strip()) as c:
            assert c.execute("SELECT state_value FROM system_state").fetchone() == (41,)
        postgres = postmaster_pid(data_dir)
        assert alive(postgres)
    finally:
        second.kill()
        second.communicate(timeout=10)
    assert second.returncode == -signal.SIGKILL
    assert not wait_gone([postgres], 15), "orphaned postgres after SIGKILL of glisk serve"


def test_db_commands_work_against_an_existing_server(
    postgres_container: Database,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with throwaway_database(postgres_container.url) as url:

        def glisk(*args: str) -> tuple[int, str, str]:
            return _main_in_process(monkeypatch, capsys, "db", *args, DATABASE_URL=url)

        assert glisk("current")[1].startswith("base (empty)")
        assert glisk("upgrade")[0] == 0
        assert "(up to date)" in glisk("current")[1]
        assert glisk("downgrade", "base")[0] == 0
        assert glisk("current")[1].startswith("base (empty)")


def test_db_commands_report_an_unreachable_database_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"postgresql+psycopg://glisk:hunter2@127.0.0.1:{free_port()}/glisk"
    code, _, err = _main_in_process(monkeypatch, capsys, "db", "upgrade", DATABASE_URL=url)
    assert code == 1
    assert err.startswith(
        "error: Cannot connect to the database at postgresql+psycopg://glisk:***@"
    )
    assert "hunter2" not in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"DB_POOL_SIZE": "lots"}, "DB_POOL_SIZE: Input should be a valid integer"),
        (
            {"DATABASE_URL": "mysql://x@y/z"},
            "DATABASE_URL: must use the postgresql+psycopg:// scheme",
        ),
        ({"APP_ENV": "production"}, "DATABASE_URL is required when APP_ENV=production"),
        ({"PORT": "70000"}, "PORT: Input should be less than or equal to 65535"),
    ],
)
def test_bad_configuration_exits_2_with_one_message_naming_the_variable(
    env: dict[str, str],
    expected: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = _main_in_process(monkeypatch, capsys, "serve", **env)
    assert code == 2
    assert expected in err
    assert "Traceback" not in err


def test_a_failing_migration_is_one_line_naming_the_database(
    postgres_container: Database,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = _main_in_process(
        monkeypatch,
        capsys,
        "db",
        "downgrade",
        "no_such_revision",
        DATABASE_URL=postgres_container.url,
    )
    assert code == 1
    assert err.startswith("error: Migrations failed on postgresql+psycopg://")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_db_url_prints_the_libpq_form_of_database_url(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = "postgresql+psycopg://glisk:s%40cret@db.example:5432/glisk?sslmode=require"
    code, out, _ = _main_in_process(monkeypatch, capsys, "db", "url", DATABASE_URL=url)
    assert (code, out) == (
        0,
        "postgresql://glisk:s%40cret@db.example:5432/glisk?channel_binding=require"
        "&require_auth=scram-sha-256&sslmode=require\n",
    )


def test_db_url_before_the_embedded_server_ever_started_says_how_to_start_it(
    data_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _main_in_process(
        monkeypatch, capsys, "db", "url", GLISK_PG_DATA=str(data_root / "pgdata")
    )
    assert (code, out) == (1, "")
    assert err.startswith(f"error: No embedded PostgreSQL password at {data_root}/pgdata.password")
    assert "glisk serve" in err
    assert not (data_root / "pgdata").exists(), "db url must start nothing"


# --- bad input: one line naming the option or variable and its rule, never a traceback --------


def _refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *argv: str, **env: str
) -> tuple[int, str]:
    """(exit code, stderr) of ``glisk ARGV`` in this process, argparse's refusals included (an
    exception escaping main() fails the test with its traceback, as it would reach a user)."""
    try:
        code, _, err = glisk_in_process(monkeypatch, capsys, *argv, **env)
    except SystemExit as exc:
        code, err = int(exc.code or 0), capsys.readouterr().err
    return code, err


@pytest.mark.parametrize(
    ("argv", "env", "code", "expected"),
    [
        (
            ("tokens", "retry", "--since", "0001-01-01T00:00+01:00"),
            {},
            2,
            "--since: must be a time from year 1 to 9999 in UTC",
        ),
        # $'\xff' on a command line, as Python decodes it (surrogateescape).
        (("tokens", "retry", "--reason", "\udcff"), {}, 2, "--reason: must be text (UTF-8)"),
        (
            ("db", "current"),
            {"DATABASE_URL": "postgresql://u:p@h:notaport/db", "APP_ENV": "production"},
            2,
            "DATABASE_URL: the port must be a number from 1 to 65535 (got 'notaport')",
        ),
        (
            ("db", "current"),
            {"DATABASE_URL": "postgresql://u:p@h:notaport/db"},
            2,
            "DATABASE_URL: the port must be a number from 1 to 65535 (got 'notaport')",
        ),
        (
            ("db", "current"),
            {"GLISK_PG_DATA": "/etc/passwd/x"},
            1,
            "/etc/passwd is not a directory",
        ),
        (
            ("serve", "--port", "99999"),
            {},
            2,
            "argument --port: must be a port number from 1 to 65535 (got '99999')",
        ),
        (
            ("worker", "image", "--handler", "noop", "--metrics-port", "99999"),
            {},
            2,
            "argument --metrics-port: must be a port number from 1 to 65535",
        ),
        (
            ("worker", "image", "--handler", "noop", "--lease", "inf"),
            {},
            2,
            "argument --lease: must be a number from more than 0 to 86400 (got 'inf')",
        ),
        (
            ("worker", "image", "--handler", "noop", "--lease", "1e300"),
            {},
            2,
            "argument --lease: must be a number from more than 0 to 86400 (got '1e300')",
        ),
        (
            ("db", "check", "--warn-at", "nan"),
            {},
            2,
            "argument --warn-at: must be a percentage from 0 to 100 (got 'nan')",
        ),
    ],
)
def test_bad_input_is_refused_in_one_line_naming_it_before_anything_starts(
    argv: tuple[str, ...],
    env: dict[str, str],
    code: int,
    expected: str,
    data_root: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = {"GLISK_PG_DATA": str(data_root / "pgdata"), **env}
    got, err = _refused(monkeypatch, capsys, *argv, **env)
    assert got == code, err
    assert expected in err
    assert err.count("\n") == 1, err  # one line, no traceback
    assert not (data_root / "pgdata").exists(), "started the embedded server anyway"


def test_a_relative_data_directory_is_refused_before_any_directory_is_made(
    data_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(data_root)
    code, err = _refused(monkeypatch, capsys, "db", "current", GLISK_PG_DATA="relative/dir")
    assert code == 2
    assert "GLISK_PG_DATA: must be an absolute path (got 'relative/dir')" in err
    assert err.count("\n") == 1
    assert list(data_root.iterdir()) == []


def test_a_bindir_without_postgresql_is_refused_in_one_line_and_nothing_is_copied(
    data_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # What GLISK_PG_BINDIR=/nonexistent made root copy: a bin/ and lib/ that are not PostgreSQL.
    fake = data_root / "not-postgres"
    (fake / "bin").mkdir(parents=True)
    (fake / "lib").mkdir()
    (fake / "lib" / "big.so").write_bytes(b"\0" * 4096)
    (fake / "bin" / "psql").write_text("#!/bin/sh\n")
    code, err = _refused(monkeypatch, capsys, "db", "current", GLISK_PG_BINDIR=str(fake / "bin"))
    assert code == 2, err
    assert f"GLISK_PG_BINDIR: {fake / 'bin'} holds no PostgreSQL server binaries" in err
    assert err.count("\n") == 1
    assert not binaries_cache_dir(fake / "bin").exists()


def test_a_metrics_port_in_use_is_one_line(postgres_container: Database) -> None:
    with socket.socket() as blocker:
        blocker.bind(("", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        # A real process: the worker takes over the signals of whatever runs it.
        result = subprocess.run(
            [*GLISK, "worker", "image", "--handler", "noop", "--metrics-port", str(port)],
            env=serve_env(DATABASE_URL=postgres_container.url, DB_POOLER=postgres_container.pooler),
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
    assert result.returncode == 1, result.stderr
    assert f"--metrics-port {port}: cannot listen on it" in result.stderr
    assert "Traceback" not in result.stderr
