"""``glisk ingest``: follow the GLISK contract's mint logs into the database until SIGTERM.

    glisk ingest                      follow (catch up, then poll every INGEST_POLL_INTERVAL)
    glisk ingest --once               catch up to the confirmed head, run a gap pass, exit
    glisk ingest --rewind-to BLOCK    after a reorg deeper than the window: move the cursor back
                                      to BLOCK (a block both chains share), clear the stop, exit

Needs CHAIN_RPC_URL and GLISK_CONTRACT_ADDRESS; CHAIN_ID, when set, must be the node's. Exit
codes, for a supervisor (systemd ``RestartPreventExitStatus=2``): 0 stopped by SIGTERM/SIGINT
(or ``--once`` done); 1 the database or the node unreachable at start-up (worth restarting); 2 a
configuration error, or a reorg deeper than the window (the operator must look first).
"""

from __future__ import annotations

import argparse
import asyncio
from typing import TYPE_CHECKING

from glisk.cli.arguments import Subcommands, add_documented
from glisk.cli.database import working_database
from glisk.errors import ConfigError

if TYPE_CHECKING:
    from glisk.core.config import Settings


def add_parser(commands: Subcommands) -> None:
    ingest = add_documented(
        commands,
        "ingest",
        help="follow the contract's mint logs (eth_getLogs) into the database until SIGTERM",
        doc=__doc__,
    )
    ingest.add_argument("--once", action="store_true", help="catch up, run one gap pass, then exit")
    ingest.add_argument(
        "--rewind-to",
        type=int,
        metavar="BLOCK",
        help="move the cursor back to BLOCK and clear a deep-reorg stop, then exit",
    )
    ingest.add_argument(
        "--metrics-port", type=int, help="serve /metrics on this port (INGEST_METRICS_PORT)"
    )
    ingest.set_defaults(handler=cmd_ingest)


def cmd_ingest(settings: Settings, args: argparse.Namespace) -> None:
    """Raises OperatorErrors (ConfigError and DeepReorg exit 2, an unreachable database or
    node 1)."""
    from glisk.ingest.run import required, run_ingest
    from glisk.workers.signals import hold_stop_signals

    hold_stop_signals()
    required(settings)
    if args.rewind_to is not None and args.rewind_to < 0:
        raise ConfigError(f"--rewind-to: must be a block number, 0 or more (got {args.rewind_to})")
    with working_database(settings) as url:
        asyncio.run(
            run_ingest(
                settings,
                url,
                once=args.once,
                rewind_to=args.rewind_to,
                metrics_port=args.metrics_port,
            )
        )
