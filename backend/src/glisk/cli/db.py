"""``glisk db ...``: migrations (upgrade, downgrade, current), psql, the URL for tools, and the
connection budget (check)."""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING

from glisk.cli.arguments import Subcommands
from glisk.cli.database import database, masked_url, migrate, say
from glisk.core.embedded import url_for_tools
from glisk.errors import ConfigError, OperatorError, first_line

if TYPE_CHECKING:
    from glisk.core.config import Settings

EXIT_NEAR_LIMIT = 3  # `glisk db check`: connections near the server's limit


def _percent(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not 0 <= number <= 100:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"must be a percentage from 0 to 100 (got {value!r})")
    return number


def add_parser(commands: Subcommands) -> None:
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


def cmd_db(settings: Settings, args: argparse.Namespace) -> None:
    from glisk import migrations

    if args.db_command == "url":
        print(url_for_tools(settings))
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
            migrate(url, lambda: migrations.upgrade(url, args.revision))
            say(
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


def cmd_db_check(settings: Settings, url: str, warn_at: float) -> None:
    """Connections in use per application_name against what the server allows. Raises an
    OperatorError with EXIT_NEAR_LIMIT when they reach ``warn_at`` percent of the usable
    connections, or when one API process's pool could exceed them (without a pooler, whose
    clients do not count)."""
    import psycopg

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
        say(f"warning: {problem} (see backend/docs/deployment.md, connection budget)")
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
    say(plan.describe())
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
    migrate(url, lambda: migrations.downgrade(url, args.revision))
    say(f"Database at {migrations.current_revision(url) or 'base (empty)'}")
