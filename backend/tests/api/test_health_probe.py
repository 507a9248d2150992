"""The /health probe: a probe is answered by the first SELECT 1 answered after it arrived, so
probes that arrive together share one; a slow SELECT 1 does not fail the probes behind it (the
next sends another, on a second connection); a probe fails only when a query sent after it
arrived fails; the process keeps at most two connections for probes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
import structlog

from glisk.api.health import DatabaseProbe
from glisk.core.database import psycopg_connect_kwargs
from glisk.testing import libpq_kwargs
from tests.support.database import Database
from tests.support.proxy import Proxy, target_of
from tests.support.waiting import eventually


def _kwargs(database: Database, **override: Any) -> dict[str, Any]:
    return {**psycopg_connect_kwargs(database.url, pooler=database.pooler), **override}


@pytest.fixture
async def proxy(postgres_container: Database) -> AsyncIterator[Proxy]:
    async with Proxy(*target_of(postgres_container.url)) as running:
        yield running


async def test_probes_arriving_while_a_select_is_in_flight_share_its_answer(
    postgres_container: Database, proxy: Proxy
) -> None:
    kwargs = _kwargs(postgres_container, host="127.0.0.1", port=proxy.port)
    probe = DatabaseProbe(kwargs, hedge_after=30)  # never slow enough to send another
    try:
        await probe.check()  # the connection is open; one SELECT 1 sent
        proxy.hold()
        first = asyncio.create_task(probe.check(within=10))
        await eventually(lambda: probe.sent == 2, 5, "the first probe's SELECT 1 sent")
        later = [asyncio.create_task(probe.check(within=10)) for _ in range(2)]
        await asyncio.sleep(0.05)  # let them reach the shared query
        assert not first.done() and not any(task.done() for task in later)
        proxy.release()
        await asyncio.gather(first, *later)
    finally:
        await probe.aclose()
    assert probe.sent == 2, "the answer that came after they arrived answered them all"


async def test_a_slow_select_does_not_fail_the_probes_that_arrive_after_it(
    postgres_container: Database, proxy: Proxy
) -> None:
    kwargs = _kwargs(postgres_container, host="127.0.0.1", port=proxy.port)
    probe = DatabaseProbe(kwargs, hedge_after=0.2)
    try:
        await probe.check()
        proxy.hold()  # the open connection's next answer is stuck; new connections are not
        stuck = asyncio.create_task(probe.check(within=30))
        await eventually(lambda: probe.sent == 2, 5, "the stuck SELECT 1 sent")
        # Probes keep arriving, each with the usual one-second bound.
        answered = await asyncio.gather(*(probe.check() for _ in range(20)), return_exceptions=True)
        assert answered == [None] * 20, answered
        await asyncio.wait_for(stuck, 5)  # answered too: by a SELECT 1 sent after it arrived
        assert probe.sent == 3, "one more SELECT 1, on a second connection, for all of them"
    finally:
        proxy.release()
        await probe.aclose()


async def test_a_probe_fails_when_the_database_refuses_a_fresh_query_and_says_so_once(
    postgres_container: Database, proxy: Proxy
) -> None:
    kwargs = _kwargs(postgres_container, host="127.0.0.1", port=proxy.port)
    probe = DatabaseProbe(kwargs)
    try:
        await probe.check()
        with structlog.testing.capture_logs() as logs:
            await proxy.cut()
            for _ in range(3):
                with pytest.raises(psycopg.OperationalError):
                    await probe.check()
            await proxy.restore()
            await probe.check()
            await probe.check()
    finally:
        await probe.aclose()
    lines = [entry["event"] for entry in logs]
    assert len(lines) == 2, lines
    assert lines[0].startswith("health: database unreachable: connection failed"), lines
    assert lines[1].startswith("health: database back after"), lines


def _count_named(url: str, application_name: str) -> int:
    with psycopg.connect(**libpq_kwargs(url), autocommit=True) as conn:  # type: ignore[arg-type]
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            (application_name,),
        ).fetchone()
    assert row is not None
    return int(row[0])


async def test_concurrent_probes_share_a_connection_which_aclose_closes(
    postgres_container: Database,
) -> None:
    server = postgres_container.direct_url or postgres_container.url
    name = "glisk-probe-connection-test"
    probe = DatabaseProbe(psycopg_connect_kwargs(server, application_name=name))
    try:
        await asyncio.gather(*(probe.check() for _ in range(200)))
        assert 1 <= _count_named(server, name) <= 2  # two only if a SELECT 1 was slow
        assert 1 <= probe.sent < 200  # shared: far fewer round trips than probes
    finally:
        await probe.aclose()
    # The server notices a moment later.
    await eventually(lambda: _count_named(server, name) == 0, 5, "the connection gone")
