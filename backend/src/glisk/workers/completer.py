"""Writing what handlers finished: results, failures and give-backs, in batches, kept through an
outage.

The executor (and the reveal settle step) hand the completer what finished: ``add_results``,
``add_failures``, ``release`` (work that never started) and ``give_back`` (work an outage kept
from being recorded). ``run`` writes them: one statement per kind (``queries.complete``,
``fail``, ``release``), each token fenced on its own claim, so a lost claim is refused alone;
results that finish within ``completion_window`` of each other share the statement.

When the database cannot be reached, nothing finished is dropped: what was not written is kept,
in order, for the next flush, and ``writable`` is cleared (the claimer makes no claim while it is:
this worker would take its own tokens over and spend an attempt). A kept result is given up only
when the database, answering again, says its lease ran out (then the token is given back without
spending an attempt, unless another worker took it over meanwhile), or when the worker must stop
first. Given-up results are named in an ERROR line (``worker.results_given_up``) and counted in
``stats.given_up``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from glisk.errors import ConstraintViolation, first_line
from glisk.pipeline import Stage
from glisk.workers import queries
from glisk.workers.claims import Claim
from glisk.workers.connection import DATABASE_ERRORS
from glisk.workers.leases import Leases
from glisk.workers.outage import Backoff, unreachable
from glisk.workers.retry import Failure, error_record
from glisk.workers.stats import WorkerStats
from glisk.workers.writes import Writer

# Why results are given up (the ERROR line's reason).
LEASE_RAN_OUT = "the lease ran out while the database could not be reached"
STOPPED_UNREACHABLE = "the worker stopped while the database could not be reached"


class Completer:
    """Buffers what handlers finished and writes it through ``writer``; see the module
    docstring. Not thread-safe: every caller runs on the worker's event loop."""

    def __init__(
        self,
        stage: Stage,
        writer: Writer,
        leases: Leases,
        stats: WorkerStats,
        log: Any,
        *,
        max_attempts: int,
        completion_window: float,
        drain_timeout: float | None,
        stopping: asyncio.Event,
    ) -> None:
        self.stage = stage
        self._writer = writer
        self._leases = leases
        self._stats = stats
        self._log = log
        self._max_attempts = max_attempts
        self._completion_window = completion_window
        self._drain_timeout = drain_timeout
        self._stopping = stopping
        self._stop_at: float | None = None
        # What waits to be written; kept (in order) while the database cannot be reached.
        self._results: list[tuple[Claim, str]] = []
        self._failures: list[Failure] = []
        self._releases: list[Claim] = []
        # Set while nothing waits for an unreachable database; claims are made only then.
        self.writable = asyncio.Event()
        self.writable.set()
        self._flush_wanted = asyncio.Event()
        self._flush_lock = asyncio.Lock()

    # -- what the executor hands over --------------------------------------------------------

    def add_results(self, results: Iterable[tuple[Claim, str]]) -> None:
        self._results.extend(results)

    def add_failures(self, failures: Iterable[Failure]) -> None:
        self._failures.extend(failures)

    def release(self, claims: list[Claim]) -> None:
        """Queue claims whose work never started (a drain) to be given back, no attempt spent."""
        self._releases.extend(claims)
        self._flush_wanted.set()

    def give_back(self, claims: list[Claim]) -> None:
        """Queue claims to be released (no attempt spent) because an outage, not their handler,
        kept their work from being recorded. Nothing is claimed until that is written: this
        worker would otherwise take its own tokens over, spending an attempt."""
        if claims:
            self._releases.extend(claims)
            self.writable.clear()
            self._flush_wanted.set()

    def flush_soon(self) -> None:
        """A handler finished: wake ``run``."""
        self._flush_wanted.set()

    def pending(self) -> bool:
        return bool(self._results or self._failures or self._releases)

    # -- the loop ----------------------------------------------------------------------------

    async def run(self, busy: Callable[[], bool]) -> None:
        """Write what is handed over until ``finish`` was called and nothing is left, or, while
        the database cannot be reached, until the stop's deadline (``give_up_kept`` then says
        what was never written). ``busy`` says whether handlers are running (more results are
        coming: they may join the write)."""
        backoff = Backoff(self._writer.outage)
        while True:
            if not self.pending():
                if self._stopping.is_set():
                    return
                await self._flush_wanted.wait()
                self._flush_wanted.clear()
                if busy() and self._completion_window > 0 and not self._stopping.is_set():
                    # More results are coming: let them join this write.
                    await asyncio.sleep(self._completion_window)
            if await self.flush() is None:
                backoff.reset()
                continue
            # The database could not be reached: everything stays kept. Try again when it may be
            # back; a stopping worker gives up at its deadline (run() then logs what).
            stopping = self._stopping.is_set()
            if stopping and time.monotonic() >= self._give_up_at():
                return
            await backoff.wait(self._stopping, until=self._give_up_at() if stopping else None)

    def stop_requested(self) -> None:
        """The worker was asked to stop: the deadline for what it keeps counts from now."""
        if self._stop_at is None:
            self._stop_at = time.monotonic()

    def finish(self) -> None:
        """Ask ``run`` to write what is left and return (not cancelled: a write cut off
        mid-statement would leave finished tokens to be redone after their leases run out)."""
        self.stop_requested()
        self._stopping.set()
        self._flush_wanted.set()

    def _give_up_at(self) -> float:
        """When a stopping worker gives up on what an unreachable database kept from being
        written: ``drain_timeout`` after the stop, else when the last kept lease surely ran out
        (after that nothing could be completed anyway)."""
        stop_at = self._stop_at if self._stop_at is not None else time.monotonic()
        if self._drain_timeout is not None:
            return stop_at + self._drain_timeout
        kept = [c for c, _ in self._results] + [f.claim for f in self._failures] + self._releases
        return self._leases.last_until(kept, stop_at)

    async def flush(self) -> BaseException | None:
        """Write every result, failure and give-back gathered so far: one statement per kind.
        Returns None once everything gathered before the call is written, refused or given up;
        the error when the database could not be reached (what was not written is kept, in
        order, for the next flush)."""
        async with self._flush_lock:
            results, self._results = self._results, []
            if results and (error := await self._complete(results)) is not None:
                return error
            failures, self._failures = self._failures, []
            if failures and (error := await self._fail(failures)) is not None:
                return error
            releases, self._releases = self._releases, []
            if releases and (error := await self._release(releases)) is not None:
                return error
            if not self._releases:  # a give-back queued meanwhile keeps claims waiting for it
                self.writable.set()
            return None

    # -- the statements ----------------------------------------------------------------------

    def _kept(self, claims: Iterable[Claim]) -> None:
        """Work for these claims could not be written: the outage touched them."""
        self._leases.trouble(claims)
        self.writable.clear()

    async def _complete(self, results: list[tuple[Claim, str]]) -> BaseException | None:
        params = {
            "claim_ids": [claim.claim_id for claim, _ in results],
            "results": [value for _, value in results],
        }
        try:
            rows = await self._writer.write("complete", queries.complete(self.stage), params)
        except ConstraintViolation as exc:
            if len(results) > 1:  # find the one the database refuses; complete the others
                for i, one in enumerate(results):
                    if (error := await self._complete([one])) is not None:
                        rest = results[i + 1 :]
                        self._results[1:1] = rest  # after the one kept, in their order
                        self._kept(claim for claim, _ in rest)
                        return error
                return None
            claim, _ = results[0]
            self._failures.append(Failure(claim, error_record(exc), "retry", 0.0))
            return None
        except DATABASE_ERRORS as exc:
            if unreachable(exc):
                self._results[:0] = results
                self._kept(claim for claim, _ in results)
                return exc
            self._give_up([claim for claim, _ in results], f"database error: {first_line(exc)}")
            self._leases.forget(claim for claim, _ in results)
            return None
        done = {row[0] for row in rows}
        done |= await self._recorded_meanwhile([r for r in results if r[0].claim_id not in done])
        given_up: list[Claim] = []
        for claim, _ in results:
            if claim.claim_id in done:
                self._stats.completed += 1
            elif self._leases.troubled(claim):
                given_up.append(claim)
            else:
                self._leases.refuse(claim, "lease lost before completion")
        if done:
            self._log.info("worker.complete", count=len(done))
        giving_back = {claim.claim_id for claim in given_up}
        self._leases.forget(claim for claim, _ in results if claim.claim_id not in giving_back)
        if given_up:
            # The handler succeeded; only the outage kept its result out. Give the token back
            # (no attempt spent) unless someone took it over meanwhile.
            self._give_up(given_up, LEASE_RAN_OUT, giving_back=True)
            self.give_back(given_up)
        return None

    async def _recorded_meanwhile(self, refused: list[tuple[Claim, str]]) -> set[uuid.UUID]:
        """The claim ids, among results the database refused, that an earlier try of the same
        completion did write (its answer was lost): their token holds this very result. Asked
        only for results an outage touched; on any error, none."""
        troubled = [(claim, value) for claim, value in refused if self._leases.troubled(claim)]
        if not troubled:
            return set()
        params = {
            "token_ids": [claim.token_uuid for claim, _ in troubled],
            "results": [value for _, value in troubled],
        }
        try:
            rows = await self._writer.write("recorded", queries.recorded(self.stage), params)
        except DATABASE_ERRORS:
            return set()
        found = {row[0] for row in rows}
        return {claim.claim_id for claim, _ in troubled if claim.token_uuid in found}

    async def _fail(self, failures: list[Failure]) -> BaseException | None:
        params = {
            "claim_ids": [f.claim.claim_id for f in failures],
            "errors": [json.dumps(f.error) for f in failures],
            "kinds": [f.kind for f in failures],
            "delays": [f.delay for f in failures],
            "max_attempts": self._max_attempts,
        }
        try:
            rows = await self._writer.write("fail", queries.fail(self.stage), params)
        except DATABASE_ERRORS as exc:
            if unreachable(exc):
                self._failures[:0] = failures
                self._kept(f.claim for f in failures)
                return exc
            self._give_up([f.claim for f in failures], f"database error: {first_line(exc)}")
            self._leases.forget(f.claim for f in failures)
            return None
        final = {row[0]: row[1] for row in rows}
        given_up: list[Failure] = []
        for f in failures:
            if f.claim.claim_id not in final:
                if self._leases.troubled(f.claim):
                    given_up.append(f)
                else:
                    self._leases.refuse(f.claim, "lease lost before the failure was recorded")
            elif f.kind == "defer":
                self._stats.deferred += 1
                self._log.info(
                    "worker.deferred", token_id=f.claim.token_id, seconds=f.delay, error=f.error
                )
            else:
                self._stats.failed += 1
                self._log.info(
                    "worker.fail",
                    token_id=f.claim.token_id,
                    attempt=f.claim.attempt,
                    final=final[f.claim.claim_id],
                    retry_in=None if final[f.claim.claim_id] else round(f.delay, 3),
                    error=f.error,
                )
        unwritten = {f.claim.claim_id for f in given_up}
        self._leases.forget(f.claim for f in failures if f.claim.claim_id not in unwritten)
        if given_up:
            # A deferral spends no attempt: give it back. A handler's failure did spend one,
            # which the next claim's takeover counts as it would have.
            back = [f.claim for f in given_up if f.kind == "defer"]
            self._give_up([f.claim for f in given_up], LEASE_RAN_OUT, giving_back=bool(back))
            self.give_back(back)
            self._leases.forget(f.claim for f in given_up if f.kind != "defer")
        return None

    async def _release(self, claims: list[Claim]) -> BaseException | None:
        """Give claims back without spending their attempt: work that never started (a drain),
        or that an outage kept from being recorded. Fenced by the claim id alone: a claim that
        still carries it was not taken over, even if its lease ran out."""
        params = {"claim_ids": [c.claim_id for c in claims]}
        try:
            rows = await self._writer.write("release", queries.release(self.stage), params)
        except DATABASE_ERRORS as exc:
            if unreachable(exc):
                self._releases[:0] = claims
                self.writable.clear()
                return exc
            rows = []  # they come back when their leases run out
        self._stats.released += len(rows)
        self._leases.forget(claims)
        self._log.info("worker.release", count=len(rows))
        return None

    # -- what is never written ---------------------------------------------------------------

    def _give_up(self, claims: list[Claim], reason: str, *, giving_back: bool = False) -> None:
        """Count and name results and failures that will never be recorded."""
        self._stats.given_up += len(claims)
        self._log.error(
            "worker.results_given_up",
            count=len(claims),
            tokens=sorted(claim.token_id for claim in claims),
            reason=reason,
            giving_back=giving_back,
        )

    def give_up_kept(self) -> None:
        """At the end of a stop that an outage outlasted: what is still kept is never written.
        The tokens come back when their leases run out, and that takeover counts an attempt."""
        claims = [c for c, _ in self._results] + [f.claim for f in self._failures]
        if claims:
            self._give_up(claims, STOPPED_UNREACHABLE)
        if self._releases:
            self._log.error(
                "worker.release_failed",
                count=len(self._releases),
                tokens=sorted(claim.token_id for claim in self._releases),
                reason=STOPPED_UNREACHABLE,
            )
        self._leases.forget([*claims, *self._releases])
        self._results, self._failures, self._releases = [], [], []
