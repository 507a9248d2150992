"""The /health probe: every probe is answered by a SELECT 1 sent after it arrived, probes that
arrive together share one, and the process keeps one connection for them."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import psycopg

from glisk.api.health import DatabaseProbe
from glisk.core.database import psycopg_connect_kwargs
from glisk.testing import libpq_kwargs
from tests.support.database import Database
from tests.support.waiting import eventually


class HoldingProxy:
    """A TCP proxy to PostgreSQL (on TCP or on its Unix socket) that can hold the server's
    answers (``hold``/``release``), so a test decides when a query in flight gets its answer."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.server: asyncio.Server | None = None
        self.port = 0
        self.handlers: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> HoldingProxy:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        self.flowing.set()
        for handler in self.handlers:
            handler.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)
        await self.server.wait_closed()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        host, port = self.target
        if host.startswith("/"):  # a socket directory
            server_r, server_w = await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
        else:
            server_r, server_w = await asyncio.open_connection(host, port)
        await asyncio.gather(
            self._pipe(client_r, server_w, gate=False),
            self._pipe(server_r, client_w, gate=True),
            return_exceptions=True,
        )

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, gate: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                if gate:
                    await self.flowing.wait()
                writer.write(data)
                await writer.drain()
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    def hold(self) -> None:
        self.flowing.clear()

    def release(self) -> None:
        self.flowing.set()


def _kwargs(database: Database, **override: Any) -> dict[str, Any]:
    return {**psycopg_connect_kwargs(database.url, pooler=database.pooler), **override}


async def test_a_probe_arriving_while_a_select_is_in_flight_is_answered_by_the_next_one(
    postgres_container: Database,
) -> None:
    server = libpq_kwargs(postgres_container.url)
    host, port = str(server.get("host", "127.0.0.1")), str(server.get("port", 5432))
    async with HoldingProxy(host, int(port)) as proxy:
        probe = DatabaseProbe(_kwargs(postgres_container, host="127.0.0.1", port=proxy.port))
        try:
            await probe.check()  # the connection is open; one SELECT 1 sent
            proxy.hold()
            first = asyncio.create_task(probe.check(within=10))
            await eventually(lambda: probe.sent == 2, 5, "the first probe's SELECT 1 sent")
            await asyncio.sleep(0.05)
            later = [asyncio.create_task(probe.check(within=10)) for _ in range(2)]
            await asyncio.sleep(0.05)
            assert not first.done() and not any(task.done() for task in later)
            proxy.release()
            await asyncio.gather(first, *later)
        finally:
            await probe.aclose()
    # The two later probes came while first's SELECT 1 was in flight: its answer predates them,
    # so they were answered by a third SELECT 1, which they shared (not one each).
    assert probe.sent == 3


def _count_named(url: str, application_name: str) -> int:
    with psycopg.connect(**libpq_kwargs(url), autocommit=True) as conn:  # type: ignore[arg-type]
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            (application_name,),
        ).fetchone()
    assert row is not None
    return int(row[0])


async def test_concurrent_probes_share_one_connection_which_aclose_closes(
    postgres_container: Database,
) -> None:
    server = postgres_container.direct_url or postgres_container.url
    name = "glisk-probe-connection-test"
    probe = DatabaseProbe(psycopg_connect_kwargs(server, application_name=name))
    try:
        await asyncio.gather(*(probe.check() for _ in range(200)))
        assert _count_named(server, name) == 1
        assert 1 <= probe.sent < 200  # shared: far fewer round trips than probes
    finally:
        await probe.aclose()
    # The server notices a moment later.
    await eventually(lambda: _count_named(server, name) == 0, 5, "the connection gone")
