"""How a worker tells an outage from a blip and says so once (glisk.workers.outage), and what a
worker does with work it could not write: given up loudly when it must stop first, given back
when a checkpoint could not be written while its lease lived. The database is cut away by a
proxy (tests/support/proxy.py); the suite's server keeps running."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import psycopg
import pytest
import structlog
from prometheus_client import generate_latest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from glisk.errors import DatabaseError, DatabaseTimeout
from glisk.pipeline import STAGES, StageName
from glisk.uow import UnitOfWorkFactory
from glisk.workers import Claim, ConnectOptions, LeaseLost, Worker, checkpoint
from glisk.workers.connection import libpq_url
from glisk.workers.metrics import WorkerMetrics
from glisk.workers.outage import Backoff, Outage, unreachable
from glisk.workers.run import connect_options_of
from tests.support.database import Database
from tests.support.factories import seed_tokens
from tests.support.proxy import Proxy, target_of
from tests.support.waiting import eventually

IMAGE = STAGES[StageName.IMAGE]


def _refused() -> DatabaseError:
    error = DatabaseError('connection failed: connection to server at "127.0.0.1" failed: refused')
    error.__cause__ = psycopg.OperationalError("connection refused")
    return error


def _shutting_down() -> DatabaseError:
    return DatabaseError("terminating connection due to administrator command", sqlstate="57P01")


class _Log:
    """Collects what the tracker logs, as (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.lines.append(("warning", event, fields))

    def info(self, event: str, **fields: Any) -> None:
        self.lines.append(("info", event, fields))


def test_an_error_in_the_statement_is_no_outage() -> None:
    assert not unreachable(DatabaseError("division by zero", sqlstate="22012"))
    assert not unreachable(DatabaseError("deadlock detected", sqlstate="40P01"))
    assert not unreachable(DatabaseError("canceling statement due to statement timeout", sqlstate="57014"))  # fmt: skip
    for outage in (
        _refused(),
        _shutting_down(),
        DatabaseError("sorry, too many clients already", sqlstate="53300"),
        DatabaseError("could not extend file: No space left on device", sqlstate="53100"),
        DatabaseTimeout("no answer within 10 s"),
        ConnectionResetError(),
    ):
        assert unreachable(outage), outage
    log = _Log()
    assert Outage(log).failed(DatabaseError("division by zero", sqlstate="22012")) is False
    assert log.lines == []


async def test_a_connection_dropped_once_and_reopened_at_the_next_try_is_no_outage() -> None:
    log = _Log()
    outage = Outage(log, announce_after=0.0)
    assert outage.failed(_refused())
    assert not outage.back.is_set()
    outage.succeeded()
    assert outage.back.is_set() and not outage.failing
    assert log.lines == [], "a blip is not worth a line"


async def test_an_outage_is_one_line_with_the_servers_reason_then_one_line_when_it_ends() -> None:
    log = _Log()
    outage = Outage(log, cap=5.0, announce_after=0.0)
    outage.failed(_refused())  # the client's view of a closed socket comes first
    outage.failed(_shutting_down())  # then what PostgreSQL said
    for _ in range(50):
        outage.failed(_refused())
    assert outage.down
    outage.succeeded()
    outage.succeeded()
    assert [(level, event.split(":")[0]) for level, event, _ in log.lines] == [
        ("warning", "database unreachable"),
        ("info", "database back after 0.0 s"),
    ]
    assert log.lines[0][1] == (
        "database unreachable: terminating connection due to administrator command "
        "(retrying at least every 5 s)"
    )
    assert log.lines[1][2] == {"outage": "back", "seconds": 0.0}
    assert outage.disconnected_seconds() >= 0.0


async def test_a_loop_backs_off_to_the_cap_and_the_end_of_an_outage_wakes_it_at_once() -> None:
    outage = Outage(_Log(), cap=0.4, announce_after=0.0)
    backoff = Backoff(outage, first=0.05)
    delays = []
    for _ in range(6):
        delays.append(backoff.next_delay())
        await backoff.wait()
    assert delays == [0.05, 0.1, 0.2, 0.4, 0.4, 0.4]
    backoff.reset()
    assert backoff.next_delay() == 0.05

    long_outage = Outage(_Log(), cap=60.0, announce_after=0.0)
    long_outage.failed(_refused())
    long_outage.failed(_refused())  # announced: its end wakes every waiting loop at once
    started = time.monotonic()
    waiting = asyncio.create_task(Backoff(long_outage, first=60.0).wait())
    await asyncio.sleep(0)
    long_outage.succeeded()
    await asyncio.wait_for(waiting, 5)
    assert time.monotonic() - started < 5  # not the 30-60 s pause


@pytest.fixture
async def proxy(postgres_container: Database) -> AsyncIterator[Proxy]:
    async with Proxy(*target_of(postgres_container.url)) as running:
        yield running


def _through(proxy: Proxy, database: Database, **options: Any) -> ConnectOptions:
    # The proxy's TCP port instead of the server's address (or socket directory, in the query).
    url = (
        make_url(database.url)
        .difference_update_query(["host", "port"])
        .set(host="127.0.0.1", port=proxy.port)
    )
    return ConnectOptions(
        libpq_url(url.render_as_string(hide_password=False)),
        pooler=database.pooler,
        **options,
    )


async def test_a_worker_stopped_during_an_outage_gives_up_its_results_in_an_error_naming_them(
    uow_factory: UnitOfWorkFactory, postgres_container: Database, proxy: Proxy
) -> None:
    await seed_tokens(uow_factory, 3)
    finish = asyncio.Event()

    async def handler(claim: Claim) -> str:
        await finish.wait()
        return f"/img/{claim.token_id}.png"

    connect = _through(proxy, postgres_container, timeout=2.0, connect_timeout=1.0)
    worker = Worker(
        IMAGE, handler, connect, concurrency=3, batch=3, lease_seconds=30, drain_timeout=1.0,
        reconnect_cap=0.2, listen=False, poll_interval=0.05,
    )  # fmt: skip
    metrics = WorkerMetrics("image")
    metrics.attach(worker)
    stop = asyncio.Event()
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(worker.run(stop))
        await eventually(lambda: worker.stats.claimed == 3, 10, "three tokens claimed")
        await proxy.cut()
        finish.set()
        await eventually(lambda: worker.outage.failing, 10, "the results' write failed")
        stop.set()
        stats = await asyncio.wait_for(task, 15)
    assert (stats.completed, stats.given_up) == (0, 3)
    given_up = [entry for entry in logs if entry["event"] == "worker.results_given_up"]
    assert len(given_up) == 1, logs
    async with uow_factory() as uow:
        token_ids = (await uow.session.execute(text("SELECT token_id FROM tokens_s0"))).scalars()
        assert given_up[0]["tokens"] == sorted(token_ids)
    assert given_up[0]["log_level"] == "error"
    assert "stopped" in given_up[0]["reason"]
    scraped = generate_latest(metrics.registry).decode()
    assert 'glisk_worker_results_given_up_total{stage="image"' in scraped
    given_up_total = next(
        line
        for line in scraped.splitlines()
        if line.startswith("glisk_worker_results_given_up_total{")
    )
    assert given_up_total.endswith(" 3.0")
    assert stats.disconnected_seconds > 0


async def test_a_checkpoint_the_outage_kept_out_while_the_lease_lived_costs_no_attempt(
    uow_factory: UnitOfWorkFactory, postgres_container: Database, proxy: Proxy
) -> None:
    await seed_tokens(uow_factory, 1)
    calls: list[Claim] = []
    stopped: list[BaseException] = []

    async def handler(claim: Claim) -> str:
        calls.append(claim)
        if len(calls) == 1:
            await proxy.cut()
            try:
                await checkpoint(claim, {"step": "about to call out"})
            except LeaseLost as exc:
                stopped.append(exc)
                await proxy.restore()
                raise
        return f"/img/{claim.token_id}.png"

    connect = _through(proxy, postgres_container, timeout=2.0, connect_timeout=1.0)
    worker = Worker(
        IMAGE, handler, connect, lease_seconds=2.0, reconnect_cap=0.2, listen=False,
        poll_interval=0.05,
    )  # fmt: skip
    stats = await asyncio.wait_for(worker.run(exit_when_idle=True), 30)
    assert len(stopped) == 1, "the handler was told to stop before its external effect"
    # Given back when the database answered: the next claim is a first attempt, not a rescue.
    assert [c.attempt for c in calls] == [1, 1]
    assert calls[1].rescued_from is None
    assert (stats.released, stats.completed, stats.given_up, stats.refused) == (1, 1, 0, 0)


async def test_a_completion_whose_answer_was_lost_counts_as_written_not_given_up(
    uow_factory: UnitOfWorkFactory, postgres_container: Database, proxy: Proxy
) -> None:
    await seed_tokens(uow_factory, 1)
    started, finish = asyncio.Event(), asyncio.Event()

    async def handler(claim: Claim) -> str:
        await checkpoint(claim, {"step": "started"})  # the write connection is open now
        started.set()
        await finish.wait()
        return f"/img/{claim.token_id}.png"

    connect = _through(proxy, postgres_container, timeout=1.0, connect_timeout=1.0)
    worker = Worker(
        IMAGE, handler, connect, lease_seconds=30, reconnect_cap=0.2, listen=False,
        poll_interval=0.05,
    )  # fmt: skip
    task = asyncio.create_task(worker.run(exit_when_idle=True))
    await asyncio.wait_for(started.wait(), 10)
    # The completion runs and commits, but its answer never arrives: the worker's time limit
    # closes that connection, and the retry on a new one finds the claim already ended.
    proxy.hold()
    finish.set()
    await eventually(lambda: worker.outage.failing, 10, "the completion's answer lost")
    proxy.release()
    stats = await asyncio.wait_for(task, 30)
    assert (stats.completed, stats.given_up, stats.refused) == (1, 0, 0)
    async with uow_factory() as uow:
        path = (await uow.session.execute(text("SELECT image_path FROM tokens_s0"))).scalar_one()
    assert path is not None


async def test_nothing_is_claimed_while_a_finished_result_waits_for_the_database(
    uow_factory: UnitOfWorkFactory,
) -> None:
    # Claiming then could take this worker's own tokens over once their leases run out, and
    # spend an attempt on work that finished. Only the write connection is cut here: claims get
    # through, so only the wait for the kept result stops them.
    await seed_tokens(uow_factory, 1)

    async def done(claim: Claim) -> str:
        return f"/img/{claim.token_id}.png"

    worker = Worker(
        IMAGE, done, connect_options_of(uow_factory), batch=1, concurrency=1, listen=False,
        poll_interval=0.05, reconnect_cap=0.2,
    )  # fmt: skip
    cut = True
    fetch = worker._writes_db.fetch

    async def cut_fetch(query: str, params: dict[str, Any]) -> Sequence[tuple[Any, ...]]:
        if cut:
            raise DatabaseTimeout("no answer within 1 s; the connection was closed")
        return await fetch(query, params)

    worker._writes_db.fetch = cut_fetch  # type: ignore[method-assign]
    task = asyncio.create_task(worker.run(exit_when_idle=True))
    await eventually(lambda: worker.stats.db_errors >= 2, 10, "the result kept")
    await seed_tokens(uow_factory, 1)  # claimable now, by a claim that gets through
    errors = worker.stats.db_errors
    await eventually(lambda: worker.stats.db_errors >= errors + 5, 10, "more tries to write")
    claimed_meanwhile = worker.stats.claimed
    cut = False
    stats = await asyncio.wait_for(task, 30)
    assert claimed_meanwhile == 1, "a claim was made while a finished result waited"
    assert (stats.claimed, stats.completed, stats.rescued) == (2, 2, 0)
