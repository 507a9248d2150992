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

from glisk.embedded_pg import EmbeddedPostgres
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
    if True:
        url = server.url
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
