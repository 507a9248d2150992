"""The ``glisk`` command: ``serve``, ``worker``, ``ingest``, ``status``, ``tokens`` and ``db ...``.

Without DATABASE_URL they start the embedded PostgreSQL (data kept between runs) and stop it on
exit; a command other than ``serve`` uses the embedded server another glisk command of the same
data directory already runs. Configuration and connection problems end in one clear line on
stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NoReturn

import psycopg
from psycopg import sql

from glisk.core.config import Settings, load_settings, project_dir
from glisk.core.logs import configure_logging
from glisk.core.timezone import enforce_utc
from glisk.embedded import EmbeddedPostgres, default_data_dir
from glisk.errors import EXIT_CONFIG, EXIT_FAILURE, ConfigError, OperatorError, first_line
from glisk.ingest.command import add_parser as add_ingest_parser
from glisk.ops.command import add_parsers as add_ops_parsers
from glisk.workers.command import add_parser as add_worker_parser

# Alembic and SQLAlchemy are imported by the commands that use them (below, on use): `glisk
# worker` and `glisk status` start faster without them.

EMBEDDED_DATABASE = "glisk"
EXIT_DATABASE = EXIT_FAILURE
EXIT_NEAR_LIMIT = 3  # `glisk db check`: connections near the server's limit

# Every command failure is a glisk.errors.OperatorError: one line, and the exit code it carries.

__all__ = ["EXIT_CONFIG", "EXIT_DATABASE", "EXIT_NEAR_LIMIT", "database", "main"]


def masked_url(db_url: str) -> str:
    from glisk.core.database import masked_url as mask

    return mask(db_url)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _ensure_database(server: EmbeddedPostgres, name: str) -> None:
    with psycopg.connect(server.conninfo(), autocommit=True) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not found:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def _reachable(url: str, settings: Settings) -> str:
    """``url`` once it answered SELECT 1; DatabaseUnavailableError otherwise."""
    from glisk.app import verify_database

    asyncio.run(
        verify_database(
            url,
            settings.db_connect_timeout,
            application_name="glisk-cli",
            pooler=settings.db_pooler,
        )
    )
    return url


@contextmanager
def database(
    settings: Settings,
    *,
    api_processes: int = 1,
    attach: bool = True,
    on_failure: Callable[[str], None] | None = None,
) -> Iterator[str]:
    """Yield the URL of a database that answered SELECT 1: DATABASE_URL, or the embedded server.

    The embedded server is started for the duration of the block (sized for ``api_processes``
    API processes), or, with ``attach``, the one another glisk command already runs on the same
    data directory is used (and left running). With ``on_failure``, a server started here is
    supervised: restarted if it dies, ``on_failure`` called with one line if it cannot be.
    Raises an OperatorError (DatabaseUnavailableError, EmbeddedPostgresError: one line)
    otherwise."""
    if settings.database_url is not None:
        yield _reachable(settings.database_url, settings)
        return
    server = _embedded_server(settings, api_processes=api_processes)
    server.start(attach=attach)
    try:
        where = f"{server.socket_dir} (Unix socket .s.PGSQL.{server.port}"
        where += f", and 127.0.0.1:{server.port})" if settings.glisk_pg_tcp else ")"
        if server.attached:
            where += f", already running (pid {server.pid})"
        _say(
            f"Embedded PostgreSQL on {where}, data in {server.data_dir}, "
            f"password in {server.password_file} (glisk db psql opens psql on it)"
        )
        _ensure_database(server, EMBEDDED_DATABASE)
        if on_failure is not None and not server.attached:
            server.supervise(on_failure, say=_say)
        yield _reachable(server.url_for(EMBEDDED_DATABASE), settings)
    finally:
        server.stop()


def _embedded_server(settings: Settings, *, api_processes: int = 1) -> EmbeddedPostgres:
    return EmbeddedPostgres(
        data_dir=settings.glisk_pg_data or default_data_dir(project_dir()),
        port=settings.glisk_pg_port,
        max_connections=settings.embedded_max_connections(api_processes=api_processes),
        bindir=settings.glisk_pg_bindir,
        tcp=settings.glisk_pg_tcp,
    )


def _url_for_tools(settings: Settings) -> str:
    """The libpq URL (password included) of the database glisk uses, for psql and other tools.
    Starts nothing: the embedded server's URL is read from its password file, and is valid
    whenever that server runs. Raises EmbeddedPostgresError if it was never started."""
    if settings.database_url is not None:
        from sqlalchemy.engine import make_url

        url = make_url(settings.database_url).set(drivername="postgresql")
        return url.render_as_string(hide_password=False)
    return _embedded_server(settings).conninfo(EMBEDDED_DATABASE)


def _migrate(url: str, action: Callable[[], None]) -> None:
    try:
        action()
    except Exception as exc:
        raise OperatorError(f"Migrations failed on {masked_url(url)}: {first_line(exc)}") from None


class Terminated(Exception):
    """SIGTERM arrived. Raised from the signal handler so ``finally`` blocks (stopping the embedded
    server) run. uvicorn handles SIGTERM itself while serving and re-raises it after its graceful
    shutdown; this handler is what it finds then."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


class Supervision:
    """What ``glisk serve`` and ``glisk worker`` do when their embedded PostgreSQL dies and cannot
    be restarted: remember why and stop this process the way SIGTERM does, so that it exits
    non-zero (``raise_if_failed``) for a process supervisor to restart the whole thing."""

    def __init__(self) -> None:
        self.failure: str | None = None

    def __call__(self, reason: str) -> None:
        self.failure = reason
        os.kill(os.getpid(), signal.SIGTERM)

    def raise_if_failed(self) -> None:
        if self.failure is not None:
            raise OperatorError(self.failure)


def cmd_serve(settings: Settings, args: argparse.Namespace) -> None:
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    supervision = Supervision()
    try:
        _serve(settings, args, supervision)
    except Terminated:
        pass  # a requested stop is a clean exit; a supervision failure is raised below
    finally:
        signal.signal(signal.SIGTERM, previous)
    supervision.raise_if_failed()


def _serve(settings: Settings, args: argparse.Namespace, supervision: Supervision) -> None:
    import uvicorn

    from glisk import migrations
    from glisk.app import create_app

    host = args.host or settings.host
    port = args.port or settings.port
    # serve owns its embedded server (one glisk serve per data directory) and restarts it.
    with database(
        settings, api_processes=args.workers, attach=False, on_failure=supervision
    ) as url:
        _migrate(url, lambda: migrations.upgrade(url))
        _say(f"GLISK API on http://{host}:{port} (database {masked_url(url)})")
        if args.workers > 1:
            _serve_processes(url, host, port, args.workers)
            return
        app = create_app(settings.model_copy(update={"database_url": url}))
        uvicorn.run(app, host=host, port=port, log_config=None, lifespan="on")


def _serve_processes(url: str, host: str, port: int, workers: int) -> None:
    """uvicorn's supervisor with ``workers`` API processes. They get the database (started and
    migrated here, once) through DATABASE_URL in their environment, and arm a parent-death
    signal (glisk.app.stop_with_parent) so none outlives this process, even after a SIGKILL.
    On SIGTERM or SIGINT the supervisor stops them gracefully and returns."""
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess

    from glisk.app import SERVE_PARENT_ENV

    config = uvicorn.Config(
        "glisk.app:create_served_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_config=None,
        lifespan="on",
    )
    saved = {name: os.environ.get(name) for name in ("DATABASE_URL", SERVE_PARENT_ENV)}
    os.environ.update({"DATABASE_URL": url, SERVE_PARENT_ENV: str(os.getpid())})
    try:
        supervisor = Multiprocess(config, sockets=[config.bind_socket()])
        supervisor.run()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    if any(process.exitcode == STARTUP_FAILURE for process in supervisor.processes):
        raise OperatorError("an API process failed to start (its log is above)")


def cmd_db_check(settings: Settings, url: str, warn_at: float) -> None:
    """Connections in use per application_name against what the server allows. Raises an
    OperatorError with EXIT_NEAR_LIMIT when they reach ``warn_at`` percent of the usable
    connections, or when one API process's pool could exceed them (without a pooler, whose
    clients do not count)."""
    from glisk.core.database import read_connection_usage

    try:
        usage = read_connection_usage(
            url, connect_timeout=settings.db_connect_timeout, pooler=settings.db_pooler
        )
    except psycopg.Error as exc:
        raise OperatorError(
            f"Cannot read pg_stat_activity on {masked_url(url)}: {first_line(exc)}"
        ) from None
    api_pool = settings.db_pool_size + settings.db_max_overflow
    print("\n".join(usage.report(api_pool=api_pool)))
    # Behind a pooler the API's pool holds pooler clients, not server connections.
    problems = usage.problems(warn_at, api_pool=api_pool if settings.db_pooler == "none" else None)
    for problem in problems:
        _say(f"warning: {problem} (see backend/docs/deployment.md, connection budget)")
    if problems:
        raise OperatorError("connections near the limit", EXIT_NEAR_LIMIT)


def cmd_db_downgrade(settings: Settings, url: str, args: argparse.Namespace) -> None:
    """Migrate down to ``args.revision``. First a dry run says what would be dropped; a downgrade
    that drops data (a table with rows, a column with values) needs ``--yes``, and with
    APP_ENV=production one that drops any table or data is refused unless ``--force`` too."""
    from glisk import migrations

    try:
        plan = migrations.downgrade_plan(url, args.revision)
    except Exception as exc:
        raise OperatorError(
            f"Migrations failed on {masked_url(url)}: {first_line(exc)} (found while trying the "
            f"downgrade to {args.revision} in a transaction rolled back: nothing was changed)"
        ) from None
    _say(plan.describe())
    production = settings.app_env == "production"
    if production and (plan.drops_data or plan.tables) and not args.force:
        raise ConfigError(
            "APP_ENV=production: refusing a downgrade that drops tables or data (listed above); "
            "take a backup, then run it again with --yes --force if that is really meant"
        )
    if plan.drops_data and not args.yes:
        raise ConfigError(
            "this downgrade drops data (listed above): run it again with --yes to go ahead"
        )
    _migrate(url, lambda: migrations.downgrade(url, args.revision))
    _say(f"Database at {migrations.current_revision(url) or 'base (empty)'}")


def cmd_db(settings: Settings, args: argparse.Namespace) -> None:
    from glisk import migrations

    if args.db_command == "url":
        print(_url_for_tools(settings))
        return
    with database(settings) as url:
        if args.db_command == "check":
            cmd_db_check(settings, url, args.warn_at)
        elif args.db_command == "psql":
            from glisk.ops.psql import run_psql

            code = run_psql(url, args.psql_args, bindir=settings.glisk_pg_bindir)
            if code != 0:
                raise OperatorError(f"psql exited with code {code}", code)
        elif args.db_command == "upgrade":
            _migrate(url, lambda: migrations.upgrade(url, args.revision))
            _say(
                f"Database at {migrations.current_revision(url)} "
                f"(head {migrations.head_revision()})"
            )
        elif args.db_command == "downgrade":
            cmd_db_downgrade(settings, url, args)
        else:
            current = migrations.current_revision(url)
            head = migrations.head_revision()
            state = "up to date" if current == head else f"head is {head}"
            print(f"{current or 'base (empty)'} ({state})")


def cmd_worker(settings: Settings, args: argparse.Namespace) -> None:
    from glisk.workers.command import run

    run(settings, args)


def cmd_ingest(settings: Settings, args: argparse.Namespace) -> None:
    from glisk.ingest.command import run

    run(settings, args)


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more (got {number})")
    return number


def port_number(value: str) -> int:
    """An argparse type: a TCP port, 1-65535 (as PORT and WORKER_METRICS_PORT)."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 1 to 65535 (got {value!r})")
    return number


def _percent(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not 0 <= number <= 100:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"must be a percentage from 0 to 100 (got {value!r})")
    return number


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line (the option and its rule) instead of the usage
    text first; ``--help`` still shows it. Exit code 2, as for any configuration error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CONFIG, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="glisk", description="GLISK backend")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="apply migrations and serve the HTTP API")
    serve.add_argument("--host", help="bind address (default: HOST, 0.0.0.0)")
    serve.add_argument("--port", type=port_number, help="port (default: PORT, 8000)")
    serve.add_argument(
        "--workers",
        type=_positive,
        default=1,
        help="API processes (default 1); each has its own pool of DB_POOL_SIZE",
    )
    serve.set_defaults(handler=cmd_serve)

    add_worker_parser(commands).set_defaults(handler=cmd_worker)
    add_ingest_parser(commands).set_defaults(handler=cmd_ingest)
    add_ops_parsers(commands)  # status, tokens retry|show

    db = commands.add_parser("db", help="schema migrations (Alembic)")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    up = db_commands.add_parser("upgrade", help="migrate up (default: to head)")
    up.add_argument("revision", nargs="?", default="head")
    down = db_commands.add_parser(
        "downgrade",
        help="migrate down to REVISION (e.g. -1, base); says first what it would drop",
    )
    down.add_argument("revision")
    down.add_argument(
        "--yes", action="store_true", help="go ahead when the downgrade drops data (rows, values)"
    )
    down.add_argument(
        "--force",
        action="store_true",
        help="with APP_ENV=production, go ahead when it drops tables or data (needs --yes too)",
    )
    db_commands.add_parser("current", help="show the database's revision")
    check = db_commands.add_parser(
        "check", help="connections in use per application_name against max_connections"
    )
    check.add_argument(
        "--warn-at",
        type=_percent,
        default=80.0,
        help=f"percent of usable connections that exits {EXIT_NEAR_LIMIT} (default 80)",
    )
    db_commands.add_parser(
        "psql",
        help="psql on the database, the password in a private passfile (never on a command line);"
        " other arguments go to psql",
    )
    db_commands.add_parser(
        "url",
        help="print the database URL with its password (a secret: never put it on a command line)",
    )
    db.set_defaults(handler=cmd_db)
    return parser


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, parsed; ``glisk db psql`` passes the arguments it does not know to
    psql (``args.psql_args``), every other command refuses them (exit 2)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "db_command", None) == "psql":
        args.psql_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    enforce_utc()
    try:
        settings = load_settings()
    except ConfigError as exc:
        _say(str(exc))
        return exc.exit_code
    configure_logging(settings.app_env, settings.log_level)
    try:
        args.handler(settings, args)
    except OperatorError as exc:
        _say(f"error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
