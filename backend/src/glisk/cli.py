"""The ``glisk`` command: ``serve`` and ``db upgrade|downgrade|current|url``.

Without DATABASE_URL both start the embedded PostgreSQL (data kept between runs) and stop it on
exit. Configuration and connection problems end in one clear line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

from glisk import migrations
from glisk.core.config import BACKEND_DIR, ConfigError, Settings, load_settings
from glisk.core.database import masked_url
from glisk.core.logs import configure_logging
from glisk.core.timezone import enforce_utc
from glisk.embedded_pg import EmbeddedPostgres, EmbeddedPostgresError, default_data_dir

EMBEDDED_DATABASE = "glisk"
EXIT_CONFIG = 2
EXIT_DATABASE = 1


class CliError(Exception):
    def __init__(self, message: str, exit_code: int = EXIT_DATABASE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _ensure_database(server: EmbeddedPostgres, name: str) -> None:
    with psycopg.connect(server.conninfo(), autocommit=True) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not found:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def _reachable(url: str, settings: Settings) -> str:
    from glisk.app import DatabaseUnavailableError, verify_database

    try:
        asyncio.run(verify_database(url, settings.db_connect_timeout))
    except DatabaseUnavailableError as exc:
        raise CliError(str(exc)) from None
    return url


@contextmanager
def database(settings: Settings) -> Iterator[str]:
    """Yield the URL of a database that answered SELECT 1: DATABASE_URL, or the embedded server
    started for the duration of the block. Raises CliError (one line) otherwise."""
    if settings.database_url is not None:
        yield _reachable(settings.database_url, settings)
        return
    server = _embedded_server(settings)
    try:
        server.start()
    except EmbeddedPostgresError as exc:
        raise CliError(str(exc)) from None
    try:
        _say(
            f"Embedded PostgreSQL on 127.0.0.1:{server.port}, data in {server.data_dir}, "
            f"password in {server.password_file} (glisk db url prints the URL)"
        )
        _ensure_database(server, EMBEDDED_DATABASE)
        yield _reachable(server.url_for(EMBEDDED_DATABASE), settings)
    finally:
        server.stop()


def _embedded_server(settings: Settings) -> EmbeddedPostgres:
    return EmbeddedPostgres(
        data_dir=settings.glisk_pg_data or default_data_dir(BACKEND_DIR),
        port=settings.glisk_pg_port,
        max_connections=settings.embedded_max_connections(),
        bindir=settings.glisk_pg_bindir,
    )


def _url_for_tools(settings: Settings) -> str:
    """The libpq URL (password included) of the database glisk uses, for psql and other tools.
    Starts nothing: the embedded server's URL is read from its password file, and is valid
    whenever that server runs. Raises CliError if it was never started."""
    if settings.database_url is not None:
        url = make_url(settings.database_url).set(drivername="postgresql")
        return url.render_as_string(hide_password=False)
    try:
        return _embedded_server(settings).conninfo(EMBEDDED_DATABASE)
    except EmbeddedPostgresError as exc:
        raise CliError(str(exc)) from None


def _migrate(url: str, action: Callable[[], None]) -> None:
    try:
        action()
    except Exception as exc:
        first = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        raise CliError(
            f"Migrations failed on {masked_url(url)}: {first[0] if first else type(exc).__name__}"
        ) from None


class Terminated(Exception):
    """SIGTERM arrived. Raised from the signal handler so ``finally`` blocks (stopping the embedded
    server) run. uvicorn handles SIGTERM itself while serving and re-raises it after its graceful
    shutdown; this handler is what it finds then."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def cmd_serve(settings: Settings, args: argparse.Namespace) -> None:
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        _serve(settings, args)
    except Terminated:
        pass  # a requested stop is a clean exit
    finally:
        signal.signal(signal.SIGTERM, previous)


def _serve(settings: Settings, args: argparse.Namespace) -> None:
    import uvicorn

    from glisk.app import create_app

    host = args.host or settings.host
    port = args.port or settings.port
    with database(settings) as url:
        _migrate(url, lambda: migrations.upgrade(url))
        app = create_app(settings.model_copy(update={"database_url": url}))
        _say(f"GLISK API on http://{host}:{port} (database {masked_url(url)})")
        uvicorn.run(app, host=host, port=port, log_config=None, lifespan="on")


def cmd_db(settings: Settings, args: argparse.Namespace) -> None:
    if args.db_command == "url":
        print(_url_for_tools(settings))
        return
    with database(settings) as url:
        if args.db_command == "upgrade":
            _migrate(url, lambda: migrations.upgrade(url, args.revision))
            _say(
                f"Database at {migrations.current_revision(url)} "
                f"(head {migrations.head_revision()})"
            )
        elif args.db_command == "downgrade":
            _migrate(url, lambda: migrations.downgrade(url, args.revision))
            _say(f"Database at {migrations.current_revision(url) or 'base (empty)'}")
        else:
            current = migrations.current_revision(url)
            head = migrations.head_revision()
            state = "up to date" if current == head else f"head is {head}"
            print(f"{current or 'base (empty)'} ({state})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glisk", description="GLISK backend")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="apply migrations and serve the HTTP API")
    serve.add_argument("--host", help="bind address (default: HOST, 0.0.0.0)")
    serve.add_argument("--port", type=int, help="port (default: PORT, 8000)")
    serve.set_defaults(handler=cmd_serve)

    db = commands.add_parser("db", help="schema migrations (Alembic)")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    up = db_commands.add_parser("upgrade", help="migrate up (default: to head)")
    up.add_argument("revision", nargs="?", default="head")
    down = db_commands.add_parser("downgrade", help="migrate down to REVISION (e.g. -1, base)")
    down.add_argument("revision")
    db_commands.add_parser("current", help="show the database's revision")
    db_commands.add_parser(
        "url", help='print the database URL with its password (psql "$(glisk db url)")'
    )
    db.set_defaults(handler=cmd_db)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    enforce_utc()
    try:
        settings = load_settings()
    except ConfigError as exc:
        _say(str(exc))
        return EXIT_CONFIG
    configure_logging(settings.app_env, settings.log_level)
    try:
        args.handler(settings, args)
    except CliError as exc:
        _say(f"error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
