"""``glisk status`` and ``glisk tokens retry|show``: the operator's commands.

They need database access (DATABASE_URL, or the embedded server in development) and nothing
else; nothing here is reachable over HTTP. What they read and change is ``glisk.ops.status`` and
``glisk.ops.tokens``; heavy imports (rich, psycopg) wait for the command.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from glisk.cli.arguments import Subcommands
from glisk.cli.database import database
from glisk.errors import ConfigError, FieldValidationError, OperatorError, first_line
from glisk.pipeline import stage_names

if TYPE_CHECKING:
    import psycopg

    from glisk.core.config import Settings


def add_parsers(commands: Subcommands) -> None:
    """Add ``status`` and ``tokens`` to the ``glisk`` subcommands."""
    status = commands.add_parser("status", help="tokens per stage, leases, failures, totals")
    status.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    status.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=2.0,
        metavar="SECONDS",
        help="refresh in place every SECONDS (default 2) until Ctrl-C",
    )
    status.add_argument(
        "--exact", action="store_true", help="count revealed tokens instead of estimating"
    )
    status.set_defaults(handler=cmd_status)

    tokens = commands.add_parser("tokens", help="inspect tokens, send failed tokens back")
    sub = tokens.add_subparsers(dest="tokens_command", required=True)
    retry = sub.add_parser(
        "retry", help="move failed tokens back to the status their failed stage claims from"
    )
    retry.add_argument("--ids", help="token ids (token_id), comma-separated")
    retry.add_argument("--reason", help="only tokens failed with this error_data reason")
    retry.add_argument("--stage", choices=stage_names(), help="failed stage")
    retry.add_argument("--since", help="only tokens minted at or after this ISO time (UTC)")
    retry.add_argument(
        "--dry-run", action="store_true", help="show what would move, change nothing"
    )
    retry.set_defaults(handler=cmd_tokens_retry)
    show = sub.add_parser("show", help="one token: status, lease, attempts, checkpoint, errors")
    show.add_argument("token_id", type=int)
    show.set_defaults(handler=cmd_tokens_show)


@contextmanager
def _connection(settings: Settings) -> Iterator[psycopg.Connection[Any]]:
    """A psycopg connection to the configured (or embedded) database; OperatorError if
    unusable."""
    import psycopg

    from glisk.workers.connection import libpq_url

    with database(settings) as url:
        try:
            conn = psycopg.connect(
                libpq_url(url),
                autocommit=True,
                connect_timeout=max(2, int(settings.db_connect_timeout)),
                application_name="glisk-ops",
            )
        except psycopg.Error as exc:
            raise OperatorError(f"database unreachable: {first_line(exc)}") from None
        with conn:
            try:
                yield conn
            except (
                psycopg.errors.UndefinedColumn,
                psycopg.errors.UndefinedTable,
                psycopg.errors.UndefinedObject,
            ) as exc:
                raise OperatorError(
                    f"the database is not migrated ({exc.diag.message_primary}): "
                    "run 'glisk db upgrade'"
                ) from None


def cmd_status(settings: Settings, args: argparse.Namespace) -> None:
    from functools import partial

    from glisk.ops.status import collect, render

    with _connection(settings) as conn:
        read = partial(
            collect,
            conn,
            exact=args.exact,
            stuck_after=settings.reveal_stuck_seconds,
            fee_cap_gwei=float(settings.reveal_max_gas_price_gwei),
        )
        if args.json:
            print(json.dumps(read().as_json(), indent=2))
            return
        from rich.console import Console

        console = Console()
        if args.watch is None:
            console.print(render(read()))
            return
        from rich.live import Live

        interval = max(0.2, float(args.watch))
        with Live(render(read()), console=console) as live:
            while True:  # until Ctrl-C (KeyboardInterrupt: exit 130 in glisk.cli's main)
                time.sleep(interval)
                live.update(render(read()))


def cmd_tokens_retry(settings: Settings, args: argparse.Namespace) -> None:
    from glisk.ops.tokens import RetryFilter, retry_failed

    try:
        selection = RetryFilter.parse(
            ids=args.ids, reason=args.reason, stage=args.stage, since=args.since
        )
    except FieldValidationError as exc:  # a bad option
        raise ConfigError(str(exc)) from None
    with _connection(settings) as conn:
        outcome = retry_failed(conn, selection, dry_run=args.dry_run)
    verb = "would move" if args.dry_run else "moved"
    for moved in outcome.moved:
        # A kept pointer at a reveal transaction that may still be mined: the reveal worker
        # settles it with the chain before it sends anything for the token.
        first = (
            f", its reveal {moved.reveal[0]} ({moved.reveal[1]}) reconciled first"
            if moved.reveal is not None
            else ""
        )
        print(
            f"token {moved.token_id}: failed ({moved.stage or '-'}: {moved.reason or '-'}) "
            f"-> {moved.target}{first} [{verb}]"
        )
    for token_id, why in outcome.refused:
        print(f"token {token_id}: refused: {why}", file=sys.stderr)
    by_target = ", ".join(f"{n} to {t}" for t, n in sorted(outcome.by_target().items()))
    print(f"{len(outcome.moved)} token(s) {verb}{': ' + by_target if by_target else ''}")
    if outcome.refused:
        raise OperatorError(f"{len(outcome.refused)} selected token(s) refused (see above)")


def cmd_tokens_show(settings: Settings, args: argparse.Namespace) -> None:
    from glisk.ops.tokens import show_token

    with _connection(settings) as conn:
        shown = show_token(conn, args.token_id)
    if shown is None:
        raise OperatorError(f"token_id {args.token_id}: no such token")
    print(json.dumps(shown, indent=2, default=str))
