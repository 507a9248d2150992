"""Mint storm: eight processes deliver overlapping, reordered and repeated mint logs (batch mints
included) at once, log by log through record_mint or payload by payload through record_mints. Each log must be recorded once, each token must exist once
with its author, and the deliveries reported as new must add up to exactly the distinct logs."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

import pytest
from sqlalchemy import text

from glisk.standins.mint_feed import MintFeed
from glisk.uow import UnitOfWorkFactory
from tests.support.database import Database
from tests.support.mint_proc import deliver_mints

TOKENS = 1200
PROCESSES = 8


@pytest.mark.slow
@pytest.mark.parametrize("batched", [False, True], ids=["record_mint", "record_mints"])
async def test_eight_processes_delivering_overlapping_repeated_logs_record_each_mint_once(
    uow_factory: UnitOfWorkFactory, postgres_container: Database, batched: bool
) -> None:
    feed = MintFeed.generate(tokens=TOKENS, seed=13, authors=40, max_batch=5)
    streams = feed.streams(PROCESSES, seed=14, share=0.4)
    wire = [[[log.to_json() for log in payload] for payload in stream] for stream in streams]
    deliveries = sum(len(payload) for stream in streams for payload in stream)

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tests.support.mint_proc"])
    loop = asyncio.get_running_loop()
    start_at = time.time() + 2.0  # every process connected and waiting: they start together
    with ProcessPoolExecutor(max_workers=PROCESSES, mp_context=context) as pool:
        reports = await asyncio.gather(
            *(
                loop.run_in_executor(
                    pool, deliver_mints, postgres_container.url, stream, start_at, batched
                )
                for stream in wire
            )
        )

    assert [e for r in reports for e in r["errors"]] == []
    new = Counter(tuple(key) for r in reports for key in r["new"])
    assert max(new.values()) == 1, "a log was reported new twice"
    assert set(new) == {log.key for log in feed.logs}, "a log was never reported new"
    assert sum(len(r["new"]) for r in reports) == len(feed.logs)
    assert sum(len(r["new"]) + r["repeats"] for r in reports) == deliveries
    assert sum(1 for r in reports if r["new"]) >= 4, "the work was not actually shared"
    wallets = {log.author.lower() for log in feed.logs}
    created = Counter(w for r in reports for w in r["authors_created"])
    assert set(created) == wallets and max(created.values()) == 1

    expected = {t: log for log in feed.logs for t in log.token_ids}
    async with uow_factory() as uow:
        events = (
            await uow.session.execute(
                text("SELECT tx_hash, log_index, token_id, quantity FROM mint_events")
            )
        ).all()
        tokens = (
            await uow.session.execute(
                text(
                    "SELECT t.token_id, lower(a.wallet_address), t.minter_address, "
                    "t.mint_timestamp, t.status::text "
                    "FROM tokens_s0 t JOIN authors a ON a.id = t.author_id"
                )
            )
        ).all()
        authors = (await uow.session.execute(text("SELECT count(*) FROM authors"))).scalar()
        assert await uow.tokens.missing_token_ids(TOKENS) == []

    assert sorted((e[0], e[1]) for e in events) == sorted(log.key for log in feed.logs)
    assert all(expected[e[2]].quantity == e[3] for e in events)
    assert sorted(t[0] for t in tokens) == list(range(1, TOKENS + 1))
    for token_id, author, minter, minted_at, status in tokens:
        log = expected[token_id]
        assert (author, minter, minted_at, status) == (
            log.author.lower(),
            log.minter,
            log.block_timestamp,
            "detected",
        )
    assert authors == len(wallets)
    print(
        f"mint storm: {len(feed.logs)} logs ({TOKENS} tokens) in {deliveries} deliveries by "
        f"{PROCESSES} processes; {deliveries - len(feed.logs)} repeats recorded nothing"
    )
