"""The claims a worker holds, how long each lease is certainly live, and the heartbeat.

A claim is held from the claim statement that made it (``hold``) until what its handler finished
is written, refused or given up (``forget``). For each held claim the worker knows:

- its lease's deadline on this process's monotonic clock: the database set the lease after the
  statement that set it was sent, so the send time plus ``lease_seconds`` is a lower bound;
- whether a heartbeat found it lost: someone else may hold the token now, and whatever this
  worker finishes for it will be refused;
- whether an outage touched it (a heartbeat or a write for it could not reach the database): if
  its lease runs out, the outage cost it, not the handler, so the token is given back (no attempt
  spent) rather than refused.

The holder is the name a worker's claims carry (the ``claimed_by`` column, ``Claim.holder``); the
same name labels its log lines and metrics (``worker=``). Not thread-safe: every caller runs on
the worker's event loop.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from glisk.workers import queries
from glisk.workers.claims import Claim
from glisk.workers.connection import DATABASE_ERRORS, Link
from glisk.workers.outage import Backoff, Outage
from glisk.workers.stats import WorkerStats


def default_holder() -> str:
    """host:pid:random, unique per run, so a restarted process never impersonates its old self."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def holder_named(holder: str | None, worker_id: str | None) -> str | None:
    """``holder``, or ``worker_id``: the deprecated name of the same keyword (a
    DeprecationWarning says so). Raises TypeError when both are given."""
    if worker_id is None:
        return holder
    if holder is not None:
        raise TypeError("give holder= or its deprecated name worker_id=, not both")
    warnings.warn(
        "worker_id= is deprecated: the holder name is given as holder=",
        DeprecationWarning,
        stacklevel=3,
    )
    return worker_id


class Leases:
    """The live-claim set; see the module docstring."""

    def __init__(self, stats: WorkerStats, log: Any, *, lease_seconds: float) -> None:
        self.lease_seconds = lease_seconds
        self._stats = stats
        self._log = log
        self._live: dict[uuid.UUID, Claim] = {}
        self._lease_until: dict[uuid.UUID, float] = {}
        self._lost: set[uuid.UUID] = set()
        self._troubled: set[uuid.UUID] = set()

    def hold(self, claims: Iterable[Claim], sent: float) -> None:
        """Claims a claim statement sent at ``sent`` (monotonic) returned."""
        for claim in claims:
            self._live[claim.claim_id] = claim
            self._lease_until[claim.claim_id] = sent + self.lease_seconds

    def live(self, claim_ids: Iterable[uuid.UUID]) -> list[Claim]:
        """The claims among ``claim_ids`` still held, in their order."""
        return [self._live[claim_id] for claim_id in claim_ids if claim_id in self._live]

    def until(self, claims: Iterable[Claim]) -> float:
        """When the first of these leases may run out (monotonic); now for a claim no longer
        held, or none."""
        now = time.monotonic()
        return min((self._lease_until.get(c.claim_id, now) for c in claims), default=now)

    def last_until(self, claims: Iterable[Claim], default: float) -> float:
        """When the last of these leases surely ran out (monotonic); ``default`` for a claim no
        longer held, or none."""
        return max((self._lease_until.get(c.claim_id, default) for c in claims), default=default)

    def trouble(self, claims: Iterable[Claim]) -> None:
        """An outage kept work for these claims from reaching the database."""
        self._troubled.update(claim.claim_id for claim in claims)

    def troubled(self, claim: Claim) -> bool:
        return claim.claim_id in self._troubled

    def forget(self, claims: Iterable[Claim]) -> None:
        """Nothing more will be written for these claims: they are no longer held."""
        for claim in claims:
            self._live.pop(claim.claim_id, None)
            self._lease_until.pop(claim.claim_id, None)
            self._lost.discard(claim.claim_id)
            self._troubled.discard(claim.claim_id)

    def refuse(self, claim: Claim, reason: str) -> None:
        """Count and log work dropped because this worker no longer holds the token."""
        self._stats.refused += 1
        self._log.warning("worker.refused", token_id=claim.token_id, reason=reason)

    def drop(self, claims: Sequence[Claim]) -> list[Claim]:
        """A handler stopped on LeaseLost: nothing to write. A claim the database refused is
        lost (refused and forgotten here). Returns the ones an outage kept from their checkpoint:
        the caller gives them back (no attempt spent) as soon as the database answers, unless
        someone took them over meanwhile."""
        troubled = [claim for claim in claims if claim.claim_id in self._troubled]
        for claim in claims:
            if claim.claim_id not in self._troubled:
                self.refuse(claim, "lease lost (checkpoint refused)")
                self.forget([claim])
        return troubled

    async def heartbeats(
        self, link: Link, outage: Outage, failed: Callable[[str, BaseException], bool]
    ) -> None:
        """Every third of the lease, extend all live claims in one statement on ``link`` (the
        write connection: serialised with the writes, so the two never deadlock). Claims found
        expired are lost: someone else may hold them now, and their results will be refused.
        ``failed`` counts a call that failed and says whether it was an outage: a beat that
        cannot reach the database is tried again at the outage's pace, so the first moment it
        answers, every lease still live is extended. Runs until cancelled."""
        failing = False
        backoff = Backoff(outage)
        while True:
            if failing:
                await backoff.wait()
            else:
                backoff.reset()
                await asyncio.sleep(self.lease_seconds / 3)
            live = [c for c in self._live if c not in self._lost]
            if not live:
                failing = False
                continue
            params = {"claim_ids": live, "lease_seconds": self.lease_seconds}
            sent = time.monotonic()
            try:
                rows = await link.fetch(queries.HEARTBEAT, params)
            except DATABASE_ERRORS as exc:
                failing = failed("heartbeat", exc)
                if failing:
                    self._troubled.update(live)
                continue
            outage.succeeded()
            failing = False
            kept = {row[0] for row in rows}
            for claim_id in kept:
                if claim_id in self._lease_until:
                    self._lease_until[claim_id] = sent + self.lease_seconds
            lost = [c for c in live if c not in kept and c in self._live]
            if lost:
                self._lost.update(lost)
                self._log.warning("worker.lease_lost", claims=len(lost))
