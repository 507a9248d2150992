"""The worker: claims sized to free slots, handlers run concurrently with no transaction open,
one heartbeat for every live claim, completions and failures written in batches, backoff, wake-up
on NOTIFY, a drain on stop, and results kept through a database outage.

A handler may run more than once for the same token: when its worker loses the lease while it
runs (a pause, a slow call, a crash after the side effect), another worker takes the token over
and runs the handler again. The late run's result is refused, but its side effects happened.
Handlers must be idempotent, or record progress before an external effect.

``Worker`` wires the parts and runs the claim loop; each part has one job, and a claim travels
through them by calls:

    Claimer.claim -> Leases.hold -> Executor.start -> [Settle] -> the handler
      -> Completer.add_results / add_failures / give_back -> Completer.run -> Writer.write

- ``claimer``: the claim statement and what its rows say (exhausted, rescued);
- ``leases``: the claims held, their deadlines, the heartbeat, lost claims;
- ``executor``: a task per handler call, its scope (checkpoints), its outcome;
- ``reveal.Reconcile``: the reveal stage's settle step before its handler;
- ``retry``: what a failure does to its token (backoff, deferral, permanent);
- ``completer``: batched writes of what finished, kept through an outage;
- ``writes``: retried writes, waits a handler makes through an outage, failed calls counted;
- ``signals``: SIGTERM and SIGINT, and waits a stop cuts short.
"""

from __future__ import annotations

import asyncio
import random
from contextlib import suppress

import structlog

from glisk.models import validation as v
from glisk.pipeline import Stage, StageName, resolve_stage
from glisk.workers.claimer import Claimer
from glisk.workers.completer import Completer
from glisk.workers.connection import ConnectOptions, Link
from glisk.workers.executor import BatchHandler, Executor, Handler, TokenHandler
from glisk.workers.leases import Leases, default_holder, holder_named
from glisk.workers.listener import Listener
from glisk.workers.retry import RetryPolicy
from glisk.workers.reveal import Reconcile
from glisk.workers.signals import hold_stop_signals, install_stop_signals, wait_any
from glisk.workers.stats import WorkerStats
from glisk.workers.writes import Writer

__all__ = [
    "BatchHandler",
    "Handler",
    "TokenHandler",
    "Worker",
    "WorkerStats",
    "default_holder",
    "default_worker_id",
    "hold_stop_signals",
    "install_stop_signals",
]

log = structlog.get_logger("glisk.worker")

# The ranges of the WORKER_* settings (glisk.core.config), enforced for callers of the API too.
MAX_LEASE_SECONDS = 86400.0
MAX_POLL_SECONDS = 3600.0
MAX_BACKOFF_SECONDS = 86400.0 * 7

default_worker_id = default_holder  # deprecated name


def _check_ranges(
    *, above_zero: dict[str, tuple[float, float]], from_zero: dict[str, tuple[float, float]]
) -> None:
    """Each ``name: (value, most)`` finite and bounded as the WORKER_* settings are (a lease of
    1e300 seconds is no lease, and PostgreSQL's interval refuses it on every claim: "interval out
    of range"). Raises FieldValidationError naming the first argument out of range."""
    for name, (value, most) in above_zero.items():
        if not 0 < value <= most:
            raise v.FieldValidationError(name, f"must be > 0 and at most {most:g}", value)
    for name, (value, most) in from_zero.items():
        if not 0 <= value <= most:
            raise v.FieldValidationError(name, f"must be >= 0 and at most {most:g}", value)


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

    ``holder`` is the name recorded on its claims (default: host:pid:random); ``worker_id`` is
    its deprecated name. The attributes are read, not changed, after construction.
    """

    def __init__(
        self,
        stage: Stage | StageName | str,
        handler: Handler,
        connect: ConnectOptions,
        *,
        holder: str | None = None,
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
        worker_id: str | None = None,
    ) -> None:
        self.stage = resolve_stage(stage)
        self.handler = handler
        named = "holder" if worker_id is None else "worker_id"
        holder = holder_named(holder, worker_id) or default_holder()
        self.holder = v.text_length(named, holder, 1, 255)
        self.batch = batch or self.stage.default_batch
        if not 1 <= self.batch <= self.stage.max_batch:
            raise v.FieldValidationError("batch", f"must be 1 to {self.stage.max_batch}", batch)
        if concurrency is None:
            # Per-token stages run a claimed batch at once; a reveal runs one batch at a time.
            concurrency = 1 if self.stage.whole_batch else self.batch
        self.concurrency = v.int_at_least("concurrency", concurrency, 1)
        _check_ranges(
            above_zero={
                "lease_seconds": (lease_seconds, MAX_LEASE_SECONDS),
                "poll_interval": (poll_interval, MAX_POLL_SECONDS),
                "reconnect_cap": (reconnect_cap, MAX_POLL_SECONDS),
            },
            from_zero={
                "backoff_base": (backoff_base, MAX_BACKOFF_SECONDS),
                "backoff_cap": (backoff_cap, MAX_BACKOFF_SECONDS),
                "completion_window": (completion_window, MAX_POLL_SECONDS),
            },
        )
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
        rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self._log = log.bind(stage=self.stage.name, worker=self.holder)
        self._claims_db, self._writes_db = Link(connect), Link(connect)
        self._stopping = asyncio.Event()  # set once the worker stops: the completer finishes
        self._wake = asyncio.Event()  # set by a NOTIFY: something may be claimable
        self._retry = RetryPolicy(
            max_attempts=self.max_attempts,
            backoff_base=backoff_base,
            backoff_cap=backoff_cap,
            max_deferrals=self.max_deferrals,
            rng=rng,
        )
        self._leases = Leases(self.stats, self._log, lease_seconds=lease_seconds)
        self._writer = Writer(
            self._writes_db,
            self._claims_db,
            self._leases,
            self.stats,
            self._log,
            stopping=self._stopping,
            reconnect_cap=reconnect_cap,
            rng=rng,
        )
        # Every connection reports here; it logs an outage once and paces the reconnections.
        self.outage = self._writer.outage
        self._claimer = Claimer(
            self.stage,
            self._claims_db,
            self._leases,
            self._writer,
            self.stats,
            self._log,
            holder=self.holder,
            max_attempts=self.max_attempts,
            poll_interval=poll_interval,
        )
        self._completer = Completer(
            self.stage,
            self._writer,
            self._leases,
            self.stats,
            self._log,
            max_attempts=self.max_attempts,
            completion_window=completion_window,
            drain_timeout=drain_timeout,
            stopping=self._stopping,
        )
        settle = Reconcile.of(
            self.stage, handler, self._writer, self._completer, self._retry, self._log
        )
        self._executor = Executor(
            self.stage,
            handler,
            self._completer,
            self._leases,
            self._writer,
            self._retry,
            self._log,
            settle=settle,
        )
        # LISTEN on the stage's channel while running (no I/O until run()).
        self.listener = (
            Listener(connect, self.stage.channel, self._wake, outage=self.outage)
            if self.listen
            else None
        )

    async def run(
        self, stop: asyncio.Event | None = None, *, exit_when_idle: bool = False
    ) -> WorkerStats:
        """Work until ``stop`` is set; with ``exit_when_idle``, until nothing is claimable, in
        flight or waiting out a backoff. Returns the counts of what happened.

        The stop, in order: no more claims; running handlers finish (up to ``drain_timeout``,
        the rest are cancelled and their claims given back); the completer writes what is left,
        trying an unreachable database until the stop's deadline; the heartbeat ends; what could
        still not be written is given up (ERROR lines); the connections close."""
        stop = stop or asyncio.Event()
        if self.listener is not None:
            self.listener.start()
        heartbeat = asyncio.create_task(
            self._leases.heartbeats(self._writes_db, self.outage, self._writer.failed),
            name="heartbeat",
        )
        completer = asyncio.create_task(self._completer.run(self._executor.busy), name="completer")
        try:
            await self._claim_loop(stop, exit_when_idle)
            self._completer.stop_requested()
            if abandoned := await self._executor.drain(self.drain_timeout):
                self._completer.release(abandoned)
        finally:
            # The completer is asked to finish, not cancelled (see Completer.finish). It keeps
            # trying an unreachable database until the stop's deadline.
            self._completer.finish()
            with suppress(Exception):
                await completer
            heartbeat.cancel()
            with suppress(asyncio.CancelledError):
                await heartbeat
            if await self._completer.flush() is not None:  # what the completer could not take
                self._completer.give_up_kept()
            if self.listener is not None:
                await self.listener.stop()
            await self._claims_db.close()
            await self._writes_db.close()
            self.stats.disconnected_seconds = round(self.outage.disconnected_seconds(), 3)
        return self.stats

    async def _claim_loop(self, stop: asyncio.Event, exit_when_idle: bool) -> None:
        settled = False  # a claim found nothing after every result had been written
        running = self._executor.running
        while not stop.is_set():
            if not self._completer.writable.is_set():
                # Results wait for the database: claim nothing before they are written or given
                # back, or this worker would take its own tokens over (and spend an attempt).
                await wait_any(self._completer.writable, stop, seconds=None)
                continue
            free = self.concurrency - len(running)
            if free <= 0:
                self._executor.slot_free.clear()
                await wait_any(self._executor.slot_free, stop, seconds=None)
                continue
            # Let handlers that finished in the same turn free their slots first, so one claim
            # serves them all.
            await asyncio.sleep(0)
            free = self.concurrency - len(running)
            size = self.batch if self.stage.whole_batch else min(self.batch, free)
            self._wake.clear()
            claims = await self._claimer.claim(size, stop)
            if claims is None:  # the database failed; the claimer waited before the next try
                continue
            if claims:
                self._executor.start(claims)
                settled = False
                continue
            if exit_when_idle and not running:
                # Idle only if a claim made after every result was written found nothing, and
                # nothing waits out a backoff.
                if self._completer.pending() or not settled:
                    if await self._completer.flush() is not None:
                        await self._claimer.backoff.wait(stop)
                    else:
                        settled = True
                    continue
                pause = await self._claimer.next_backoff()
                if pause is None:
                    return
                settled = False
                await wait_any(stop, seconds=min(pause + 0.01, self.poll_interval))
                continue
            # Nothing claimable: sleep until woken (NOTIFY), a poll is due, or stop.
            await wait_any(self._wake, stop, seconds=self.poll_interval)
