"""Deployment files: .env.example, docker-compose.yml, .dockerignore and the container entrypoint.

The entrypoint is run for real, outside a container: against a fresh database on the test server
it must apply the migrations, serve /health, and stop cleanly on SIGTERM (what `docker stop`
sends). Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from sqlalchemy.engine import make_url

from glisk import migrations
from glisk.core.config import BACKEND_DIR, Settings
from glisk.embedded import free_port
from glisk.testing import connect, throwaway_database
from tests.support.database import Database
from tests.support.processes import SERVE_START_SECONDS, health_status, wait_serving

REPO_ROOT = BACKEND_DIR.parent
ENV_EXAMPLE = REPO_ROOT / ".env.example"
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
ENTRYPOINT = BACKEND_DIR / "docker" / "entrypoint.sh"
DOCKERIGNORE = BACKEND_DIR / ".dockerignore"

# "NAME=value" or "# NAME=value" (a documented variable left at its default). Prose comments
# never start with an upper-case word directly followed by "=".
ASSIGNMENT = re.compile(r"^(?:# ?)?([A-Z][A-Z0-9_]*)=(.*)$")

# The promise: SIGTERM stops the API before `docker stop` (and compose) give up waiting and
# SIGKILL it, 10 s by default.
DOCKER_STOP_GRACE_SECONDS = 10.0


def setting_names() -> set[str]:
    """Environment variable names the settings read (pydantic-settings: field name, upper-cased,
    or an explicit alias)."""
    names: set[str] = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias or field.alias
        names.add((alias if isinstance(alias, str) else name).upper())
    return names


def env_example_entries() -> dict[str, tuple[bool, str, list[str]]]:
    """NAME -> (active, value, the comment lines directly above it)."""
    entries: dict[str, tuple[bool, str, list[str]]] = {}
    comments: list[str] = []
    for raw in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        line = raw.rstrip()
        match = ASSIGNMENT.match(line)
        if match:
            name, value = match.groups()
            assert name not in entries, f".env.example sets {name} twice"
            entries[name] = (not line.startswith("#"), value, comments)
            comments = []
        elif line.startswith("#"):
            comments.append(line.lstrip("# ").strip())
        else:
            comments = []
    return entries


# --- .env.example ---------------------------------------------------------------------------


def test_env_example_documents_exactly_the_settings() -> None:
    documented = set(env_example_entries())
    settings = setting_names()
    assert documented - settings == set(), (
        f".env.example sets variables that no setting reads: {sorted(documented - settings)}"
    )
    assert settings - documented == set(), (
        f"settings missing from .env.example: {sorted(settings - documented)}"
    )


def test_every_env_example_variable_has_a_comment() -> None:
    undocumented = [
        name
        for name, (_, _, comments) in env_example_entries().items()
        if not any(c and not set(c) <= {"-"} for c in comments)
    ]
    assert undocumented == [], f"no comment directly above: {undocumented}"


def test_env_example_values_are_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """`cp .env.example .env` gives a configuration the application accepts."""
    for name in setting_names():
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    settings = Settings(_env_file=ENV_EXAMPLE)  # pyright: ignore[reportCallIssue]
    active = {name: value for name, (on, value, _) in env_example_entries().items() if on}
    assert "DATABASE_URL" not in active, "DATABASE_URL must stay commented (embedded path)"
    assert settings.database_url is None
    assert settings.db_pool_size == int(active["DB_POOL_SIZE"])
    assert settings.postgres_password == active["POSTGRES_PASSWORD"]


# --- docker-compose.yml ---------------------------------------------------------------------


def load_compose() -> dict[str, object]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def service(compose: dict[str, object], name: str) -> dict[str, object]:
    services = compose["services"]
    assert isinstance(services, dict)
    found = services[name]
    assert isinstance(found, dict)
    return found


def test_compose_postgres_allows_the_api_pool_plus_headroom() -> None:
    postgres = service(load_compose(), "postgres")
    parts = postgres["command"]
    assert isinstance(parts, list)
    command = " ".join(str(part) for part in parts)
    match = re.search(r"max_connections=(\d+)", command)
    assert match, f"postgres command sets no max_connections: {command}"
    defaults = Settings.model_fields
    pool = defaults["db_pool_size"].default + defaults["db_max_overflow"].default
    # Headroom for migrations, psql, health checks and the superuser-reserved connections.
    assert int(match.group(1)) >= pool + 20


def test_compose_api_uses_the_postgres_service_and_waits_for_it() -> None:
    compose = load_compose()
    api = service(compose, "backend-api")
    postgres = service(compose, "postgres")
    assert api["build"] == "./backend"
    assert api["env_file"] == ".env" == postgres["env_file"]
    assert api["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert api["restart"] == "unless-stopped"
    assert "pg_isready" in str(postgres["healthcheck"])
    environment = api["environment"]
    assert isinstance(environment, dict)
    url = make_url(
        re.sub(r"\$\{(\w+)[^}]*\}", lambda m: m.group(1).lower(), environment["DATABASE_URL"])
    )
    assert url.drivername == "postgresql+psycopg"
    assert (url.host, url.port) == ("postgres", 5432)
    assert (url.username, url.password, url.database) == (
        "postgres_user",
        "postgres_password",
        "postgres_db",
    )


def test_dockerignore_keeps_secrets_tests_and_local_state_out() -> None:
    patterns = {
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    for required in (".env", "tests/", ".venv/", ".glisk/", ".git/", "**/__pycache__/"):
        assert required in patterns, f".dockerignore lacks {required}"
    # The image needs these; an ignore pattern for them would break the build.
    for needed in ("src/", "alembic/", "alembic.ini", "docker/", "uv.lock", "pyproject.toml"):
        assert needed not in patterns


# --- the entrypoint, outside a container ------------------------------------------------------


def entrypoint_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A minimal environment: the project's virtualenv on PATH, an empty settings file (so a
    developer's ../.env cannot leak in) and the given variables."""
    empty_env_file = tmp_path / "empty.env"
    empty_env_file.touch()
    venv_bin = str(Path(sys.executable).parent)
    env = {
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(tmp_path),
        "TZ": "UTC",
        "GLISK_ENV_FILE": str(empty_env_file),
        "APP_ENV": "development",
        "LOG_LEVEL": "INFO",
    }
    env.update(extra)
    return env


def alembic_revision(url: str) -> str | None:
    with connect(url) as conn:
        exists = conn.execute("SELECT to_regclass('alembic_version') IS NOT NULL").fetchone()
        if not exists or not exists[0]:
            return None
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        return str(row[0]) if row else None


def run_entrypoint(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The entrypoint with ``args``, in the minimal environment, to its end."""
    return subprocess.run(
        [str(ENTRYPOINT), *args],
        env=entrypoint_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def fresh_database(postgres_container: Database) -> Iterator[str]:
    """An empty database (no migrations) on the test server, dropped afterwards."""
    with throwaway_database(postgres_container.url) as url:
        yield url


@pytest.mark.slow
def test_entrypoint_migrates_serves_health_and_stops_on_sigterm(
    fresh_database: str, tmp_path: Path
) -> None:
    assert os.access(ENTRYPOINT, os.X_OK), "docker/entrypoint.sh must be executable"
    assert alembic_revision(fresh_database) is None
    port = free_port()
    log_path = tmp_path / "entrypoint.log"
    env = entrypoint_env(tmp_path, DATABASE_URL=fresh_database, HOST="127.0.0.1", PORT=str(port))

    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(ENTRYPOINT)],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: nothing can be left behind unseen
        )
    try:
        wait_serving(
            proc,
            port,
            SERVE_START_SECONDS,
            what="the entrypoint",
            poll=0.1,
            timeout=2,
            output=lambda: log_path.read_text(errors="replace"),
        )

        assert alembic_revision(fresh_database) == migrations.head_revision()

        # `exec` replaced the shell: the process docker signals is uvicorn itself.
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert any(b"uvicorn" in part for part in cmdline), cmdline

        proc.send_signal(signal.SIGTERM)
        try:
            returncode = proc.wait(timeout=DOCKER_STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"still running {DOCKER_STOP_GRACE_SECONDS:.0f} s after SIGTERM: docker stop "
                "would SIGKILL it"
            )
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    output = log_path.read_text(errors="replace")
    # uvicorn exits 0, or re-raises the signal it handled (-SIGTERM; 143 in a shell).
    assert returncode in (0, -signal.SIGTERM), f"exit code {returncode}:\n{output}"
    assert not group_alive(proc.pid), "processes of the entrypoint survived SIGTERM"
    assert health_status(port) is None, "something still answers on the port"
    assert "Traceback" not in output, output


def test_entrypoint_refuses_to_start_without_database_url(tmp_path: Path) -> None:
    result = run_entrypoint(tmp_path)
    assert result.returncode == 2
    assert "DATABASE_URL is not set" in result.stderr


def test_entrypoint_runs_given_command_instead(tmp_path: Path) -> None:
    """`docker compose run --rm backend-api <command>` runs the command, without migrating."""
    result = run_entrypoint(tmp_path, "sh", "-c", 'printf "%s" "$0"', "one-off")
    assert (result.returncode, result.stdout) == (0, "one-off")
