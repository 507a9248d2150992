"""Connections made for a pooler (DB_POOLER): in transaction mode psycopg prepares nothing on the
server; behind any pooler UTC is set with SET TIME ZONE instead of the `options` start-up
parameter (PgBouncer before 1.20 refuses it); the health probe follows the same rules.

What the client sends is checked on the server itself. The "through" tests use the suite's
connection: PgBouncer in transaction mode when GLISK_TEST_POOLER_URL is set (as in CI), where
each of these rules, broken, fails them; the server directly otherwise.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import text

from glisk.api.health import DatabaseProbe
from glisk.app import DatabaseUnavailableError, verify_database
from glisk.core.config import PoolerMode
from glisk.core.database import connect_args, create_db_engine, psycopg_connect_kwargs
from glisk.testing import libpq_kwargs, throwaway_database
from tests.support.database import Database, pooler_for

REPEATS = 12  # psycopg prepares a statement on its 5th run on a connection by default
STATEMENT = text("SELECT count(*) FROM pg_class WHERE relname = :name")


@pytest.fixture(scope="module")
def tokyo_url(postgres_container: Database) -> Iterator[str]:
    """A database on the suite's server whose default time zone is not UTC (direct URL)."""
    with throwaway_database(postgres_container.direct_url or postgres_container.url) as url:
        with psycopg.connect(**libpq_kwargs(url), autocommit=True) as conn:  # type: ignore[arg-type]
            name = sql.Identifier(conn.info.dbname)
            conn.execute(sql.SQL("ALTER DATABASE {} SET timezone TO 'Asia/Tokyo'").format(name))
        yield url


def test_connect_args_follow_the_pooler_mode() -> None:
    direct = connect_args()
    assert direct["options"] == "-c timezone=UTC"
    assert "prepare_threshold" not in direct
    session = connect_args(pooler="session")
    assert "options" not in session and "prepare_threshold" not in session
    transaction = connect_args(pooler="transaction", application_name="glisk-worker")
    assert "options" not in transaction
    assert transaction["prepare_threshold"] is None
    assert transaction["application_name"] == "glisk-worker"


@pytest.mark.parametrize(
    ("pooler", "prepared"), [("none", True), ("session", True), ("transaction", False)]
)
async def test_only_transaction_mode_keeps_psycopg_from_preparing_statements_on_the_server(
    tokyo_url: str, pooler: PoolerMode, prepared: bool
) -> None:
    engine = create_db_engine(tokyo_url, pool_size=1, max_overflow=0, pooler=pooler)
    try:
        async with engine.connect() as conn:
            for _ in range(REPEATS):
                await conn.execute(STATEMENT, {"name": "tokens_s0"})
            count = (
                await conn.execute(text("SELECT count(*) FROM pg_prepared_statements"))
            ).scalar_one()
    finally:
        await engine.dispose()
    assert (count > 0) is prepared


@pytest.mark.parametrize(
    ("pooler", "source"),
    # `options` arrives with the start-up packet ("client"); SET TIME ZONE is "session".
    [("none", "client"), ("session", "session"), ("transaction", "session")],
)
async def test_every_mode_runs_in_utc_and_only_the_direct_one_sends_the_options_parameter(
    tokyo_url: str, pooler: PoolerMode, source: str
) -> None:
    engine = create_db_engine(tokyo_url, pool_size=1, max_overflow=0, pooler=pooler)
    try:
        async with engine.connect() as conn:
            row = (
                await conn.execute(
                    text("SELECT setting, source FROM pg_settings WHERE name = 'TimeZone'")
                )
            ).one()
    finally:
        await engine.dispose()
    assert tuple(row) == ("UTC", source)
    with psycopg.connect(**libpq_kwargs(tokyo_url), autocommit=True) as conn:  # type: ignore[arg-type]
        assert conn.execute("SHOW TimeZone").fetchone() == ("Asia/Tokyo",)  # the control


async def test_through_the_suites_connection_concurrent_transactions_stay_utc_and_never_fail(
    tokyo_url: str,
) -> None:
    # Behind PgBouncer in transaction mode every transaction below may run on another server
    # connection: a statement psycopg had prepared on one would be missing on the next, and the
    # pooler must restore each client's time zone on whichever connection it hands out.
    url, pooler = pooler_for(tokyo_url)
    engine = create_db_engine(url, pool_size=6, max_overflow=0, pooler=pooler)

    async def client() -> set[str]:
        zones: set[str] = set()
        for _ in range(REPEATS):
            async with engine.begin() as conn:
                await conn.execute(STATEMENT, {"name": "tokens_s0"})
                zones.add((await conn.execute(text("SHOW TimeZone"))).scalar_one())
            await asyncio.sleep(0)  # let the other clients' transactions interleave
        return zones

    try:
        results = await asyncio.gather(*(client() for _ in range(6)))
    finally:
        await engine.dispose()
    assert set().union(*results) == {"UTC"}


async def test_through_the_suites_connection_the_health_probe_answers_repeated_probes(
    tokyo_url: str,
) -> None:
    url, pooler = pooler_for(tokyo_url)
    probe = DatabaseProbe(psycopg_connect_kwargs(url, pooler=pooler))
    try:
        for _ in range(REPEATS):  # the same SELECT 1 on the same connection, again and again
            await asyncio.gather(*(probe.check() for _ in range(8)))
    finally:
        await probe.aclose()


async def _pgbouncer_refusing_options(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """What PgBouncer before 1.20 answers a start-up packet carrying `options`: no to TLS, then
    FATAL 08P01 "unsupported startup parameter: options"."""
    length = int.from_bytes(await reader.readexactly(4), "big")
    body = await reader.readexactly(length - 4)
    if body[:4] == (80877103).to_bytes(4, "big"):  # SSLRequest
        writer.write(b"N")
        length = int.from_bytes(await reader.readexactly(4), "big")
        body = await reader.readexactly(length - 4)
    assert b"options\x00" in body
    fields = b"SFATAL\x00VFATAL\x00C08P01\x00Munsupported startup parameter: options\x00\x00"
    writer.write(b"E" + (len(fields) + 4).to_bytes(4, "big") + fields)
    await writer.drain()
    writer.close()


async def test_a_pooler_refusing_options_without_db_pooler_fails_in_one_line_naming_db_pooler() -> (
    None
):
    server = await asyncio.start_server(_pgbouncer_refusing_options, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(DatabaseUnavailableError) as info:
            await verify_database(f"postgresql+psycopg://glisk@127.0.0.1:{port}/glisk", 2.0)
    finally:
        server.close()
        await server.wait_closed()
    message = str(info.value)
    assert "\n" not in message
    assert "unsupported startup parameter: options" in message
    assert "set DB_POOLER=transaction or session" in message
