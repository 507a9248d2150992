"""No-op handlers, and a process running the leased stages with them.

For chaos tests, load tests and smoke tests of the coordination layer, not for production. The
handlers are also what ``glisk worker STAGE --handler noop`` runs.

``DATABASE_URL=... python -m glisk.workers.noop [--stages image,upload,reveal] [--sleep S]``
prints its WorkerStats as one JSON line per stage on exit. SIGTERM drains like a real worker.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict

from glisk.core.config import load_settings
from glisk.core.logs import configure_logging
from glisk.core.timezone import enforce_utc
from glisk.pipeline import StageName
from glisk.workers.claims import Claim
from glisk.workers.connection import ConnectOptions
from glisk.workers.executor import Handler
from glisk.workers.signals import hold_stop_signals, install_stop_signals
from glisk.workers.worker import Worker


def handlers(sleep: float = 0.0) -> dict[StageName, Handler]:
    """A handler per stage that waits ``sleep`` seconds and returns a valid result."""

    async def image(claim: Claim) -> str:
        if sleep:
            await asyncio.sleep(sleep)
        return f"/images/{claim.token_id}.png"

    async def upload(claim: Claim) -> str:
        if sleep:
            await asyncio.sleep(sleep)
        return f"bafy-noop-{claim.token_id}"

    async def reveal(claims: Sequence[Claim]) -> str:
        if sleep:
            await asyncio.sleep(sleep)
        digest = hashlib.sha256(",".join(str(c.token_id) for c in claims).encode()).hexdigest()
        return "0x" + digest

    return {StageName.IMAGE: image, StageName.UPLOAD: upload, StageName.REVEAL: reveal}


async def _main(args: argparse.Namespace) -> None:
    enforce_utc()
    configure_logging("development", args.log_level)
    stages = [StageName(s) for s in args.stages.split(",")]
    pooler = load_settings().db_pooler  # DB_POOLER from the environment, as glisk worker reads it
    connect = ConnectOptions(args.database_url, application_name="glisk-noop-worker", pooler=pooler)
    stop = asyncio.Event()
    install_stop_signals(stop)
    chosen = handlers(args.sleep)
    workers = [
        Worker(
            stage,
            chosen[stage],
            connect,
            batch=args.batch if stage != StageName.REVEAL else None,
            concurrency=args.concurrency if stage != StageName.REVEAL else None,
            lease_seconds=args.lease,
            max_attempts=args.max_attempts,
            poll_interval=args.poll,
            listen=False if args.no_listen else None,
        )
        for stage in stages
    ]
    results = await asyncio.gather(
        *(worker.run(stop, exit_when_idle=args.exit_when_idle) for worker in workers)
    )
    for stage, stats in zip(stages, results, strict=True):
        print(json.dumps({"stage": stage.value, **asdict(stats)}), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    hold_stop_signals()  # a stop before the worker is up is a clean stop too
    parser = argparse.ArgumentParser(prog="python -m glisk.workers.noop")
    # Default DATABASE_URL: a URL on the command line (with its password) is visible in `ps`.
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    parser.add_argument("--stages", default="image,upload,reveal")
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds each handler takes")
    parser.add_argument("--batch", type=int, default=None, help="image/upload batch size")
    parser.add_argument("--concurrency", type=int, default=None, help="image/upload handlers")
    parser.add_argument("--lease", type=float, default=60.0)
    parser.add_argument("--max-attempts", type=int, default=3)
    parser.add_argument("--poll", type=float, default=1.0)
    parser.add_argument("--no-listen", action="store_true", help="poll only (no LISTEN)")
    parser.add_argument("--exit-when-idle", action="store_true")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    if not args.database_url:
        parser.error("--database-url or DATABASE_URL is required")
    asyncio.run(_main(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
