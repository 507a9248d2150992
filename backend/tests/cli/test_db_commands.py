"""``glisk db psql`` (psql without the password on any command line) and ``glisk db downgrade``
(says what it drops; data goes only with --yes, and in production only with --force too), on a
real PostgreSQL."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from glisk.core.config import PLACEHOLDER_SECRETS
from glisk.embedded import free_port, password_file, read_password, scratch_parent
from glisk.migrations import head_revision
from glisk.testing import libpq_kwargs, throwaway_database
from tests.support.cli import glisk_in_process
from tests.support.database import Database
from tests.support.processes import GLISK, owned_scratch_dir, serve_env

# psql's own command line and environment, as its shell escape sees them.
SHOW_PSQL = r"\! tr '\0' ' ' < /proc/$PPID/cmdline; echo; tr '\0' '\n' < /proc/$PPID/environ"


@pytest.fixture
def data_root(tmp_path: Path) -> Iterator[Path]:
    base = owned_scratch_dir(tmp_path, "glisk-db", scratch_parent())
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _psql(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GLISK, "db", "psql", *args],
        env=serve_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.slow
def test_db_psql_opens_psql_on_the_embedded_server_without_the_password_on_its_command_line(
    data_root: Path,
) -> None:
    data_dir = data_root / "pgdata"
    env = {"GLISK_PG_DATA": str(data_dir), "GLISK_PG_PORT": str(free_port())}
    result = _psql("-At", "-c", "SELECT current_database(), 40 + 2", "-c", SHOW_PSQL, **env)
    secret = read_password(password_file(data_dir))
    assert result.returncode == 0, result.stderr
    assert secret is not None and secret not in result.stdout + result.stderr
    answer, command_line, *environment = result.stdout.splitlines()
    assert answer == "glisk|42"
    assert "psql --dbname" in command_line and "require_auth=scram-sha-256" in command_line
    assert f"host={data_dir}" in command_line  # the private socket, not TCP
    assert not any(line.startswith("PGPASSWORD=") for line in environment)
    assert any(line.startswith("PGPASSFILE=/dev/fd/") for line in environment)
    failed = _psql("-c", "SELECT 1/0", **env)
    assert failed.returncode == 1  # psql's own exit code
    assert "division by zero" in failed.stderr


@pytest.mark.slow
def test_db_psql_on_database_url_keeps_its_password_off_the_command_line(
    postgres_container: Database,
) -> None:
    url = postgres_container.direct_url or postgres_container.url
    result = _psql("-At", "-c", "SELECT 42", "-c", SHOW_PSQL, DATABASE_URL=url)
    assert result.returncode == 0, result.stderr
    answer, command_line, *_ = result.stdout.splitlines()
    assert answer == "42"
    password = make_url(url).password
    if password:
        assert str(password) not in command_line


# --- downgrade -----------------------------------------------------------------------------


def _server(database: Database) -> str:
    return database.direct_url or database.url


def _insert_a_row(url: str) -> None:
    with psycopg.connect(**libpq_kwargs(url), autocommit=True) as conn:  # type: ignore[arg-type]
        conn.execute(
            "INSERT INTO system_state (key, state_value, updated_at) "
            "VALUES ('last_processed_block', '41', now())"
        )


def test_a_downgrade_that_drops_data_says_what_goes_and_needs_yes(
    postgres_container: Database,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with throwaway_database(_server(postgres_container)) as url:

        def glisk(*args: str) -> tuple[int, str, str]:
            return glisk_in_process(monkeypatch, capsys, "db", *args, DATABASE_URL=url)

        assert glisk("upgrade")[0] == 0
        _insert_a_row(url)

        code, _, err = glisk("downgrade", "base")
        assert code == 2
        assert f"Downgrading from {head_revision()} to base drops " in err
        assert "table system_state (1 rows)" in err and "table tokens_s0 (0 rows)" in err
        assert "run it again with --yes" in err
        assert "(up to date)" in glisk("current")[1], "the refused downgrade changed something"

        code, _, err = glisk("downgrade", "base", "--yes")
        assert code == 0, err
        assert glisk("current")[1].startswith("base (empty)")


def test_a_downgrade_that_drops_only_empty_columns_goes_ahead_and_says_so(
    postgres_container: Database,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with throwaway_database(_server(postgres_container)) as url:

        def glisk(*args: str) -> tuple[int, str, str]:
            return glisk_in_process(monkeypatch, capsys, "db", *args, DATABASE_URL=url)

        assert glisk("upgrade", "0006")[0] == 0
        code, _, err = glisk("downgrade", "-1")  # 0006 adds mint_events.quantity
        assert code == 0, err
        assert "drops column mint_events.quantity (0 values)" in err
        assert "0005" in glisk("current")[1]


def test_in_production_a_downgrade_that_drops_tables_is_refused_unless_forced(
    postgres_container: Database,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    password = make_url(_server(postgres_container)).password
    if password is None or str(password).lower() in PLACEHOLDER_SECRETS:
        pytest.skip("APP_ENV=production needs a DATABASE_URL with a real password")
    with throwaway_database(_server(postgres_container)) as url:

        def glisk(*args: str) -> tuple[int, str, str]:
            return glisk_in_process(
                monkeypatch, capsys, "db", *args, DATABASE_URL=url, APP_ENV="production"
            )

        assert glisk("upgrade")[0] == 0
        code, _, err = glisk("downgrade", "base", "--yes")  # empty tables: tables all the same
        assert code == 2
        assert "APP_ENV=production: refusing a downgrade that drops tables" in err
        assert "(up to date)" in glisk("current")[1]

        code, _, err = glisk("downgrade", "base", "--yes", "--force")
        assert code == 0, err
        assert glisk("current")[1].startswith("base (empty)")
