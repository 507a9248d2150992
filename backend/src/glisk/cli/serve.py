"""``glisk serve``: apply the migrations, then serve the HTTP API in one or several processes.

Without DATABASE_URL it owns the embedded PostgreSQL of its data directory (one ``glisk serve``
per data directory), restarts it if it dies, and stops it on exit.
"""

from __future__ import annotations

import argparse
import os
import signal
from typing import TYPE_CHECKING

from glisk.cli.arguments import Subcommands, port_number
from glisk.cli.database import Supervision, database, masked_url, migrate, say
from glisk.errors import OperatorError

if TYPE_CHECKING:
    from glisk.core.config import Settings


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more (got {number})")
    return number


def add_parser(commands: Subcommands) -> None:
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


class Terminated(Exception):
    """SIGTERM arrived. Raised from the signal handler so ``finally`` blocks (stopping the embedded
    server) run. uvicorn handles SIGTERM itself while serving and re-raises it after its graceful
    shutdown; this handler is what it finds then."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


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
        migrate(url, lambda: migrations.upgrade(url))
        say(f"GLISK API on http://{host}:{port} (database {masked_url(url)})")
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
