"""A worker process running the leased stages with no-op handlers.

For chaos tests, load tests and smoke tests of the coordination layer, not for production:
``python -m glisk.workers.noop --database-url URL [--stages image,upload,reveal] [--sleep S]``.
Prints its WorkerStats as one JSON line per stage on exit. SIGTERM drains like a real worker.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict

from glisk.core.database import engine_of, setup_db_session
from glisk.core.logs import configure_logging
from glisk.core.timezone import enforce_utc
from glisk.models.stages import StageName
from glisk.repositories.token_lease import Claim
from glisk.uow import create_uow_factory
from glisk.workers.loop import install_stop_signals, run_worker


def _handlers(sleep: float) -> dict[StageName, object]:
    async def image(claim: Claim) -> str:
        await asyncio.sleep(sleep)
        return f"/images/{claim.token_id}.png"

    async def upload(claim: Claim) -> str:
        await asyncio.sleep(sleep)
        return f"bafy-noop-{claim.token_id}"

    async def reveal(claims: Sequence[Claim]) -> str:
        await asyncio.sleep(sleep)
        digest = hashlib.sha256(",".join(str(c.token_id) for c in claims).encode()).hexdigest()
        return "0x" + digest

    return {StageName.IMAGE: image, StageName.UPLOAD: upload, StageName.REVEAL: reveal}


async def _main(args: argparse.Namespace) -> None:
    enforce_utc()
    configure_logging("development", args.log_level)
    stages = [StageName(s) for s in args.stages.split(",")]
    factory = setup_db_session(args.database_url, pool_size=len(stages) + 1, max_overflow=2)
    uow_factory = create_uow_factory(factory)
    stop = asyncio.Event()
    install_stop_signals(stop)
    handlers = _handlers(args.sleep)
    try:
        results = await asyncio.gather(
            *(
                run_worker(
                    stage,
                    handlers[stage],  # type: ignore[arg-type]
                    uow_factory,
                    batch=args.batch if stage != StageName.REVEAL else None,
                    lease_seconds=args.lease,
                    max_attempts=args.max_attempts,
                    poll_interval=args.poll,
                    stop=stop,
                    exit_when_idle=args.exit_when_idle,
                )
                for stage in stages
            )
        )
    finally:
        await engine_of(factory).dispose()
    for stage, stats in zip(stages, results, strict=True):
        print(json.dumps({"stage": stage.value, **asdict(stats)}), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glisk.workers.noop")
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--stages", default="image,upload,reveal")
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds each handler takes")
    parser.add_argument("--batch", type=int, default=None, help="image/upload batch size")
    parser.add_argument("--lease", type=float, default=60.0)
    parser.add_argument("--max-attempts", type=int, default=3)
    parser.add_argument("--poll", type=float, default=1.0)
    parser.add_argument("--exit-when-idle", action="store_true")
    parser.add_argument("--log-level", default="WARNING")
    asyncio.run(_main(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
