"""Mint-delivering processes for the mint storm test (importable by a forkserver).

Each process plays one overlapping feed (a webhook, a block poller, a recovery pass): it records
every log of every payload with ``record_mint``, one unit of work per log, or (``batched``) each
payload with ``record_mints`` in one unit of work, and reports what each log's answer was. A
payload's remaining logs are delivered whatever an earlier one returned.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from glisk.core.database import engine_of, setup_db_session
from glisk.core.logs import configure_logging
from glisk.core.timezone import enforce_utc
from glisk.models import MintConflict, MintLog
from glisk.uow import create_uow_factory


async def _deliver(
    url: str, payloads: list[list[dict[str, Any]]], start_at: float, batched: bool
) -> dict[str, Any]:
    enforce_utc()
    configure_logging("development", "WARNING")  # a line per commit would dominate the run
    factory = setup_db_session(url, pool_size=1, max_overflow=0)
    uow_factory = create_uow_factory(factory)
    new: list[list[Any]] = []
    authors_created: list[str] = []
    repeats = 0
    errors: list[str] = []
    try:
        async with uow_factory() as uow:  # connect before the start line, not after it
            await uow.session.connection()
        await asyncio.sleep(max(0.0, start_at - time.time()))
        for payload in payloads:
            if batched:
                logs = [MintLog.from_json(raw) for raw in payload]
                async with uow_factory() as uow:
                    outcomes = await uow.mint_events.record_mints(logs)
                for outcome in outcomes:
                    if outcome.status == "new":
                        new.append(list(outcome.log.key))
                    elif outcome.status == "duplicate":
                        repeats += 1
                    else:
                        errors.append(str(outcome.conflict))
                    if outcome.author_created:
                        authors_created.append(outcome.log.author.lower())
                continue
            for raw in payload:
                log = MintLog.from_json(raw)
                try:
                    async with uow_factory() as uow:
                        result = await uow.mint_events.record_mint(log)
                except MintConflict as exc:
                    errors.append(str(exc))
                    continue
                if result.new:
                    new.append(list(log.key))
                else:
                    repeats += 1
                if result.author_created:
                    authors_created.append(log.author.lower())
    finally:
        await engine_of(factory).dispose()
    return {"new": new, "repeats": repeats, "authors_created": authors_created, "errors": errors}


def deliver_mints(
    url: str, payloads: list[list[dict[str, Any]]], start_at: float, batched: bool = False
) -> dict[str, Any]:
    return asyncio.run(_deliver(url, payloads, start_at, batched))
