"""The worker: claims sized to free slots, handlers run concurrently with no transaction open,
one heartbeat for every live claim, completions and failures written in batches, backoff, wake-up
on NOTIFY, a drain on stop.

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
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Literal

import structlog

from glisk.errors import ConstraintViolation, LeaseLost, PermanentError, RetryLater, first_line
from glisk.models import validation as v
from glisk.workers import queries
from glisk.workers.checkpoints import HandlerScope, current_scope
from glisk.workers.claims import Claim, claim_batch
from glisk.workers.connection import DATABASE_ERRORS, ConnectOptions, Link
from glisk.workers.listener import Listener
from glisk.workers.reveal import PendingReveal, Reconciler, pending_reveal_of
from glisk.workers.stages import Stage, StageName, resolve_stage

log = structlog.get_logger("glisk.worker")

TokenHandler = Callable[[Claim], Awaitable[str]]
# One result for the whole batch, one per claim (in order), or a mapping token uuid -> result.
BatchHandler = Callable[[Sequence[Claim]], Awaitable[str | Sequence[str] | Mapping[uuid.UUID, str]]]
Handler = TokenHandler | BatchHandler
FailureKind = Literal["retry", "permanent", "defer"]

# A database outage (failover, restart) must not end the worker: each write is retried a few
# times, then given up on. What is given up is safe: a claim that was not recorded did not happen,
# and a completion that was not recorded is redone after the lease runs out.
DB_RETRIES = 3
DB_RETRY_DELAY = 0.5


@dataclass
class WorkerStats:
    claimed: int = 0
    completed: int = 0
    failed: int = 0  # attempts that failed (retried later or final)
    refused: int = 0  # results dropped because the lease had been lost
    released: int = 0
    rescued: int = 0
    exhausted: int = 0
    batches: int = 0
    deferred: int = 0  # RetryLater honoured without spending an attempt
    db_errors: int = 0  # database calls that failed or timed out (each retried or given up)


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
        for name, value in (
            ("lease_seconds", lease_seconds),
            ("poll_interval", poll_interval),
        ):
            if not value > 0:
                raise v.FieldValidationError(name, "must be > 0", value)
        for name, value in (
            ("backoff_base", backoff_base),
            ("backoff_cap", backoff_cap),
            ("completion_window", completion_window),
        ):
            if not value >= 0:
                raise v.FieldValidationError(name, "must be >= 0", value)
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
        self._log = log.bind(stage=self.stage.name.value, worker=self.holder)
        # Claims this worker holds: handlers running or results not yet written.
        self._live: dict[uuid.UUID, Claim] = {}
        self._lost: set[uuid.UUID] = set()
        self._running: dict[asyncio.Task[None], list[Claim]] = {}
        self._results: list[tuple[Claim, str]] = []
        self._failures: list[_Failure] = []
        self._slot_free = asyncio.Event()
        self._wake = asyncio.Event()
        self._flush_wanted = asyncio.Event()
        self._stopping = False
        self._flush_lock = asyncio.Lock()
        # LISTEN on the stage's channel while running (no I/O until run()).
        self.listener = Listener(connect, self.stage.channel, self._wake) if self.listen else None

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
            await self._drain()
        finally:
            # The completer is asked to finish, not cancelled: a write cut off mid-statement
            # would leave finished tokens to be redone after their leases run out.
            self._stopping = True
            self._flush_wanted.set()
            with suppress(Exception):
                await completer
            heartbeat.cancel()
            with suppress(asyncio.CancelledError):
                await heartbeat
            await self._flush()  # anything the completer could not take
            if self.listener is not None:
                await self.listener.stop()
            await self._claims_db.close()
            await self._writes_db.close()
        return self.stats

    async def _claim_loop(self, stop: asyncio.Event, exit_when_idle: bool) -> None:
        settled = False  # a claim found nothing after every result had been written
        while not stop.is_set():
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
            claims = await self._claim(size)
            if claims:
                self._start(claims)
                settled = False
                continue
            if exit_when_idle and not self._running:
                # Idle only if a claim made after every result was written found nothing, and
                # nothing waits out a backoff.
                if self._results or self._failures or not settled:
                    await self._flush()
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
        current_scope.set(HandlerScope(claims, self._checkpoint_write))
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
            self._drop(claim)
        except Exception as exc:  # the handler's failure (or a result the rules refuse)
            self._failures.append(self._failure(claim, exc))
        else:
            self._results.append((claim, value))

    async def _handle_batch(self, claims: list[Claim]) -> None:
        fresh = await self._reconcile(claims) if isinstance(self.handler, Reconciler) else claims
        if not fresh:
            return
        try:
            outcome = await self.handler(fresh)  # type: ignore[arg-type]
        except LeaseLost:
            for claim in fresh:
                self._drop(claim)
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
        the claims free to go into a new transaction; the others get a result or a failure."""
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
        rows = await self._write("reveals", queries.REVEALS, {"ids": list(groups)})
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
                    await self._write("fail_reveal", queries.FAIL_REVEAL, {"id": reveal_id})
                elif state == "confirmed":  # the mined one may be a replacement: its hash
                    rows = await self._write("reveals", queries.REVEALS, {"ids": [reveal_id]})
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
        self, query: str, params: dict[str, Any]
    ) -> Sequence[tuple[Any, ...]]:
        return await self._write("checkpoint", query, params)

    def _drop(self, claim: Claim) -> None:
        """A handler found its claim lost (a checkpoint was refused): nothing to write."""
        self._refuse(claim, "lease lost (checkpoint refused)")
        self._forget([claim])

    def _failure(self, claim: Claim, exc: Exception) -> _Failure:
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
            await self._release(abandoned)

    # -- database steps ---------------------------------------------------------------------

    async def _claim(self, size: int) -> list[Claim]:
        params = {
            "holder": self.holder,
            "lease_seconds": self.lease_seconds,
            "max_attempts": self.max_attempts,
        }
        try:
            rows = await self._claims_db.fetch(queries.claim(self.stage, size), params)
        except DATABASE_ERRORS as exc:
            self._db_error("claim", exc)
            await asyncio.sleep(DB_RETRY_DELAY)
            return []
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
            self._db_error("next_backoff", exc)
            return self.poll_interval
        return None if rows[0][0] is None else max(0.0, float(rows[0][0]))

    async def _write(self, step: str, query: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        """Run a write with retries; raises the last database error when every try failed."""
        for attempt in range(1, DB_RETRIES + 1):
            try:
                return list(await self._writes_db.fetch(query, params))
            except ConstraintViolation:
                raise  # the same statement would fail the same way
            except DATABASE_ERRORS as exc:
                self._db_error(step, exc, attempt=attempt)
                if attempt == DB_RETRIES:
                    raise
                await asyncio.sleep(DB_RETRY_DELAY * attempt)
        raise AssertionError("unreachable")

    def _db_error(self, step: str, exc: BaseException, **fields: Any) -> None:
        self.stats.db_errors += 1
        self._log.error(
            "worker.database_error",
            step=step,
            error={"type": type(exc).__name__, "message": first_line(exc)},
            **fields,
        )

    async def _completer(self) -> None:
        while not self._stopping:
            await self._flush_wanted.wait()
            self._flush_wanted.clear()
            if self._running and self.completion_window > 0 and not self._stopping:
                # More results are coming: let them join this write.
                await asyncio.sleep(self.completion_window)
            await self._flush()

    async def _flush(self) -> None:
        """Write every result and failure gathered so far: one statement per kind. Returns once
        everything gathered before the call is written (or given up)."""
        async with self._flush_lock:
            results, self._results = self._results, []
            failures, self._failures = self._failures, []
            if results:
                await self._complete(results)
            if failures:
                await self._fail(failures)

    async def _complete(self, results: list[tuple[Claim, str]]) -> None:
        params = {
            "claim_ids": [claim.claim_id for claim, _ in results],
            "results": [value for _, value in results],
        }
        try:
            rows = await self._write("complete", queries.complete(self.stage), params)
        except ConstraintViolation as exc:
            if len(results) > 1:  # find the one the database refuses; complete the others
                for one in results:
                    await self._complete([one])
                return
            claim, _ = results[0]
            await self._fail([_Failure(claim, _error(exc), "retry", 0.0)])
            return
        except DATABASE_ERRORS:
            self._forget(claim for claim, _ in results)  # rescued when the leases run out
            return
        done = {row[0] for row in rows}
        for claim, _ in results:
            if claim.claim_id in done:
                self.stats.completed += 1
            else:
                self._refuse(claim, "lease lost before completion")
        if done:
            self._log.info("worker.complete", count=len(done))
        self._forget(claim for claim, _ in results)

    async def _fail(self, failures: list[_Failure]) -> None:
        params = {
            "claim_ids": [f.claim.claim_id for f in failures],
            "errors": [json.dumps(f.error) for f in failures],
            "kinds": [f.kind for f in failures],
            "delays": [f.delay for f in failures],
            "max_attempts": self.max_attempts,
        }
        try:
            rows = await self._write("fail", queries.fail(self.stage), params)
        except DATABASE_ERRORS:
            self._forget(f.claim for f in failures)
            return
        final = {row[0]: row[1] for row in rows}
        for f in failures:
            if f.claim.claim_id not in final:
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
        self._forget(f.claim for f in failures)

    async def _release(self, claims: list[Claim]) -> None:
        if not claims:
            return
        params = {"claim_ids": [c.claim_id for c in claims]}
        try:
            rows = await self._write("release", queries.release(self.stage), params)
        except DATABASE_ERRORS:
            rows = []  # they come back when their leases run out
        self.stats.released += len(rows)
        self._forget(claims)
        self._log.info("worker.release", count=len(rows))

    async def _heartbeats(self) -> None:
        """Every third of the lease, extend all live claims in one statement. Claims found
        expired are lost: someone else may hold them now, and their results will be refused."""
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            live = [c for c in self._live if c not in self._lost]
            if not live:
                continue
            params = {"claim_ids": live, "lease_seconds": self.lease_seconds}
            try:
                rows = await self._writes_db.fetch(queries.HEARTBEAT, params)
            except DATABASE_ERRORS as exc:
                self._db_error("heartbeat", exc)  # the next beat may succeed
                continue
            kept = {row[0] for row in rows}
            lost = [c for c in live if c not in kept and c in self._live]
            if lost:
                self._lost.update(lost)
                self._log.warning("worker.lease_lost", claims=len(lost))

    def _forget(self, claims: Any) -> None:
        for claim in claims:
            self._live.pop(claim.claim_id, None)
            self._lost.discard(claim.claim_id)

    def _refuse(self, claim: Claim, reason: str) -> None:
        """Count and log work dropped because this worker no longer holds the token."""
        self.stats.refused += 1
        self._log.warning("worker.refused", token_id=claim.token_id, reason=reason)
