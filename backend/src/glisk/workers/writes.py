"""The worker's writes: retried, waited out through an outage when a handler waits on them, and
every failed database call counted in one place.

Everything the worker writes goes through one connection (completions, failures, give-backs,
heartbeats, a handler's checkpoints): serialised, so those statements never deadlock each other.
Two kinds of caller:

- the completer, which keeps its work when the database cannot be reached and writes it later:
  ``write`` raises an unreachable database at once;
- a handler (``checkpoint``, ``record_reveal``, ``handler_write``) or the reveal settle step,
  which wait on the write: ``write_for`` waits an outage out while the claims' leases are
  certainly live, then raises LeaseLost so the handler stops before any external effect.

``failed`` is where every part of the worker reports a database call that failed (the claimer,
the heartbeats, the writes, the probe): it counts it, hands outages to the tracker (logged once
per episode) and logs statement errors. The tracker (``outage``) is built here because its probe
is this writer's.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from glisk.errors import ConstraintViolation, LeaseLost, first_line
from glisk.workers.claims import Claim
from glisk.workers.connection import DATABASE_ERRORS, Link
from glisk.workers.leases import Leases
from glisk.workers.outage import Backoff, Outage, unreachable
from glisk.workers.retry import DB_RETRIES, DB_RETRY_DELAY
from glisk.workers.stats import WorkerStats

Rows = list[tuple[Any, ...]]


class Writer:
    """Writes on ``link``; probes on ``claims_link``. See the module docstring."""

    def __init__(
        self,
        link: Link,
        claims_link: Link,
        leases: Leases,
        stats: WorkerStats,
        log: Any,
        *,
        stopping: asyncio.Event,
        reconnect_cap: float,
        rng: random.Random,
    ) -> None:
        self.link = link
        self._claims_link = claims_link
        self._leases = leases
        self._stats = stats
        self._log = log
        self._stopping = stopping
        # Every connection reports to the tracker; it logs an outage once and paces the
        # reconnections.
        self.outage = Outage(log, cap=reconnect_cap, probe=self.probe, rng=rng)

    async def write(
        self, step: str, query: str, params: dict[str, Any], *, until: float | None = None
    ) -> Rows:
        """Run a write on the write connection. A ConstraintViolation is raised at once (the
        same statement would fail the same way); another statement error is tried DB_RETRIES
        times. An unreachable database is raised at once when ``until`` is None (the caller
        keeps its work), else waited out (at the outage's pace) until ``until`` (monotonic)."""
        attempt = 0
        backoff = Backoff(self.outage)
        while True:
            try:
                rows = list(await self.link.fetch(query, params))
            except ConstraintViolation:
                raise
            except DATABASE_ERRORS as exc:
                attempt += 1
                if self.failed(step, exc, attempt=attempt):
                    if until is None or time.monotonic() >= until:
                        raise
                    await backoff.wait(until=until)
                    continue
                if attempt >= DB_RETRIES:
                    raise
                await asyncio.sleep(DB_RETRY_DELAY * attempt)
                continue
            self.outage.succeeded()
            return rows

    async def write_for(
        self, claims: Sequence[Claim], step: str, query: str, params: dict[str, Any]
    ) -> Rows:
        """A write a handler waits on (a checkpoint, a reveal's reconciliation): an unreachable
        database is waited out while the claims' leases are certainly live; after that
        LeaseLost tells the handler to stop before any external effect (another worker may take
        the tokens over once the leases run out), and the claims are marked as touched by the
        outage. Statement errors are raised as ``write`` raises them."""
        try:
            return await self.write(step, query, params, until=self._leases.until(claims))
        except ConstraintViolation:
            raise
        except DATABASE_ERRORS as exc:
            if not unreachable(exc):
                raise
            self._leases.trouble(claims)
            raise LeaseLost(
                "the database could not be reached before the lease would run out"
            ) from exc

    async def handler_write(
        self, claim_ids: Iterable[uuid.UUID], query: str, params: dict[str, Any]
    ) -> Sequence[tuple[Any, ...]]:
        """A statement of a running handler's (glisk.workers.checkpoints): ``write_for`` the
        claims among ``claim_ids`` this worker still holds."""
        return await self.write_for(self._leases.live(claim_ids), "checkpoint", query, params)

    @property
    def lease_seconds(self) -> float:
        return self._leases.lease_seconds

    def lease_left(self, claim_ids: Iterable[uuid.UUID]) -> tuple[float, float]:
        """(seconds the first of these leases certainly still lasts by this worker's clock, 0 for
        a claim no longer held; the lease length)."""
        ids = list(claim_ids)
        held = self._leases.live(ids)
        if len(held) < len(set(ids)):
            return 0.0, self._leases.lease_seconds
        left = self._leases.until(held) - time.monotonic()
        return max(0.0, left), self._leases.lease_seconds

    def failed(self, step: str, exc: BaseException, **fields: Any) -> bool:
        """Count a failed database call. An outage goes to the tracker (logged once per change);
        any other error is logged here. Returns whether it was an outage."""
        self._stats.db_errors += 1
        if self.outage.failed(exc):
            self._log.debug("worker.database_unreachable", step=step, error=first_line(exc))
            return True
        self._log.error(
            "worker.database_error",
            step=step,
            error={"type": type(exc).__name__, "message": first_line(exc)},
            **fields,
        )
        return False

    async def probe(self) -> None:
        """Called by the outage tracker at the first failure of an episode: one SELECT 1 on the
        claims connection (unless a claim is under way there), which tells a blip from an
        outage at once and reads the reason the server gave when it closed that connection.
        Not once the worker stops: its connections are being closed."""
        if self._claims_link.lock.locked() or self._stopping.is_set():
            return
        try:
            await self._claims_link.fetch("SELECT 1", {})
        except DATABASE_ERRORS as exc:
            self.failed("probe", exc)
        else:
            self.outage.succeeded()
