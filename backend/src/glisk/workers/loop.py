"""``run_worker``: claim a batch, run the handler outside any transaction, keep the lease alive
while it runs, complete or fail each token, poll when idle, drain on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import structlog
from sqlalchemy.exc import DBAPIError

from glisk.models import FieldValidationError, InvalidStateTransition, Token
from glisk.models.stages import STAGES, Stage, StageName
from glisk.repositories.token_lease import Claim, ClaimBatch
from glisk.uow import UnitOfWorkFactory

log = structlog.get_logger("glisk.worker")

T = TypeVar("T")
TokenHandler = Callable[[Claim], Awaitable[str]]
BatchHandler = Callable[[Sequence[Claim]], Awaitable[str]]


class PermanentError(Exception):
    """Raised by a handler when retrying cannot help (e.g. a prompt the service refuses): the
    token goes to 'failed' at once instead of being retried."""


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


def default_worker_id() -> str:
    """host:pid:random, unique per run, so a restarted process never impersonates its old self."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def install_stop_signals(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT set ``stop``: the loop finishes the token in hand, releases the rest of
    its batch and returns."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


def _error(exc: BaseException) -> dict[str, Any]:
    return {"type": type(exc).__name__, "message": str(exc)[:500]}


@asynccontextmanager
async def _keep_alive(
    uow_factory: UnitOfWorkFactory, live: set[uuid.UUID], lease_seconds: float, holder: str
) -> AsyncIterator[None]:
    """Extend the leases in ``live`` every third of the lease while the block runs. Claims that
    turn out expired are dropped from ``live`` (their completion will be refused)."""

    async def beat() -> None:
        while True:
            await asyncio.sleep(lease_seconds / 3)
            if not live:
                continue
            try:
                async with uow_factory() as uow:
                    kept = await uow.leases.heartbeat(sorted(live), lease_seconds)
            except Exception as exc:  # the next beat may succeed; a lost lease is handled below
                log.warning("worker.heartbeat_failed", worker=holder, error=_error(exc))
                continue
            lost = live - kept
            if lost:
                log.warning("worker.lease_lost", worker=holder, claims=len(lost))
                live.difference_update(lost)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


# A database outage (failover, restart) must not end the worker: each step is retried a few
# times, then given up on. What is given up is safe: a claim that was not recorded did not
# happen, and a completion that was not recorded is redone after the lease runs out.
DB_RETRIES = 3
DB_RETRY_DELAY = 0.5


class _GaveUp:
    """Returned by _with_db_retries when every try failed."""


GAVE_UP = _GaveUp()


async def _with_db_retries(step: str, call: Callable[[], Awaitable[T]]) -> T | _GaveUp:
    for attempt in range(1, DB_RETRIES + 1):
        try:
            return await call()
        except DBAPIError as exc:
            log.error("worker.database_error", step=step, attempt=attempt, error=_error(exc))
            if attempt < DB_RETRIES:
                await asyncio.sleep(DB_RETRY_DELAY * attempt)
    return GAVE_UP


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


class _Worker:
    def __init__(
        self,
        stage: Stage,
        uow_factory: UnitOfWorkFactory,
        holder: str,
        lease_seconds: float,
        max_attempts: int,
    ) -> None:
        self.stage = stage
        self.uow_factory = uow_factory
        self.holder = holder
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.stats = WorkerStats()

    async def _claim(self, batch: int) -> ClaimBatch:
        async with self.uow_factory() as uow:
            return await uow.leases.claim(
                self.stage,
                self.holder,
                batch=batch,
                lease_seconds=self.lease_seconds,
                max_attempts=self.max_attempts,
            )

    async def claim(self, batch: int) -> list[Claim]:
        result = await _with_db_retries("claim", lambda: self._claim(batch))
        if isinstance(result, _GaveUp):
            return []
        for gone in result.exhausted:
            self.stats.exhausted += 1
            log.warning(
                "worker.exhausted",
                stage=self.stage.name.value,
                token_id=gone.token_id,
                attempts=gone.attempts,
                last_holder=gone.last_holder,
            )
        for claim in result.claims:
            if claim.rescued_from is not None:
                self.stats.rescued += 1
                log.info(
                    "worker.rescue",
                    stage=self.stage.name.value,
                    token_id=claim.token_id,
                    previous_holder=claim.rescued_from,
                    attempt=claim.attempt,
                )
        if result.claims:
            self.stats.claimed += len(result.claims)
            self.stats.batches += 1
            log.info(
                "worker.claim",
                stage=self.stage.name.value,
                worker=self.holder,
                count=len(result.claims),
            )
        return result.claims

    async def _complete(self, claims: Sequence[Claim], result: str) -> list[Token | None]:
        async with self.uow_factory() as uow:
            return [await uow.leases.complete(self.stage, c, result) for c in claims]

    async def complete(self, claims: Sequence[Claim], result: str) -> None:
        try:
            done = await _with_db_retries("complete", lambda: self._complete(claims, result))
        except (InvalidStateTransition, FieldValidationError) as exc:
            # The handler's result cannot be applied (e.g. an empty cid): a failed attempt.
            for claim in claims:
                await self.fail(claim, exc)
            return
        if isinstance(done, _GaveUp):
            return  # not recorded; the tokens are rescued when their leases run out
        for claim, token in zip(claims, done, strict=True):
            if token is None:
                self.refuse(claim, "lease lost before completion")
            else:
                self.stats.completed += 1
                log.info("worker.complete", stage=self.stage.name.value, token_id=claim.token_id)

    async def _fail(self, claim: Claim, exc: BaseException) -> Token | None:
        async with self.uow_factory() as uow:
            return await uow.leases.fail(
                self.stage,
                claim,
                _error(exc),
                max_attempts=self.max_attempts,
                permanent=isinstance(exc, PermanentError),
            )

    async def fail(self, claim: Claim, exc: BaseException) -> None:
        token = await _with_db_retries("fail", lambda: self._fail(claim, exc))
        if isinstance(token, _GaveUp):
            return  # not recorded; the token is rescued when its lease runs out
        if token is None:
            self.refuse(claim, "lease lost before failure was recorded")
            return
        self.stats.failed += 1
        log.info(
            "worker.fail",
            stage=self.stage.name.value,
            token_id=claim.token_id,
            attempt=claim.attempt,
            final=str(token.status) == "failed",
            error=_error(exc),
        )

    def refuse(self, claim: Claim, reason: str) -> None:
        """Count and log work dropped because this worker no longer holds the token."""
        self.stats.refused += 1
        log.warning(
            "worker.refused", stage=self.stage.name.value, token_id=claim.token_id, reason=reason
        )

    async def _release(self, claims: Sequence[Claim]) -> int:
        async with self.uow_factory() as uow:
            return await uow.leases.release([c.claim_id for c in claims])

    async def release(self, claims: Sequence[Claim]) -> None:
        if not claims:
            return
        released = await _with_db_retries("release", lambda: self._release(claims))
        if isinstance(released, _GaveUp):
            return  # they come back when their leases run out
        self.stats.released += released
        log.info("worker.release", stage=self.stage.name.value, count=released)


async def run_worker(
    stage: Stage | StageName | str,
    handler: TokenHandler | BatchHandler,
    uow_factory: UnitOfWorkFactory,
    *,
    worker_id: str | None = None,
    batch: int | None = None,
    lease_seconds: float = 60.0,
    max_attempts: int = 3,
    poll_interval: float = 1.0,
    stop: asyncio.Event | None = None,
    exit_when_idle: bool = False,
) -> WorkerStats:
    """Run one stage until ``stop`` is set (or, with ``exit_when_idle``, until a claim finds
    nothing).

    ``handler`` gets one Claim and returns the stage's result (image stage: the image path;
    upload stage: the metadata CID); for the reveal stage it gets the whole batch and returns the
    transaction hash. It runs with no database transaction open. Raising fails the attempt (the
    token is retried until ``max_attempts``); raising PermanentError fails the token at once.
    When nothing is claimable the loop sleeps ``poll_interval`` seconds (waking early on stop).
    """
    resolved = stage if isinstance(stage, Stage) else STAGES[StageName(stage)]
    worker = _Worker(
        resolved, uow_factory, worker_id or default_worker_id(), lease_seconds, max_attempts
    )
    stop = stop or asyncio.Event()
    size = batch or resolved.default_batch
    while not stop.is_set():
        claims = await worker.claim(size)
        if not claims:
            if exit_when_idle:
                break
            await _sleep_or_stop(stop, poll_interval)
            continue
        if resolved.whole_batch:
            await _run_batch(worker, cast(BatchHandler, handler), claims)
        else:
            await _run_each(worker, cast(TokenHandler, handler), claims, stop)
    return worker.stats


# The reveal stage completes its whole batch in one transaction, locking many rows; a heartbeat
# updating the same rows in another order could deadlock with it, so for a batch the heartbeat
# runs only while the handler does.


async def _run_batch(worker: _Worker, handler: BatchHandler, claims: list[Claim]) -> None:
    live = {c.claim_id for c in claims}
    try:
        async with _keep_alive(worker.uow_factory, live, worker.lease_seconds, worker.holder):
            result = await handler(claims)
    except Exception as exc:
        for claim in claims:
            await worker.fail(claim, exc)
        return
    await worker.complete(claims, result)


async def _run_each(
    worker: _Worker, handler: TokenHandler, claims: list[Claim], stop: asyncio.Event
) -> None:
    # One heartbeat for the whole batch: the tokens still waiting their turn keep their leases
    # too. A single-token completion cannot deadlock with it (it locks one row).
    live = {c.claim_id for c in claims}
    async with _keep_alive(worker.uow_factory, live, worker.lease_seconds, worker.holder):
        for index, claim in enumerate(claims):
            if stop.is_set():
                await worker.release(claims[index:])
                return
            if claim.claim_id not in live:
                # Its lease ran out (heartbeats failed): someone else may hold it now.
                worker.refuse(claim, "lease lost before the handler started")
                continue
            try:
                result = await handler(claim)
            except Exception as exc:
                live.discard(claim.claim_id)
                await worker.fail(claim, exc)
            else:
                live.discard(claim.claim_id)
                await worker.complete([claim], result)
