"""The database goes away under ``glisk worker`` processes with handlers in flight: an outage
shorter than the lease costs nothing, one longer than the lease gives results up loudly (and no
attempt when nobody took the tokens over), and the log says what happened once.

Each test stops and restarts a private server of its own (tests/support/outages.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from glisk.embedded import EmbeddedPostgres
from tests.support.outages import restartable_server, rows, seed_detected, worker_process
from tests.support.waiting import eventually

TOKENS = 8


@pytest.fixture
def server() -> Iterator[EmbeddedPostgres]:
    """Outside the event loop: migrating runs a loop of its own."""
    with restartable_server() as private:
        yield private


def _claimed(url: str) -> int:
    return int(rows(url, "SELECT count(*) FROM audit_claims")[0][0])


def _completed(url: str) -> int:
    return int(rows(url, "SELECT count(*) FROM tokens_s0 WHERE image_path IS NOT NULL")[0][0])


@pytest.mark.slow
async def test_an_outage_shorter_than_the_lease_completes_every_token_once_without_a_rescue(
    server: EmbeddedPostgres, tmp_path: Path
) -> None:
    outage_seconds = 15.0
    url = server.url
    if True:
        seed_detected(url, TOKENS)
        with worker_process(
            url,
            tmp_path / "worker.log",
            handler_seconds=2.0,
            WORKER_LEASE_SECONDS="40",
            WORKER_CONCURRENCY=str(TOKENS),
        ) as worker:
            await eventually(lambda: _claimed(url) == TOKENS, 30, "every token claimed", poll=0.05)
            before = worker.size()
            await asyncio.to_thread(server.stop)
            await asyncio.sleep(outage_seconds)  # the outage itself; handlers finish during it
            await asyncio.to_thread(server.start)
            restarted = time.monotonic()
            await eventually(lambda: _completed(url) == TOKENS, 60, "every token completed")
            after_restart = time.monotonic() - restarted
            outage_lines = [
                line for line in worker.lines_since(before) if "worker.complete" not in line
            ]
            code = worker.stop()
        assert code == 0, worker.text()
        claims = rows(url, "SELECT token_id, attempt, rescued FROM audit_claims ORDER BY 1")
        completions = rows(url, "SELECT token_id FROM audit_completions ORDER BY 1")
        failed = rows(url, "SELECT count(*) FROM tokens_s0 WHERE status = 'failed'")[0][0]
    assert claims == [(n, 1, False) for n in range(1, TOKENS + 1)], "claimed once each, no rescue"
    assert completions == [(n,) for n in range(1, TOKENS + 1)], "completed once each"
    assert failed == 0
    # Within seconds of the restart, not after the 40 s leases ran out (a generous margin over
    # the reconnect backoff's cap).
    assert after_restart < 20, after_restart
    assert len(outage_lines) <= 5, "\n".join(outage_lines)


# Outages longer than the lease: a short lease, a short reconnect cap (the test's pace, not what
# it proves), handlers that finish during the outage.
SHORT_LEASE = {"WORKER_LEASE_SECONDS": "4", "WORKER_RECONNECT_CAP": "1"}
LONG_OUTAGE_SECONDS = 7.0


async def _outage(server: EmbeddedPostgres, seconds: float) -> None:
    await asyncio.to_thread(server.stop)
    await asyncio.sleep(seconds)  # the outage itself
    await asyncio.to_thread(server.start)


def _given_up(log: str) -> list[int]:
    """The token ids every worker.results_given_up line names, in order."""
    named: list[int] = []
    for line in log.splitlines():
        if "] worker.results_given_up" in line:
            listed = line.split("tokens=[", 1)[1].split("]", 1)[0]
            named += [int(n) for n in listed.split(",")]
    return named


@pytest.mark.slow
async def test_an_outage_longer_than_the_lease_gives_results_up_in_an_error_and_exits_1(
    server: EmbeddedPostgres, tmp_path: Path
) -> None:
    url = server.url
    seed_detected(url, TOKENS)
    with worker_process(
        url, tmp_path / "worker.log", handler_seconds=1.0, WORKER_CONCURRENCY=str(TOKENS),
        **SHORT_LEASE,
    ) as worker:  # fmt: skip
        await eventually(lambda: _claimed(url) == TOKENS, 30, "every token claimed", poll=0.05)
        await _outage(server, LONG_OUTAGE_SECONDS)
        await eventually(lambda: _completed(url) == TOKENS, 60, "every token completed")
        code = worker.stop()
    log = worker.text()
    assert code == 1, log
    assert "finished result(s) were given up" in log.splitlines()[-1]
    assert "[error    ] worker.results_given_up" in log, log
    assert sorted(_given_up(log)) == list(range(1, TOKENS + 1)), log
    claims = rows(url, "SELECT token_id, attempt, rescued FROM audit_claims ORDER BY 1, claim")
    completions = rows(url, "SELECT token_id FROM audit_completions ORDER BY 1")
    # Taken again after the outage, every one: given back by the worker that came back (its
    # handler had succeeded), so the second claim is a first attempt again, not a rescue.
    assert sorted(claims) == sorted((n, 1, False) for n in range(1, TOKENS + 1) for _ in (1, 2))
    assert completions == [(n,) for n in range(1, TOKENS + 1)], "completed once each"


@pytest.mark.slow
async def test_three_outages_in_a_row_on_the_same_tokens_leave_them_completed_not_failed(
    server: EmbeddedPostgres, tmp_path: Path
) -> None:
    url = server.url
    tokens = 4
    seed_detected(url, tokens)
    with worker_process(
        url, tmp_path / "worker.log", handler_seconds=1.0, WORKER_CONCURRENCY=str(tokens),
        WORKER_MAX_ATTEMPTS="3", **SHORT_LEASE,
    ) as worker:  # fmt: skip
        for outage in range(1, 4):
            # Each outage catches the same tokens in flight: claimed anew after the last one.
            await eventually(
                lambda n=outage: _claimed(url) == n * tokens, 60, f"claims before outage {outage}"
            )
            await _outage(server, LONG_OUTAGE_SECONDS)
        await eventually(lambda: _completed(url) == tokens, 60, "every token completed")
        worker.stop()
    statuses = rows(url, "SELECT status::text, count(*) FROM tokens_s0 GROUP BY 1")
    completions = rows(url, "SELECT token_id FROM audit_completions ORDER BY 1")
    assert statuses == [("generating", tokens)], worker.text()  # the image stage's done state
    assert completions == [(n,) for n in range(1, tokens + 1)]
    assert rows(url, "SELECT count(*) FROM audit_claims WHERE attempt > 1 OR rescued") == [(0,)]
