"""Claiming: the claim statement on the worker's claims connection, and what its rows say.

A claim asks for up to ``size`` tokens of the stage and returns them leased to ``holder``; the
leases are held from then on (``Leases.hold``). The same statement fails tokens that used their
attempts (``worker.exhausted``) and takes over tokens whose lease ran out (``worker.rescue``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from glisk.pipeline import Stage
from glisk.workers import queries
from glisk.workers.claims import Claim, claim_batch
from glisk.workers.connection import DATABASE_ERRORS, Link
from glisk.workers.leases import Leases
from glisk.workers.outage import Backoff
from glisk.workers.retry import DB_RETRY_DELAY
from glisk.workers.signals import wait_any
from glisk.workers.stats import WorkerStats
from glisk.workers.writes import Writer


class Claimer:
    """Claims for one holder on ``link``; database failures are counted by ``writer.failed``.
    ``backoff`` paces claims while the database cannot be reached."""

    def __init__(
        self,
        stage: Stage,
        link: Link,
        leases: Leases,
        writer: Writer,
        stats: WorkerStats,
        log: Any,
        *,
        holder: str,
        max_attempts: int,
        poll_interval: float,
    ) -> None:
        self.stage = stage
        self._link = link
        self._leases = leases
        self._writer = writer
        self._stats = stats
        self._log = log
        self._params = {
            "holder": holder,
            "lease_seconds": leases.lease_seconds,
            "max_attempts": max_attempts,
        }
        self._poll_interval = poll_interval
        self.backoff = Backoff(writer.outage)

    async def claim(self, size: int, stop: asyncio.Event) -> list[Claim] | None:
        """Claim up to ``size`` tokens, held from now on; None when the database failed (after
        waiting as long as the failure asks: the outage's next try, or a statement error's
        retry delay; a set ``stop`` cuts the wait short)."""
        sent = time.monotonic()
        try:
            rows = await self._link.fetch(queries.claim(self.stage, size), self._params)
        except DATABASE_ERRORS as exc:
            if self._writer.failed("claim", exc):
                await self.backoff.wait(stop)
            else:
                await wait_any(stop, seconds=DB_RETRY_DELAY)
            return None
        self._writer.outage.succeeded()
        self.backoff.reset()
        batch = claim_batch(rows)
        for gone in batch.exhausted:
            self._stats.exhausted += 1
            self._log.warning(
                "worker.exhausted",
                token_id=gone.token_id,
                attempts=gone.attempts,
                last_holder=gone.last_holder,
            )
        self._leases.hold(batch.claims, sent)
        for claim in batch.claims:
            if claim.rescued_from is not None:
                self._stats.rescued += 1
                self._log.info(
                    "worker.rescue",
                    token_id=claim.token_id,
                    previous_holder=claim.rescued_from,
                    attempt=claim.attempt,
                )
        if batch.claims:
            self._stats.claimed += len(batch.claims)
            self._stats.batches += 1
            self._log.debug("worker.claim", count=len(batch.claims))
        return batch.claims

    async def next_backoff(self) -> float | None:
        """Seconds until the stage's first token waiting out a backoff may be claimed; None
        when none waits. ``poll_interval`` when the database could not be asked."""
        try:
            rows = await self._link.fetch(queries.next_backoff(self.stage), {})
        except DATABASE_ERRORS as exc:
            self._writer.failed("next_backoff", exc)
            return self._poll_interval
        self._writer.outage.succeeded()
        return None if rows[0][0] is None else max(0.0, float(rows[0][0]))
