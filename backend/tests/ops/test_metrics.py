"""Prometheus metrics: the API's /metrics against a seeded database, and a worker's registry
read from a real worker run."""

from __future__ import annotations

import asyncio
import random
import string
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from glisk.api.metrics import UNMATCHED
from glisk.uow import UnitOfWorkFactory
from glisk.workers import Claim, ConnectOptions, PermanentError, Worker
from glisk.workers.metrics import WorkerMetrics
from glisk.workers.reveal import Reconciler
from glisk.workers.run import database_url_of
from tests.support.api import api_settings, create_logged_app, logging_restored, serving
from tests.support.database import Database
from tests.support.seeding import EXPECTED_STAGES, seed, sql

# RFC 9110's methods and PATCH: the only method labels, whatever clients send.
STANDARD_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}


def samples(body: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text body, keyed by name and sorted labels (parses strictly:
    a malformed body raises)."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


@pytest.fixture
def restored_logging() -> Iterator[None]:
    with logging_restored():
        yield


async def test_api_metrics_parse_and_the_token_gauge_matches_the_table(
    postgres_container: Database, uow_factory: UnitOfWorkFactory, restored_logging: None
) -> None:
    seed(postgres_container.url)
    app, _ = create_logged_app(api_settings(postgres_container.url))
    async with serving(app) as client:
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/no/such/0xabc")).status_code == 404
        response = await client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        body = response.text
        table = dict(
            sql(postgres_container.url, "SELECT status::text, count(*) FROM tokens_s0 GROUP BY 1")
        )
        # The gauge is cached: a token added now shows only after the cache's lifetime.
        sql(
            postgres_container.url,
            "UPDATE tokens_s0 SET status = 'failed' WHERE token_id = 1 RETURNING 1",
        )
        cached = samples((await client.get("/metrics")).text)
    got = samples(body)
    for status in ("detected", "generating", "uploading", "ready", "revealed", "failed"):
        assert got[("glisk_tokens", (("status", status),))] == table.get(status, 0), status
        assert cached[("glisk_tokens", (("status", status),))] == table.get(status, 0), status
    assert got[("glisk_tokens_revealed_estimated", ())] == 0
    # The stage gauges: the states tests.support.seeding seeds (test_ops checks them against SQL).
    for stage, expected in EXPECTED_STAGES.items():
        for state in ("waiting", "in_flight", "expired", "backoff"):
            key = ("glisk_stage_tokens", (("stage", stage), ("state", state)))
            assert got[key] == expected[state], (stage, state)
        assert got[("glisk_stage_oldest_waiting_seconds", (("stage", stage),))] > 60 * 60
    assert (
        got[
            (
                "glisk_http_requests_total",
                (("method", "GET"), ("route", "/health"), ("status", "200")),
            )
        ]
        == 1
    )
    assert (
        got[
            (
                "glisk_http_requests_total",
                (("method", "GET"), ("route", "<unmatched>"), ("status", "404")),
            )
        ]
        == 1
    )
    assert (
        got[
            ("glisk_http_request_duration_seconds_count", (("method", "GET"), ("route", "/health")))
        ]
        == 1
    )
    # Counts only: no path, wallet, prompt or URL reaches a label.
    assert "0xabc" not in body and "no/such" not in body and "0x" not in body
    assert "postgresql" not in body and "prompt" not in body


async def test_worker_metrics_count_what_the_worker_did_and_time_each_handler_call(
    uow_factory: UnitOfWorkFactory, postgres_container: Database
) -> None:
    seed(postgres_container.url)  # image stage: 3 waiting, 2 with an expired lease
    async with uow_factory() as uow:
        # Past the backoffs, so everything of the image stage is claimable now.
        await uow.session.execute(text("UPDATE tokens_s0 SET not_before = NULL"))
    calls = 0

    async def image(claim: Claim) -> str:
        nonlocal calls
        calls += 1
        if claim.token_id == 1:
            raise PermanentError("bad prompt")
        return f"/images/{claim.token_id}.png"

    metrics = WorkerMetrics("image")
    worker = Worker(
        "image",
        metrics.wrap(image),
        ConnectOptions(database_url_of(uow_factory)),
        holder="metrics-test",
        max_attempts=5,
    )
    metrics.attach(worker)
    stats = await asyncio.wait_for(worker.run(exit_when_idle=True), 30)
    got = samples(generate_latest(metrics.registry).decode())
    labels = (("stage", "image"), ("worker", "metrics-test"))
    assert got[("glisk_worker_claims_total", labels)] == stats.claimed == calls == 7
    assert got[("glisk_worker_completions_total", labels)] == stats.completed == 6
    assert got[("glisk_worker_failures_total", (("kind", "attempt"), *labels))] == 1
    assert got[("glisk_worker_rescues_total", labels)] == stats.rescued == 2
    assert got[("glisk_worker_refused_total", labels)] == 0
    assert got[("glisk_worker_results_given_up_total", labels)] == 0
    assert got[("glisk_worker_db_disconnected_seconds_total", labels)] == 0
    ok = (("outcome", "ok"), ("stage", "image"))
    error = (("outcome", "error"), ("stage", "image"))
    assert got[("glisk_worker_handler_duration_seconds_count", ok)] == 6
    assert got[("glisk_worker_handler_duration_seconds_count", error)] == 1
    assert got[("glisk_worker_handlers_in_flight", (("stage", "image"),))] == 0


def test_a_timed_reveal_handler_is_still_a_reconciler() -> None:
    class Revealer:
        async def __call__(self, claims: Any) -> str:
            return "0x" + "ab" * 32

        async def reconcile(self, pending: Any) -> Any:
            return "reconciled"

    wrapped: Any = WorkerMetrics("reveal").wrap(Revealer())
    assert isinstance(wrapped, Reconciler)
    reconcile: Any = wrapped.reconcile
    assert asyncio.run(reconcile(None)) == "reconciled"
    assert not isinstance(WorkerMetrics("image").wrap(Revealer().__call__), Reconciler)


async def test_a_worker_serves_its_metrics_over_http(uow_factory: UnitOfWorkFactory) -> None:
    from glisk.embedded import free_port

    metrics = WorkerMetrics("upload")

    async def upload(claim: Claim) -> str:
        return "bafy"

    worker = Worker("upload", metrics.wrap(upload), ConnectOptions(database_url_of(uow_factory)))
    metrics.attach(worker)
    port = free_port()
    metrics.serve(port, addr="127.0.0.1")
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/metrics")
    assert response.status_code == 200
    got = samples(response.text)
    assert got[("glisk_worker_claims_total", (("stage", "upload"), ("worker", worker.holder)))] == 0


async def test_random_methods_and_paths_add_no_series_to_the_request_metrics(
    postgres_container: Database, restored_logging: None
) -> None:
    app, _ = create_logged_app(api_settings(postgres_container.url))
    rng = random.Random(22)

    def word(longest: int) -> str:
        return "".join(rng.choices(string.ascii_uppercase, k=rng.randint(1, longest)))

    async def burst(requests: int) -> None:
        for _ in range(requests):
            await client.request(word(300), f"/{word(40).lower()}/{rng.randrange(10**9)}")
            await client.request(word(300), "/health")
            await client.get(f"/{word(60).lower()}")

    def series(body: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
        return {key for key in samples(body) if key[0].startswith("glisk_http_")}

    async with serving(app) as client:
        await client.get("/metrics")  # a scrape counts itself once it has answered
        await burst(10)
        before = series((await client.get("/metrics")).text)
        await burst(300)
        after = series((await client.get("/metrics")).text)
    assert after == before, sorted(after - before)[:5]
    labels = [dict(key[1]) for key in after]
    assert {label["method"] for label in labels} <= STANDARD_METHODS | {"OTHER"}
    assert {label["method"] for label in labels} >= {"GET", "OTHER"}
    assert {label["route"] for label in labels} <= {"/health", "/metrics", UNMATCHED}
