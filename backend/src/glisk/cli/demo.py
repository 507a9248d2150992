"""``glisk demo``: the whole pipeline locally, verified from the chain; exit 0 only if the verdict
is ok. The run itself is ``glisk.ops.demo``."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from glisk.cli.arguments import Subcommands
from glisk.errors import ConfigError, OperatorError

if TYPE_CHECKING:
    from glisk.core.config import Settings


def add_parser(commands: Subcommands) -> None:
    demo = commands.add_parser(
        "demo", help="run the whole pipeline locally against stand-ins and verify it"
    )
    demo.add_argument("--tokens", type=int, default=1000, help="tokens to mint (default 1000)")
    demo.add_argument("--workers", type=int, default=2, help="worker processes per stage")
    demo.add_argument("--chaos", action="store_true", help="SIGKILL random workers as it runs")
    demo.add_argument("--seed", type=int, default=0, help="chaos random seed")
    demo.add_argument("--timeout", type=float, default=600.0, help="give up after SECONDS")
    demo.set_defaults(handler=cmd_demo)


def cmd_demo(settings: Settings, args: argparse.Namespace) -> None:
    from glisk.ops.demo import run_demo

    if not 1 <= args.tokens <= 100_000:
        raise ConfigError("--tokens: must be 1 to 100000")
    if not 1 <= args.workers <= 8:
        raise ConfigError("--workers: must be 1 to 8")
    ok = run_demo(
        settings,
        tokens=args.tokens,
        workers=args.workers,
        chaos=args.chaos,
        seed=args.seed,
        timeout=args.timeout,
    )
    if not ok:
        raise OperatorError("the demo's verification failed (see the table above)")
