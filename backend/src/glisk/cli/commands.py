"""The ``glisk`` command: its parser, every subcommand in one place, and ``main``.

Each command group is a module of this package (``serve``, ``worker``, ``ingest``, ``ops``:
status and tokens, ``demo``, ``db``) that adds its parsers and its handler; they share
``glisk.cli.database`` for the database. Configuration and connection problems end in one
clear line on stderr and a non-zero exit: every command failure is a glisk.errors.OperatorError,
one line and the exit code it carries.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from glisk.cli import db, demo, ingest, ops, serve, worker
from glisk.cli.arguments import Parser
from glisk.cli.database import say
from glisk.errors import ConfigError, OperatorError


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="glisk", description="GLISK backend")
    commands = parser.add_subparsers(dest="command", required=True)
    serve.add_parser(commands)
    worker.add_parser(commands)
    ingest.add_parser(commands)
    ops.add_parsers(commands)  # status, tokens retry|show
    demo.add_parser(commands)
    db.add_parser(commands)
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
    from glisk.core.config import load_settings
    from glisk.core.logs import configure_logging
    from glisk.core.timezone import enforce_utc

    args = parse(argv)
    enforce_utc()
    try:
        settings = load_settings()
    except ConfigError as exc:
        say(str(exc))
        return exc.exit_code
    configure_logging(settings.app_env, settings.log_level)
    try:
        args.handler(settings, args)
    except OperatorError as exc:
        say(f"error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return 0
