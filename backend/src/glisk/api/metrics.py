"""The API's Prometheus metrics: ``GET /metrics`` and the request counters.

Counts and durations only: no label ever holds a wallet, a prompt, a URL or a token id, and
every label value comes from a fixed set, whatever clients send: routes are labelled by their
template (``/tokens/{token_id}``) and requests that match no route by ``<unmatched>``; methods are
the standard verbs, any other by ``OTHER``; statuses are the ones the app answers with. Each app
builds its own ``CollectorRegistry``: nothing is registered at import.

- ``glisk_http_requests_total{method, route, status}``
- ``glisk_http_request_duration_seconds{method, route}`` (histogram)
- ``glisk_tokens{status}``: tokens by status, read at most every ``TOKEN_GAUGE_TTL`` seconds with
  the index-backed statements of ``glisk status`` (``glisk.ops.queries``; revealed is estimated
  on large tables: ``glisk_tokens_revealed_estimated`` is 1 then); from the same read,
  ``glisk_stage_tokens{stage, state}`` (waiting, in_flight, expired, backoff) and
  ``glisk_stage_oldest_waiting_seconds{stage}``; the reveal keeper's, by chain id (never by
  address): ``glisk_keeper_next_nonce``, ``glisk_keeper_reveals_in_flight``,
  ``glisk_keeper_reveals_stuck`` (newest attempt older than REVEAL_STUCK_SECONDS),
  ``glisk_keeper_oldest_in_flight_seconds``, and ``glisk_keeper_in_flight_max_fee_gwei`` (the
  highest fee offered by a reveal in flight), ``glisk_keeper_fee_cap_gwei``
  (REVEAL_MAX_GAS_PRICE_GWEI)
- ``glisk_webhook_requests_total{outcome}``, ``glisk_webhook_logs_total{answer}``
  (POST /webhooks/alchemy); from the same read as the tokens, once ``glisk ingest`` has run:
  ``glisk_ingest_lag_blocks`` and ``glisk_ingest_halted`` (1 after a reorg deeper than the window)

A worker's own endpoint is ``glisk.workers.metrics``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from glisk.ops.queries import (
    ESTIMATE_ABOVE,
    IN_FLIGHT,
    IN_FLIGHT_SHOWN,
    INGEST_STATE,
    KEEPER,
    REVEALED_EXACT,
    STATUS_COUNTS,
    TABLE_ROWS,
    stage_counts,
)
from glisk.pipeline import STAGES

if TYPE_CHECKING:
    from fastapi import FastAPI
    from sqlalchemy.ext.asyncio import AsyncEngine

TOKEN_GAUGE_TTL = 10.0
UNMATCHED = "<unmatched>"
# The request methods a label may name (RFC 9110's, and PATCH); anything else a client sends is
# counted as OTHER, so random methods cannot add series.
METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
OTHER_METHOD = "OTHER"
_STATUSES = ("detected", "generating", "uploading", "ready", "revealed", "failed")


class TokenGauge(Collector):
    """``glisk_tokens{status}`` and the stage gauges, from a cache that ``refresh`` renews at
    most every ``ttl`` seconds (a scrape never waits on more than these few index reads)."""

    def __init__(self, ttl: float = TOKEN_GAUGE_TTL, estimate_above: int = ESTIMATE_ABOVE) -> None:
        self.ttl = ttl
        self.estimate_above = estimate_above
        self.counts: dict[str, int] | None = None
        # stage -> (waiting, in flight, expired, backoff, oldest waiting seconds or None)
        self.stages: dict[str, tuple[Any, ...]] = {}
        self.estimated = False
        # chain id -> (next nonce, in flight, stuck, oldest in flight seconds)
        self.keepers: dict[int, tuple[int, int, int, float]] = {}
        self.in_flight_max_fee_gwei = 0.0
        self.fee_cap_gwei: float | None = None
        # glisk ingest as recorded: (cursor, head, halted) from system_state; None: never ran
        self.ingest: tuple[int | None, int | None, bool] | None = None
        self._read_at = float("-inf")

    async def refresh(
        self, engine: AsyncEngine, *, stuck_after: float = 90.0, fee_cap_gwei: float | None = None
    ) -> None:
        """Re-read the counts if the cache is older than ``ttl``. Database errors propagate."""
        self.fee_cap_gwei = fee_cap_gwei
        if time.monotonic() - self._read_at < self.ttl:
            return
        async with engine.connect() as conn:
            rows = cast("list[tuple[Any, Any]]", (await conn.exec_driver_sql(STATUS_COUNTS)).all())
            counts = {str(row[0]): int(row[1]) for row in rows}
            table_rows = int((await conn.exec_driver_sql(TABLE_ROWS)).scalar_one())
            estimated = table_rows > self.estimate_above
            if estimated:
                counts["revealed"] = max(0, table_rows - sum(counts.values()))
            else:
                counts["revealed"] = int((await conn.exec_driver_sql(REVEALED_EXACT)).scalar_one())
            stages: dict[str, tuple[Any, ...]] = {}
            for name in STAGES:
                stages[name] = tuple((await conn.exec_driver_sql(stage_counts(name))).one())
            params = {"stuck": stuck_after, "limit": IN_FLIGHT_SHOWN}
            keepers: dict[int, tuple[int, int, int, float]] = {}
            for found in (await conn.exec_driver_sql(KEEPER, params)).all():
                row = tuple(found)
                chain_id, before = int(row[0]), keepers.get(int(row[0]), (0, 0, 0, 0.0))
                keepers[chain_id] = (
                    max(before[0], int(row[2])),
                    before[1] + int(row[4]),
                    before[2] + int(row[6]),
                    max(before[3], float(row[5] or 0.0)),
                )
            in_flight = (await conn.exec_driver_sql(IN_FLIGHT, params)).all()
            fees = [float(tuple(r)[5]) / 1e9 for r in in_flight]
            rows = cast("list[tuple[Any, Any]]", (await conn.exec_driver_sql(INGEST_STATE)).all())
            found = {str(key): value for key, value in rows}
        self.keepers = keepers
        self.in_flight_max_fee_gwei = max(fees, default=0.0)
        self.counts = {s: counts.get(s, 0) for s in _STATUSES}
        self.stages = stages
        self.estimated = estimated
        self.ingest = None
        if found:
            cursor, head = found.get("ingest_cursor"), found.get("ingest_head")
            self.ingest = (
                cursor.get("block") if isinstance(cursor, dict) else None,
                head.get("head") if isinstance(head, dict) else None,
                bool(found.get("ingest_halted")),
            )
        self._read_at = time.monotonic()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.counts is None:
            return
        tokens = GaugeMetricFamily("glisk_tokens", "Tokens by status", labels=["status"])
        for status, n in self.counts.items():
            tokens.add_metric([status], n)
        yield tokens
        yield GaugeMetricFamily(
            "glisk_tokens_revealed_estimated",
            "1 when glisk_tokens{status='revealed'} is an estimate from planner statistics",
            value=1 if self.estimated else 0,
        )
        by_state = GaugeMetricFamily(
            "glisk_stage_tokens",
            "Tokens of a stage by lease state (waiting, in_flight, expired, backoff)",
            labels=["stage", "state"],
        )
        oldest = GaugeMetricFamily(
            "glisk_stage_oldest_waiting_seconds",
            "Seconds since the mint of the stage's oldest claimable token (0: none waits)",
            labels=["stage"],
        )
        for name, row in self.stages.items():
            for state, value in zip(
                ("waiting", "in_flight", "expired", "backoff"), row, strict=False
            ):
                by_state.add_metric([name, state], int(value))
            oldest.add_metric([name], float(row[4]) if row[4] is not None else 0.0)
        yield by_state
        yield oldest
        yield from self._ingest_gauges()
        yield from self._keeper_gauges()

    def _keeper_gauges(self) -> Iterator[GaugeMetricFamily]:
        docs = (
            ("glisk_keeper_next_nonce", "The nonce the keeper's next reveal takes"),
            ("glisk_keeper_reveals_in_flight", "Reveal transactions sent and not confirmed"),
            ("glisk_keeper_reveals_stuck", "Reveals in flight whose newest attempt is stuck"),
            ("glisk_keeper_oldest_in_flight_seconds", "Age of the oldest reveal in flight"),
        )
        for index, (name, doc) in enumerate(docs):
            family = GaugeMetricFamily(name, doc, labels=["chain_id"])
            for chain_id, values in self.keepers.items():
                family.add_metric([str(chain_id)], values[index])
            yield family
        yield GaugeMetricFamily(
            "glisk_keeper_in_flight_max_fee_gwei",
            "The highest maxFeePerGas a reveal in flight offers (0: none in flight)",
            value=self.in_flight_max_fee_gwei,
        )
        if self.fee_cap_gwei is not None:
            yield GaugeMetricFamily(
                "glisk_keeper_fee_cap_gwei",
                "REVEAL_MAX_GAS_PRICE_GWEI: the most a reveal may offer per gas",
                value=self.fee_cap_gwei,
            )

    def _ingest_gauges(self) -> Iterator[GaugeMetricFamily]:
        if self.ingest is not None:
            cursor, head, halted = self.ingest
            if isinstance(cursor, int) and isinstance(head, int):
                yield GaugeMetricFamily(
                    "glisk_ingest_lag_blocks",
                    "The node's head minus the last block glisk ingest consumed (as recorded)",
                    value=max(0, head - cursor),
                )
            yield GaugeMetricFamily(
                "glisk_ingest_halted",
                "1 when glisk ingest stopped on a reorg deeper than its window (operator)",
                value=1 if halted else 0,
            )


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "glisk_http_requests",
            "HTTP requests by method (standard verbs, else OTHER), route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "glisk_http_request_duration_seconds",
            "HTTP request duration by route template",
            ["method", "route"],
            registry=self.registry,
        )
        self.tokens = TokenGauge()
        self.registry.register(self.tokens)
        # POST /webhooks/alchemy: deliveries by outcome, and the mint logs they carried by answer.
        self.webhook_requests = Counter(
            "glisk_webhook_requests",
            "Webhook deliveries by outcome (accepted, unauthorized, invalid, too_large, "
            "unavailable)",
            ["outcome"],
            registry=self.registry,
        )
        self.webhook_logs = Counter(
            "glisk_webhook_logs",
            "Mint logs of accepted webhook deliveries by answer",
            ["answer"],
            registry=self.registry,
        )


class MetricsMiddleware:
    """Counts and times every HTTP request by its route template (read from the scope after
    routing, so an id in the path never becomes a label)."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or UNMATCHED
            method = scope["method"] if scope["method"] in METHODS else OTHER_METHOD
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - started)


def install_api_metrics(app: FastAPI) -> ApiMetrics:
    """Add ``GET /metrics`` and the request middleware to ``app`` (call before it starts). The
    token gauge reads through ``app.state.engine``, which the lifespan publishes."""
    metrics = ApiMetrics()

    async def metrics_endpoint(request: Request) -> Response:
        settings = getattr(request.app.state, "settings", None)
        await metrics.tokens.refresh(
            request.app.state.engine,
            stuck_after=settings.reveal_stuck_seconds if settings else 90.0,
            fee_cap_gwei=float(settings.reveal_max_gas_price_gwei) if settings else None,
        )
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_api_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return metrics
