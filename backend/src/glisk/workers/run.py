"""``run_worker``: the one-call way to run a stage on an application's unit-of-work factory."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from glisk.pipeline import Stage, StageName
from glisk.workers.connection import ConnectOptions
from glisk.workers.executor import Handler
from glisk.workers.leases import holder_named
from glisk.workers.stats import WorkerStats
from glisk.workers.worker import Worker

if TYPE_CHECKING:
    from glisk.uow import UnitOfWorkFactory


def database_url_of(uow_factory: UnitOfWorkFactory) -> str:
    """The URL (password included) of the engine behind a unit-of-work factory. Builds a unit of
    work without entering it: no I/O."""
    engine = uow_factory().session_factory.kw["bind"]
    return engine.url.render_as_string(hide_password=False)


def connect_options_of(uow_factory: UnitOfWorkFactory, **options: Any) -> ConnectOptions:
    """ConnectOptions for the database behind ``uow_factory``, following its DB_POOLER mode:
    behind a transaction-mode pooler nothing is prepared on the server."""
    from glisk.core.database import pooler_of

    engine = uow_factory().session_factory.kw["bind"]
    options.setdefault("pooler", pooler_of(engine))
    return ConnectOptions(database_url_of(uow_factory), **options)


async def run_worker(
    stage: Stage | StageName | str,
    handler: Handler,
    uow_factory: UnitOfWorkFactory,
    *,
    holder: str | None = None,
    batch: int | None = None,
    lease_seconds: float = 60.0,
    max_attempts: int = 3,
    poll_interval: float = 1.0,
    stop: asyncio.Event | None = None,
    exit_when_idle: bool = False,
    concurrency: int | None = None,
    backoff_base: float = 5.0,
    backoff_cap: float = 600.0,
    max_deferrals: int = 20,
    listen: bool | None = None,
    db_timeout: float = 10.0,
    prepare_statements: bool | None = None,
    drain_timeout: float | None = None,
    reconnect_cap: float = 5.0,
    worker_id: str | None = None,
) -> WorkerStats:
    """Run one stage until ``stop`` is set (or, with ``exit_when_idle``, until nothing of the
    stage is claimable, in flight or waiting out a backoff).

    ``handler`` gets one Claim and returns the stage's result (image stage: the image path;
    upload stage: the metadata CID); for the reveal stage it gets the whole batch and returns the
    transaction hash. It runs with no database transaction open, up to ``concurrency`` at once
    (default: ``batch`` for per-token stages, one batch at a time for the reveal). Raising fails
    the attempt: the token is retried after a backoff until ``max_attempts``; PermanentError
    fails it at once; RetryLater(s) brings it back after ``s`` seconds without spending an
    attempt. While the database cannot be reached, finished results are kept and written once
    it answers; reconnection backs off up to ``reconnect_cap`` seconds. See ``Worker`` for the
    rest; the worker opens its own connections (three at most)
    to the database ``uow_factory`` uses. ``listen`` and ``prepare_statements`` default to what
    that engine's DB_POOLER mode allows (both off behind a transaction-mode pooler). ``holder``
    is the name recorded on the claims (``worker_id``: its deprecated name).
    """
    holder = holder_named(holder, worker_id)
    connect = connect_options_of(uow_factory, timeout=db_timeout)
    if prepare_statements is False:  # as behind a transaction-mode pooler
        connect = replace(connect, pooler="transaction")
    worker = Worker(
        stage,
        handler,
        connect,
        holder=holder,
        concurrency=concurrency,
        batch=batch,
        lease_seconds=lease_seconds,
        max_attempts=max_attempts,
        poll_interval=poll_interval,
        backoff_base=backoff_base,
        backoff_cap=backoff_cap,
        max_deferrals=max_deferrals,
        listen=listen,
        drain_timeout=drain_timeout,
        reconnect_cap=reconnect_cap,
    )
    return await worker.run(stop, exit_when_idle=exit_when_idle)
