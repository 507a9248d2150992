"""The worker: claims sized to free slots, handlers run concurrently with no transaction open,
one heartbeat for every live claim, completions and failures written in batches, backoff, wake-up
on NOTIFY, a drain on stop, and results kept through a database outage.

A handler may run more than once for the same token: when its worker loses the lease while it
runs (a pause, a slow call, a crash after the side effect), another worker takes the token over
and runs the handler again. The late run's result is refused, but its side effects happened.
Handlers must be idempotent, or record progress before an external effect.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Literal

import structlog

from glisk.errors import ConstraintViolation, LeaseLost, PermanentError, RetryLater, first_line
from glisk.models import validation as v
from glisk.pipeline import Stage, StageName, resolve_stage
from glisk.workers import queries
from glisk.workers.checkpoints import HandlerScope, current_scope
from glisk.workers.claims import Claim, claim_batch
from glisk.workers.connection import DATABASE_ERRORS, ConnectOptions, Link
from glisk.workers.listener import Listener
from glisk.workers.outage import Backoff, Outage, unreachable
from glisk.workers.reveal import PendingReveal, Reconciler, pending_reveal_of

log = structlog.get_logger("glisk.worker")

TokenHandler = Callable[[Claim], Awaitable[str]]
# One result for the whole batch, one per claim (in order), or a mapping token uuid -> result.
BatchHandler = Callable[[Sequence[Claim]], Awaitable[str | Sequence[str] | Mapping[uuid.UUID, str]]]
Handler = TokenHandler | BatchHandler
FailureKind = Literal["retry", "permanent", "defer"]

# A statement the database refuses for another reason than an outage (a deadlock, a bug) is
# tried this many times, this far apart, then given up on. An outage is waited out instead (see
# Worker and glisk.workers.outage).
DB_RETRIES = 3
DB_RETRY_DELAY = 0.5
# Why results are given up (the ERROR line's reason).
LEASE_RAN_OUT = "the lease ran out while the database could not be reached"
STOPPED_UNREACHABLE = "the worker stopped while the database could not be reached"
# The ranges of the WORKER_* settings (glisk.core.config), enforced for callers of the API too.
MAX_LEASE_SECONDS = 86400.0
MAX_POLL_SECONDS = 3600.0
MAX_BACKOFF_SECONDS = 86400.0 * 7


@dataclass
class WorkerStats:
    claimed: int = 0
    completed: int = 0
    failed: int = 0  # attempts that failed (retried later or final)
    refused: int = 0  # results dropped because the lease had been lost
    released: int = 0  # claims given back without spending an attempt
    rescued: int = 0
    exhausted: int = 0
    batches: int = 0
    deferred: int = 0  # RetryLater honoured without spending an attempt
    db_errors: int = 0  # database calls that failed or timed out (each retried or given up)
    # Finished results and failures never recorded: the database could not be reached until
    # their leases ran out, or until the worker had to stop. Each is named in an ERROR line.
    given_up: int = 0
    disconnected_seconds: float = 0.0  # time with database calls failing (outages and blips)


@dataclass(frozen=True)
class _Failure:
    claim: Claim
    error: dict[str, Any]
    kind: FailureKind
    delay: float


def default_worker_id() -> str:
    """host:pid:random, unique per run, so a restarted process never impersonates its old self."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


# A stop signal that arrived before install_stop_signals (while the process was starting).
_stop_requested = False


def _remember_stop(signum: int, frame: object) -> None:
    global _stop_requested
    _stop_requested = True


def hold_stop_signals() -> None:
    """Call first thing in a worker process: a SIGTERM or SIGINT that arrives before the worker
    runs is remembered (install_stop_signals then stops at once, nothing claimed) instead of
    killing the process halfway through its start-up."""
    signal.signal(signal.SIGTERM, _remember_stop)
    signal.signal(signal.SIGINT, _remember_stop)


def install_stop_signals(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT set ``stop``: the worker stops claiming, lets the handlers in hand
    finish, records their results, gives back what never started, and returns."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if _stop_requested:
        stop.set()


def _error(exc: BaseException) -> dict[str, Any]:
    return {"type": type(exc).__name__, "message": str(exc)[:500]}


async def _wait_any(*events: asyncio.Event, seconds: float | None) -> None:
    """Return when one of ``events`` is set or ``seconds`` passed (None: no limit)."""
    if any(e.is_set() for e in events):
        return
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


class Worker:
    """Runs one stage's handler over claimed tokens until stopped.

    ``concurrency`` handlers run at once (one handler call per batch for the reveal stage, so
    there it counts batches); a claim asks only for free slots, at most ``batch`` tokens. The
    worker holds three database connections whatever its concurrency (claims, writes, LISTEN).
    Results that finish close together are written in one statement per kind, each token fenced
    on its own claim: a lost claim is refused alone. A failed attempt waits
    ``uniform(0, min(backoff_cap, backoff_base * 2**(attempt-1)))`` seconds (full jitter) before
    the token can be claimed again; ``RetryLater(s)`` waits exactly ``s`` and spends no attempt,
    at most ``max_deferrals`` times per token and stage.

    When the database cannot be reached, nothing finished is dropped: results, failures and
    give-backs are kept and written when it answers again, heartbeats keep trying (so a lease
    still live then is extended), and no new claim is made while anything waits to be written.
    Reconnection backs off up to ``reconnect_cap`` seconds. A result is given up only when the
    database, answering again, says its lease ran out (then the token is given back without
    spending an attempt, unless another worker took it over meanwhile), or when the worker must
    stop first (``drain_timeout`` after the stop). Given-up results are named in an ERROR line
    and counted in ``stats.given_up``. See README, "A database outage".
    """

    def __init__(
        self,
        stage: Stage | StageName | str,
        handler: Handler,
        connect: ConnectOptions,
        *,
        worker_id: str | None = None,
        concurrency: int | None = None,
        batch: int | None = None,
        lease_seconds: float = 60.0,
        max_attempts: int = 3,
        poll_interval: float = 1.0,
        backoff_base: float = 5.0,
        backoff_cap: float = 600.0,
        max_deferrals: int = 20,
        listen: bool | None = None,
        completion_window: float = 0.005,
        drain_timeout: float | None = None,
        reconnect_cap: float = 5.0,
        rng: random.Random | None = None,
    ) -> None:
        self.stage = resolve_stage(stage)
        self.handler = handler
        self.holder = v.text_length("worker_id", worker_id or default_worker_id(), 1, 255)
        self.batch = batch or self.stage.default_batch
        if not 1 <= self.batch <= self.stage.max_batch:
            raise v.FieldValidationError("batch", f"must be 1 to {self.stage.max_batch}", batch)
        if concurrency is None:
            # Per-token stages run a claimed batch at once; a reveal runs one batch at a time.
            concurrency = 1 if self.stage.whole_batch else self.batch
        self.concurrency = v.int_at_least("concurrency", concurrency, 1)
        # Finite and bounded as the WORKER_* settings are: a lease of 1e300 seconds is no lease,
        # and PostgreSQL's interval refuses it on every claim ("interval out of range").
        for name, value, most in (
            ("lease_seconds", lease_seconds, MAX_LEASE_SECONDS),
            ("poll_interval", poll_interval, MAX_POLL_SECONDS),
            ("reconnect_cap", reconnect_cap, MAX_POLL_SECONDS),
        ):
            if not 0 < value <= most:
                raise v.FieldValidationError(name, f"must be > 0 and at most {most:g}", value)
        for name, value, most in (
            ("backoff_base", backoff_base, MAX_BACKOFF_SECONDS),
            ("backoff_cap", backoff_cap, MAX_BACKOFF_SECONDS),
            ("completion_window", completion_window, MAX_POLL_SECONDS),
        ):
            if not 0 <= value <= most:
                raise v.FieldValidationError(name, f"must be >= 0 and at most {most:g}", value)
        self.lease_seconds = lease_seconds
        self.max_attempts = v.int_at_least("max_attempts", max_attempts, 1)
        self.poll_interval = poll_interval
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.max_deferrals = v.int_at_least("max_deferrals", max_deferrals, 0)
        # Default: LISTEN unless the connection options say a transaction pooler is in between.
        self.listen = connect.can_listen if listen is None else listen
        self.completion_window = completion_window
        self.drain_timeout = drain_timeout
        self.stats = WorkerStats()
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self._claims_db = Link(connect)
        self._writes_db = Link(connect)
        self._connect = connect
        self._log = log.bind(stage=self.stage.name, worker=self.holder)
        # Every connection reports here; it logs an outage once and paces the reconnections.
        self.outage = Outage(self._log, cap=reconnect_cap, probe=self._probe, rng=self._rng)
        self._claim_backoff = Backoff(self.outage)
        # Claims this worker holds: handlers running or results not yet written.
        self._live: dict[uuid.UUID, Claim] = {}
        # Until when each claim's lease is certainly live, on this process's monotonic clock:
        # the lease was set by the database after the statement that set it was sent.
        self._lease_until: dict[uuid.UUID, float] = {}
        self._lost: set[uuid.UUID] = set()
        # Claims touched by an outage (a heartbeat or a write for them could not reach the
        # database): if their lease runs out, the outage cost it, not the handler.
        self._troubled: set[uuid.UUID] = set()
        self._running: dict[asyncio.Task[None], list[Claim]] = {}
        # What waits to be written; kept (in order) while the database cannot be reached.
        self._results: list[tuple[Claim, str]] = []
        self._failures: list[_Failure] = []
        self._releases: list[Claim] = []
        # Set while nothing waits for an unreachable database; claims are made only then.
        self._writable = asyncio.Event()
        self._writable.set()
        self._slot_free = asyncio.Event()
        self._wake = asyncio.Event()
        self._flush_wanted = asyncio.Event()
        self._stopping = asyncio.Event()
        self._stop_at: float | None = None
        self._flush_lock = asyncio.Lock()
        # LISTEN on the stage's channel while running (no I/O until run()).
        self.listener = (
            Listener(connect, self.stage.channel, self._wake, outage=self.outage)
            if self.listen
            else None
        )

    # -- the loop ---------------------------------------------------------------------------

    async def run(
        self, stop: asyncio.Event | None = None, *, exit_when_idle: bool = False
    ) -> WorkerStats:
        """Work until ``stop`` is set; with ``exit_when_idle``, until nothing is claimable, in
        flight or waiting out a backoff. Returns the counts of what happened."""
        stop = stop or asyncio.Event()
        if self.listener is not None:
            self.listener.start()
        heartbeat = asyncio.create_task(self._heartbeats(), name="heartbeat")
        completer = asyncio.create_task(self._completer(), name="completer")
        try:
            await self._claim_loop(stop, exit_when_idle)
            self._stop_at = time.monotonic()
            await self._drain()
        finally:
            if self._stop_at is None:
                self._stop_at = time.monotonic()
            # The completer is asked to finish, not cancelled: a write cut off mid-statement
            # would leave finished tokens to be redone after their leases run out. It keeps
            # trying an unreachable database until the stop's deadline (_give_up_at).
            self._stopping.set()
            self._flush_wanted.set()
            with suppress(Exception):
                await completer
            heartbeat.cancel()
            with suppress(asyncio.CancelledError):
                await heartbeat
            if await self._flush() is not None:  # anything the completer could not take
                self._give_up_kept()
            if self.listener is not None:
                await self.listener.stop()
            await self._claims_db.close()
            await self._writes_db.close()
            self.stats.disconnected_seconds = round(self.outage.disconnected_seconds(), 3)
        return self.stats

    async def _claim_loop(self, stop: asyncio.Event, exit_when_idle: bool) -> None:
        settled = False  # a claim found nothing after every result had been written
        while not stop.is_set():
            if not self._writable.is_set():
                # Results wait for the database: claim nothing before they are written or given
                # back, or this worker would take its own tokens over (and spend an attempt).
                await _wait_any(self._writable, stop, seconds=None)
                continue
            free = self.concurrency - len(self._running)
            if free <= 0:
                self._slot_free.clear()
                await _wait_any(self._slot_free, stop, seconds=None)
                continue
            # Let handlers that finished in the same turn free their slots first, so one claim
            # serves them all.
            await asyncio.sleep(0)
            free = self.concurrency - len(self._running)
            size = self.batch if self.stage.whole_batch else min(self.batch, free)
            self._wake.clear()
            claims = await self._claim(size, stop)
            if claims is None:  # the database failed; _claim waited before the next try
                continue
            if claims:
                self._start(claims)
                settled = False
                continue
            if exit_when_idle and not self._running:
                # Idle only if a claim made after every result was written found nothing, and
                # nothing waits out a backoff.
                if self._pending() or not settled:
                    if await self._flush() is not None:
                        await self._claim_backoff.wait(stop)
                    else:
                        settled = True
                    continue
                pause = await self._next_backoff()
                if pause is None:
                    return
                settled = False
                await _wait_any(stop, seconds=min(pause + 0.01, self.poll_interval))
                continue
            # Nothing claimable: sleep until woken (NOTIFY), a poll is due, or stop.
            await _wait_any(self._wake, stop, seconds=self.poll_interval)

    def _start(self, claims: list[Claim]) -> None:
        for claim in claims:
            self._live[claim.claim_id] = claim
        groups = [claims] if self.stage.whole_batch else [[c] for c in claims]
        for group in groups:
            task = asyncio.create_task(self._handle(group))
            self._running[task] = group

    async def _handle(self, claims: list[Claim]) -> None:
        # checkpoint() and record_reveal() inside the handler write through this worker.
        current_scope.set(
            HandlerScope(
                claims, lambda query, params: self._checkpoint_write(claims, query, params)
            )
        )
        try:
            if self.stage.whole_batch:
                await self._handle_batch(claims)
            else:
                await self._handle_one(claims[0])
        finally:
            self._running.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            self._slot_free.set()
            self._flush_wanted.set()

    async def _handle_one(self, claim: Claim) -> None:
        try:
            value = self.stage.validate_result(await self.handler(claim))  # type: ignore[arg-type]
        except LeaseLost:
            self._drop([claim])
        except Exception as exc:  # the handler's failure (or a result the rules refuse)
            self._failures.append(self._failure(claim, exc))
        else:
            self._results.append((claim, value))

    async def _handle_batch(self, claims: list[Claim]) -> None:
        reconciles = isinstance(self.handler, Reconciler)
        try:
            fresh = await self._reconcile(claims) if reconciles else claims
        except LeaseLost:  # its writes could not reach the database while the leases lived
            self._drop(claims)
            return
        except DATABASE_ERRORS as exc:  # a statement error, retried and given up on
            self._failures.extend(self._failure(claim, exc) for claim in claims)
            return
        if not fresh:
            return
        try:
            outcome = await self.handler(fresh)  # type: ignore[arg-type]
        except LeaseLost:
            self._drop(fresh)
            return
        except Exception as exc:
            self._failures.extend(self._failure(claim, exc) for claim in fresh)
            return
        for claim, result in self._per_claim(fresh, outcome):
            try:
                self._results.append((claim, self.stage.validate_result(result)))
            except Exception as exc:
                self._failures.append(self._failure(claim, exc))

    @staticmethod
    def _per_claim(claims: list[Claim], outcome: Any) -> list[tuple[Claim, Any]]:
        """A batch handler returns one result for all, a sequence aligned with the claims, or a
        mapping from token uuid to result (a token it leaves out gets None: a failed attempt)."""
        if isinstance(outcome, Mapping):
            results: Mapping[Any, Any] = outcome
            return [(c, results.get(c.token_uuid)) for c in claims]
        if isinstance(outcome, Sequence) and not isinstance(outcome, str | bytes):
            if len(outcome) != len(claims):
                error = f"{len(outcome)} results for {len(claims)} tokens"
                return [(c, error) for c in claims]  # refused by the stage's rules below
            return list(zip(claims, outcome, strict=True))
        return [(c, outcome) for c in claims]

    async def _reconcile(self, claims: list[Claim]) -> list[Claim]:
        """Settle the pending reveals these claims' checkpoints point at (see reveal.py). Returns
        the claims free to go into a new transaction; the others get a result or a failure.
        Raises LeaseLost when the database could not be reached while the leases lived."""
        groups: dict[uuid.UUID, list[Claim]] = {}
        fresh: list[Claim] = []
        for claim in claims:
            reveal = pending_reveal_of(claim)
            if reveal is None:
                fresh.append(claim)
            else:
                groups.setdefault(uuid.UUID(str(reveal["id"])), []).append(claim)
        if not groups:
            return fresh
        rows = await self._write_for(claims, "reveals", queries.REVEALS, {"ids": list(groups)})
        known = {row[0]: (row[1], row[2]) for row in rows}
        for reveal_id, held in groups.items():
            tx_hash, state = known.get(reveal_id, ("", "failed"))
            if state == "pending":
                recorded = pending_reveal_of(held[0]) or {}
                pending = PendingReveal(reveal_id, tx_hash, dict(recorded.get("data") or {}), held)
                try:
                    state = await self.handler.reconcile(pending)  # type: ignore[union-attr]
                except Exception as exc:  # the pointer stays (see _FAIL): retried, or failed
                    self._failures.extend(self._failure(claim, exc) for claim in held)
                    continue
                if state == "failed":
                    await self._write_for(
                        held, "fail_reveal", queries.FAIL_REVEAL, {"id": reveal_id}
                    )
                elif state == "confirmed":  # the mined one may be a replacement: its hash
                    rows = await self._write_for(
                        held, "reveals", queries.REVEALS, {"ids": [reveal_id]}
                    )
                    tx_hash = rows[0][1] if rows else tx_hash
            self._log.info("worker.reconcile", reveal=str(reveal_id), state=state, tokens=len(held))
            if state == "confirmed":
                self._results.extend((claim, tx_hash) for claim in held)
            elif state == "failed":
                # Claimed past max_attempts only because this reveal was pending (see the claim
                # statement): now that it can never be mined, those tokens fail for good.
                spent = [c for c in held if c.attempt > self.max_attempts]
                error = {"type": "RevealFailed", "message": f"{tx_hash} can never be mined"}
                self._failures.extend(_Failure(c, error, "retry", 0.0) for c in spent)
                fresh.extend(c for c in held if c.attempt <= self.max_attempts)
            else:  # not mined yet, and may still be: never put these tokens in a new transaction
                self._failures.extend(self._unresolved(claim, tx_hash) for claim in held)
        return fresh

    def _unresolved(self, claim: Claim, tx_hash: str) -> _Failure:
        if claim.deferrals < self.max_deferrals:
            return _Failure(claim, {"type": "RevealPending", "message": tx_hash}, "defer",
                            self.backoff_base)  # fmt: skip
        error = {
            "type": "RevealUnresolved",
            "message": f"{tx_hash} neither mined nor dropped after {claim.deferrals} checks",
        }
        return _Failure(claim, error, "permanent", 0.0)

    async def _checkpoint_write(
        self, held: list[Claim], query: str, params: dict[str, Any]
    ) -> Sequence[tuple[Any, ...]]:
        # The leases that bound the wait: the claims the statement names, else the handler's.
        ids: list[uuid.UUID] = list(params.get("claim_ids", [c.claim_id for c in held]))
        claims = [self._live[claim_id] for claim_id in ids if claim_id in self._live]
        return await self._write_for(claims, "checkpoint", query, params)

    async def _write_for(
        self, claims: Sequence[Claim], step: str, query: str, params: dict[str, Any]
    ) -> list[tuple[Any, ...]]:
        """A write a handler waits on (a checkpoint, a reveal's reconciliation): an unreachable
        database is waited out while the claims' leases are certainly live; after that
        LeaseLost tells the handler to stop before any external effect (another worker may take
        the tokens over once the leases run out)."""
        now = time.monotonic()
        until = min((self._lease_until.get(c.claim_id, now) for c in claims), default=now)
        try:
            return await self._write(step, query, params, until=until)
        except ConstraintViolation:
            raise
        except DATABASE_ERRORS as exc:
            if not unreachable(exc):
                raise
            self._troubled.update(c.claim_id for c in claims)
            raise LeaseLost(
                "the database could not be reached before the lease would run out"
            ) from exc

    def _drop(self, claims: list[Claim]) -> None:
        """A handler stopped on LeaseLost: nothing to write. A claim the database refused is
        lost; one that an outage kept from its checkpoint is given back (no attempt spent) as
        soon as the database answers, unless someone took it over meanwhile."""
        troubled = [claim for claim in claims if claim.claim_id in self._troubled]
        for claim in claims:
            if claim.claim_id not in self._troubled:
                self._refuse(claim, "lease lost (checkpoint refused)")
                self._forget([claim])
        if troubled:
            self._give_back(troubled)

    def _failure(self, claim: Claim, exc: BaseException) -> _Failure:
        if isinstance(exc, PermanentError):
            return _Failure(claim, _error(exc), "permanent", 0.0)
        backoff = self._rng.uniform(
            0, min(self.backoff_cap, self.backoff_base * 2 ** (claim.attempt - 1))
        )
        if isinstance(exc, RetryLater):
            if claim.deferrals < self.max_deferrals:
                return _Failure(claim, _error(exc), "defer", exc.seconds)
            backoff = max(backoff, exc.seconds)
        return _Failure(claim, _error(exc), "retry", backoff)

    async def _drain(self) -> None:
        """Stop: let running handlers finish (up to ``drain_timeout``), cancel the rest and give
        their tokens back without spending an attempt."""
        if not self._running:
            return
        self._log.info("worker.draining", in_flight=len(self._running))
        _, pending = await asyncio.wait(list(self._running), timeout=self.drain_timeout)
        if pending:
            abandoned = [claim for task in pending for claim in self._running.get(task, [])]
            for task in pending:
                task.cancel()
            await asyncio.wait(pending)
            self._releases.extend(abandoned)
            self._flush_wanted.set()

    # -- database steps ---------------------------------------------------------------------

    async def _claim(self, size: int, stop: asyncio.Event) -> list[Claim] | None:
        """Claim up to ``size`` tokens; None when the database failed (after waiting as long as
        the failure asks: the outage's next try, or a statement error's retry delay)."""
        params = {
            "holder": self.holder,
            "lease_seconds": self.lease_seconds,
            "max_attempts": self.max_attempts,
        }
        sent = time.monotonic()
        try:
            rows = await self._claims_db.fetch(queries.claim(self.stage, size), params)
        except DATABASE_ERRORS as exc:
            if self._db_failed("claim", exc):
                await self._claim_backoff.wait(stop)
            else:
                await _wait_any(stop, seconds=DB_RETRY_DELAY)
            return None
        self.outage.succeeded()
        self._claim_backoff.reset()
        batch = claim_batch(rows)
        for gone in batch.exhausted:
            self.stats.exhausted += 1
            self._log.warning(
                "worker.exhausted",
                token_id=gone.token_id,
                attempts=gone.attempts,
                last_holder=gone.last_holder,
            )
        for claim in batch.claims:
            self._lease_until[claim.claim_id] = sent + self.lease_seconds
            if claim.rescued_from is not None:
                self.stats.rescued += 1
                self._log.info(
                    "worker.rescue",
                    token_id=claim.token_id,
                    previous_holder=claim.rescued_from,
                    attempt=claim.attempt,
                )
        if batch.claims:
            self.stats.claimed += len(batch.claims)
            self.stats.batches += 1
            self._log.debug("worker.claim", count=len(batch.claims))
        return batch.claims

    async def _next_backoff(self) -> float | None:
        try:
            rows = await self._claims_db.fetch(queries.next_backoff(self.stage), {})
        except DATABASE_ERRORS as exc:
            self._db_failed("next_backoff", exc)
            return self.poll_interval
        self.outage.succeeded()
        return None if rows[0][0] is None else max(0.0, float(rows[0][0]))

    async def _write(
        self, step: str, query: str, params: dict[str, Any], *, until: float | None = None
    ) -> list[tuple[Any, ...]]:
        """Run a write on the write connection. A ConstraintViolation is raised at once (the
        same statement would fail the same way); another statement error is tried DB_RETRIES
        times. An unreachable database is raised at once when ``until`` is None (the caller
        keeps its work), else waited out (at the outage's pace) until ``until`` (monotonic)."""
        attempt = 0
        backoff = Backoff(self.outage)
        while True:
            try:
                rows = list(await self._writes_db.fetch(query, params))
            except ConstraintViolation:
                raise
            except DATABASE_ERRORS as exc:
                attempt += 1
                if self._db_failed(step, exc, attempt=attempt):
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

    def _db_failed(self, step: str, exc: BaseException, **fields: Any) -> bool:
        """Count a failed database call. An outage goes to the tracker (logged once per change);
        any other error is logged here. Returns whether it was an outage."""
        self.stats.db_errors += 1
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

    async def _probe(self) -> None:
        """Called by the outage tracker at the first failure of an episode: one SELECT 1 on the
        claims connection (unless a claim is under way there), which tells a blip from an
        outage at once and reads the reason the server gave when it closed that connection.
        Not once the worker stops: its connections are being closed."""
        if self._claims_db.lock.locked() or self._stopping.is_set():
            return
        try:
            await self._claims_db.fetch("SELECT 1", {})
        except DATABASE_ERRORS as exc:
            self._db_failed("probe", exc)
        else:
            self.outage.succeeded()

    # -- writing what handlers finished ------------------------------------------------------

    def _pending(self) -> bool:
        return bool(self._results or self._failures or self._releases)

    def _give_up_at(self) -> float:
        """When a stopping worker gives up on what an unreachable database kept from being
        written: ``drain_timeout`` after the stop, else when the last kept lease surely ran out
        (after that nothing could be completed anyway)."""
        stop_at = self._stop_at if self._stop_at is not None else time.monotonic()
        if self.drain_timeout is not None:
            return stop_at + self.drain_timeout
        kept = [c for c, _ in self._results] + [f.claim for f in self._failures] + self._releases
        return max((self._lease_until.get(c.claim_id, stop_at) for c in kept), default=stop_at)

    async def _completer(self) -> None:
        backoff = Backoff(self.outage)
        while True:
            if not self._pending():
                if self._stopping.is_set():
                    return
                await self._flush_wanted.wait()
                self._flush_wanted.clear()
                if self._running and self.completion_window > 0 and not self._stopping.is_set():
                    # More results are coming: let them join this write.
                    await asyncio.sleep(self.completion_window)
            if await self._flush() is None:
                backoff.reset()
                continue
            # The database could not be reached: everything stays kept. Try again when it may be
            # back; a stopping worker gives up at its deadline (run() then logs what).
            stopping = self._stopping.is_set()
            if stopping and time.monotonic() >= self._give_up_at():
                return
            await backoff.wait(self._stopping, until=self._give_up_at() if stopping else None)

    async def _flush(self) -> BaseException | None:
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
                self._writable.set()
            return None

    def _give_back(self, claims: list[Claim]) -> None:
        """Queue claims to be released (no attempt spent) because an outage, not their handler,
        kept their work from being recorded. Nothing is claimed until that is written: this
        worker would otherwise take its own tokens over, spending an attempt."""
        if claims:
            self._releases.extend(claims)
            self._writable.clear()
            self._flush_wanted.set()

    def _kept(self, claims: Any) -> None:
        """Work for these claims could not be written: the outage touched them."""
        self._troubled.update(claim.claim_id for claim in claims)
        self._writable.clear()

    async def _complete(self, results: list[tuple[Claim, str]]) -> BaseException | None:
        params = {
            "claim_ids": [claim.claim_id for claim, _ in results],
            "results": [value for _, value in results],
        }
        try:
            rows = await self._write("complete", queries.complete(self.stage), params)
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
            self._failures.append(_Failure(claim, _error(exc), "retry", 0.0))
            return None
        except DATABASE_ERRORS as exc:
            if unreachable(exc):
                self._results[:0] = results
                self._kept(claim for claim, _ in results)
                return exc
            self._give_up([claim for claim, _ in results], f"database error: {first_line(exc)}")
            self._forget(claim for claim, _ in results)
            return None
        done = {row[0] for row in rows}
        done |= await self._recorded_meanwhile([r for r in results if r[0].claim_id not in done])
        given_up: list[Claim] = []
        for claim, _ in results:
            if claim.claim_id in done:
                self.stats.completed += 1
            elif claim.claim_id in self._troubled:
                given_up.append(claim)
            else:
                self._refuse(claim, "lease lost before completion")
        if done:
            self._log.info("worker.complete", count=len(done))
        giving_back = {claim.claim_id for claim in given_up}
        self._forget(claim for claim, _ in results if claim.claim_id not in giving_back)
        if given_up:
            # The handler succeeded; only the outage kept its result out. Give the token back
            # (no attempt spent) unless someone took it over meanwhile.
            self._give_up(given_up, LEASE_RAN_OUT, giving_back=True)
            self._give_back(given_up)
        return None

    async def _recorded_meanwhile(self, refused: list[tuple[Claim, str]]) -> set[uuid.UUID]:
        """The claim ids, among results the database refused, that an earlier try of the same
        completion did write (its answer was lost): their token holds this very result. Asked
        only for results an outage touched; on any error, none."""
        troubled = [(claim, value) for claim, value in refused if claim.claim_id in self._troubled]
        if not troubled:
            return set()
        params = {
            "token_ids": [claim.token_uuid for claim, _ in troubled],
            "results": [value for _, value in troubled],
        }
        try:
            rows = await self._write("recorded", queries.recorded(self.stage), params)
        except DATABASE_ERRORS:
            return set()
        found = {row[0] for row in rows}
        return {claim.claim_id for claim, _ in troubled if claim.token_uuid in found}

    async def _fail(self, failures: list[_Failure]) -> BaseException | None:
        params = {
            "claim_ids": [f.claim.claim_id for f in failures],
            "errors": [json.dumps(f.error) for f in failures],
            "kinds": [f.kind for f in failures],
            "delays": [f.delay for f in failures],
            "max_attempts": self.max_attempts,
        }
        try:
            rows = await self._write("fail", queries.fail(self.stage), params)
        except DATABASE_ERRORS as exc:
            if unreachable(exc):
                self._failures[:0] = failures
                self._kept(f.claim for f in failures)
                return exc
            self._give_up([f.claim for f in failures], f"database error: {first_line(exc)}")
            self._forget(f.claim for f in failures)
            return None
        final = {row[0]: row[1] for row in rows}
        given_up: list[_Failure] = []
        for f in failures:
            if f.claim.claim_id not in final:
                if f.claim.claim_id in self._troubled:
                    given_up.append(f)
                else:
                    self._refuse(f.claim, "lease lost before the failure was recorded")
            elif f.kind == "defer":
                self.stats.deferred += 1
                self._log.info(
                    "worker.deferred", token_id=f.claim.token_id, seconds=f.delay, error=f.error
                )
            else:
                self.stats.failed += 1
                self._log.info(
                    "worker.fail",
                    token_id=f.claim.token_id,
                    attempt=f.claim.attempt,
                    final=final[f.claim.claim_id],
                    retry_in=None if final[f.claim.claim_id] else round(f.delay, 3),
                    error=f.error,
                )
        unwritten = {f.claim.claim_id for f in given_up}
        self._forget(f.claim for f in failures if f.claim.claim_id not in unwritten)
        if given_up:
            # A deferral spends no attempt: give it back. A handler's failure did spend one,
            # which the next claim's takeover counts as it would have.
            back = [f.claim for f in given_up if f.kind == "defer"]
            self._give_up([f.claim for f in given_up], LEASE_RAN_OUT, giving_back=bool(back))
            self._give_back(back)
            self._forget(f.claim for f in given_up if f.kind != "defer")
        return None

    async def _release(self, claims: list[Claim]) -> BaseException | None:
        """Give claims back without spending their attempt: work that never started (a drain),
        or that an outage kept from being recorded. Fenced by the claim id alone: a claim that
        still carries it was not taken over, even if its lease ran out."""
        params = {"claim_ids": [c.claim_id for c in claims]}
        try:
            rows = await self._write("release", queries.release(self.stage), params)
        except DATABASE_ERRORS as exc:
            if unreachable(exc):
                self._releases[:0] = claims
                self._writable.clear()
                return exc
            rows = []  # they come back when their leases run out
        self.stats.released += len(rows)
        self._forget(claims)
        self._log.info("worker.release", count=len(rows))
        return None

    def _give_up(self, claims: list[Claim], reason: str, *, giving_back: bool = False) -> None:
        """Count and name results and failures that will never be recorded."""
        self.stats.given_up += len(claims)
        self._log.error(
            "worker.results_given_up",
            count=len(claims),
            tokens=sorted(claim.token_id for claim in claims),
            reason=reason,
            giving_back=giving_back,
        )

    def _give_up_kept(self) -> None:
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
        self._forget([*claims, *self._releases])
        self._results, self._failures, self._releases = [], [], []

    async def _heartbeats(self) -> None:
        """Every third of the lease, extend all live claims in one statement. Claims found
        expired are lost: someone else may hold them now, and their results will be refused.
        A beat that cannot reach the database is tried again at the outage's pace, so the first
        moment it answers, every lease still live is extended."""
        failing = False
        backoff = Backoff(self.outage)
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
                rows = await self._writes_db.fetch(queries.HEARTBEAT, params)
            except DATABASE_ERRORS as exc:
                failing = self._db_failed("heartbeat", exc)
                if failing:
                    self._troubled.update(live)
                continue
            self.outage.succeeded()
            failing = False
            kept = {row[0] for row in rows}
            for claim_id in kept:
                if claim_id in self._lease_until:
                    self._lease_until[claim_id] = sent + self.lease_seconds
            lost = [c for c in live if c not in kept and c in self._live]
            if lost:
                self._lost.update(lost)
                self._log.warning("worker.lease_lost", claims=len(lost))

    def _forget(self, claims: Any) -> None:
        for claim in claims:
            self._live.pop(claim.claim_id, None)
            self._lease_until.pop(claim.claim_id, None)
            self._lost.discard(claim.claim_id)
            self._troubled.discard(claim.claim_id)

    def _refuse(self, claim: Claim, reason: str) -> None:
        """Count and log work dropped because this worker no longer holds the token."""
        self.stats.refused += 1
        self._log.warning("worker.refused", token_id=claim.token_id, reason=reason)
