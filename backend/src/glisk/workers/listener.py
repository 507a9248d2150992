"""Wake-ups: LISTEN on a stage's channel and set an event when tokens become claimable.

The statements and triggers that make tokens claimable NOTIFY ``glisk_stage_<name>`` (new tokens
by the insert trigger of migration 0004, a stage's completions for the next stage, releases for
their own stage). The notification carries no data: the claim that follows decides what is there.
Polling stays the fallback, and the only mode with ``listen=False`` (PgBouncer's transaction mode
has no LISTEN); a lost listening connection is reopened after a pause, polling meanwhile.
"""

from __future__ import annotations

import asyncio
from contextlib import suppress
from typing import Any

import psycopg
import structlog

from glisk.workers.connection import DATABASE_ERRORS, ConnectOptions

log = structlog.get_logger("glisk.worker")

RECONNECT_DELAY = 1.0


class Listener:
    """``wake`` is set on every notification of ``channel``; run ``start()`` / ``stop()``."""

    def __init__(self, options: ConnectOptions, channel: str, wake: asyncio.Event) -> None:
        self.options = options
        self.channel = channel
        self.wake = wake
        self.listening = asyncio.Event()  # set while a LISTEN is in force (tests wait on it)
        self._task: asyncio.Task[None] | None = None
        self._conn: psycopg.AsyncConnection[Any] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"listen {self.channel}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.pgconn.finish()  # no round trip: LISTEN ends with the session

    async def _run(self) -> None:
        while True:
            try:
                await self._listen()
            except DATABASE_ERRORS as exc:
                log.warning("worker.listen_lost", channel=self.channel, error=str(exc)[:200])
            self.listening.clear()
            if self._conn is not None:
                self._conn.pgconn.finish()
                self._conn = None
            self.wake.set()  # something may have been missed while deaf: look once
            await asyncio.sleep(RECONNECT_DELAY)

    async def _listen(self) -> None:
        conn = self._conn = await self.options.connect()
        await conn.execute(f"LISTEN {self.channel}".encode())
        self.listening.set()
        # A keepalive-style timeout: notifies() returns after it, and the loop checks the
        # connection is still there (a SELECT 1 bounded like any worker statement).
        while True:
            async for _ in conn.notifies(timeout=30.0):
                self.wake.set()
            await asyncio.wait_for(conn.execute(b"SELECT 1"), self.options.timeout)
