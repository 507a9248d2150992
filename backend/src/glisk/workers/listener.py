"""Wake-ups: LISTEN on a stage's channel and set an event when tokens become claimable.

The statements and triggers that make tokens claimable NOTIFY ``glisk_stage_<name>`` (new tokens
by the insert trigger of migration 0004, a stage's completions for the next stage, releases for
their own stage). The notification carries no data: the claim that follows decides what is there.
Polling stays the fallback, and the only mode with ``listen=False`` (PgBouncer's transaction mode
has no LISTEN); a lost listening connection is reopened after a pause, polling meanwhile.

The listener is usually the first to notice a database going away (it waits on its socket). With
the worker's ``Outage`` it reports there instead of logging and reconnects with a ``Backoff``
of its own (up to the outage's cap; at once when another connection gets through after an
announced outage), so it does not churn when only new connections are refused (too many
clients) while the others work; only then does it log, once: ``worker.listen_lost`` and
``worker.listening``.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import suppress
from typing import Any

import psycopg
import structlog

from glisk.errors import first_line
from glisk.workers.connection import DATABASE_ERRORS, ConnectOptions
from glisk.workers.outage import Backoff, Outage

log = structlog.get_logger("glisk.worker")

RECONNECT_DELAY = 1.0  # without an Outage: the pause between two tries
# Failed tries in a row, while the other connections work, before the listener says it is deaf.
QUIET_FAILURES = 3


class Listener:
    """``wake`` is set on every notification of ``channel``; run ``start()`` / ``stop()``."""

    def __init__(
        self,
        options: ConnectOptions,
        channel: str,
        wake: asyncio.Event,
        *,
        outage: Outage | None = None,
    ) -> None:
        self.options = options
        self.channel = channel
        self.wake = wake
        self.outage = outage
        self._backoff = Backoff(outage) if outage is not None else None
        self.listening = asyncio.Event()  # set while a LISTEN is in force (tests wait on it)
        self._task: asyncio.Task[None] | None = None
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._failures = 0  # tries in a row that failed
        self._failing_since = 0.0  # monotonic time of the first of them
        self._said_lost = False

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
                self._lost(exc)
            self.listening.clear()
            if self._conn is not None:
                self._conn.pgconn.finish()
                self._conn = None
            self.wake.set()  # something may have been missed while deaf: look once
            await self._pause()

    def _lost(self, exc: BaseException) -> None:
        self._failures += 1
        if self.outage is None:
            log.warning("worker.listen_lost", channel=self.channel, error=first_line(exc))
            return
        outage = self.outage.failed(exc)
        since = self.outage.since
        if self._failures == 1:
            self._failing_since = since if since is not None else time.monotonic()
        if outage and (
            self._failures < QUIET_FAILURES or (since is not None and since <= self._failing_since)
        ):
            # Too soon to tell from a blip; or nothing got through since the listener began
            # failing: the database is down for everyone, and the outage's own line says so.
            return
        if not self._said_lost:
            self._said_lost = True
            assert self._backoff is not None
            delay = self._backoff.next_delay()
            log.warning(
                f"worker.listen_lost: {first_line(exc)} (polling; retrying every {delay:g} s)",
                channel=self.channel,
            )

    async def _pause(self) -> None:
        if self._backoff is None:
            await asyncio.sleep(RECONNECT_DELAY)
        else:
            await self._backoff.wait()

    async def _listen(self) -> None:
        conn = self._conn = await self.options.connect()
        await conn.execute(f"LISTEN {self.channel}".encode())
        self.listening.set()
        self._failures = 0
        if self.outage is not None and self._backoff is not None:
            self.outage.succeeded()
            self._backoff.reset()
        if self._said_lost:
            self._said_lost = False
            log.info("worker.listening", channel=self.channel)
        # A keepalive-style timeout: notifies() returns after it, and the loop checks the
        # connection is still there (a SELECT 1 bounded like any worker statement).
        while True:
            async for _ in conn.notifies(timeout=30.0):
                self.wake.set()
            await asyncio.wait_for(conn.execute(b"SELECT 1"), self.options.timeout)
