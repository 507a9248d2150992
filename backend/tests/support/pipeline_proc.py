"""Worker processes for the multi-process tests (importable by a spawned interpreter).

Each process runs the transactional pattern (README, "Two ways for workers to take tokens"): in
one unit of work, lock a batch with a worker query, change status with the Token methods, commit.
The upload stage takes a 'generating' token through 'uploading' to 'ready' in its transaction, as
the IPFS worker will. Every transition made is reported back to the parent.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from sqlalchemy import exists, select
from sqlmodel import col

from glisk.core.config import load_settings
from glisk.core.database import engine_of, setup_db_session
from glisk.core.logs import configure_logging
from glisk.core.timezone import enforce_utc
from glisk.models import InvalidStateTransition, Token, TokenStatus
from glisk.uow import UnitOfWork, create_uow_factory

BATCH = 20


async def _stage(uow: UnitOfWork, stage: str) -> list[tuple[str, str]]:
    done: list[tuple[str, str]] = []
    if stage == "generate":
        for t in await uow.tokens.get_pending_for_generation(BATCH):
            t.mark_generating()
            done.append((str(t.id), "generating"))
    elif stage == "upload":
        for t in await uow.tokens.get_pending_for_upload(BATCH):
            t.mark_uploading(f"/images/{t.token_id}.png")
            t.mark_ready(f"bafy-{t.token_id}")
            done += [(str(t.id), "uploading"), (str(t.id), "ready")]
    else:
        for t in await uow.tokens.get_ready_for_reveal(50):
            t.mark_revealed("0x" + f"{t.token_id:064x}")
            done.append((str(t.id), "revealed"))
    return done


async def _run(url: str, deadline_seconds: float) -> dict[str, Any]:
    enforce_utc()
    configure_logging("development", "WARNING")  # a line per commit would dominate the run
    factory = setup_db_session(
        url, pool_size=1, max_overflow=0, pooler=load_settings().db_pooler
    )  # DB_POOLER from the environment: a pooler may stand in between
    uow_factory = create_uow_factory(factory)
    done: list[tuple[str, str]] = []
    errors: list[str] = []
    stages = ["generate", "upload", "reveal"]
    offset = os.getpid() % len(stages)  # processes start on different stages
    deadline = time.monotonic() + deadline_seconds
    unfinished = exists().where(col(Token.status) != TokenStatus.REVEALED)
    try:
        while time.monotonic() < deadline:
            progressed = 0
            for stage in stages[offset:] + stages[:offset]:
                try:
                    async with uow_factory() as uow:
                        made = await _stage(uow, stage)
                    done += made  # only after the commit succeeded
                    progressed += len(made)
                except InvalidStateTransition as exc:
                    errors.append(str(exc))
            if progressed == 0:
                async with uow_factory() as uow:
                    if not (await uow.session.execute(select(unfinished))).scalar():
                        break
                await asyncio.sleep(0.01)
    finally:
        await engine_of(factory).dispose()
    return {"done": done, "errors": errors}


def run_pipeline_worker(url: str, deadline_seconds: float) -> dict[str, Any]:
    return asyncio.run(_run(url, deadline_seconds))
