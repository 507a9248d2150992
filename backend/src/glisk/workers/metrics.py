"""A worker's Prometheus metrics, served on its own port (``glisk worker --metrics-port``).

Counts and durations only, as the API's (glisk.api.metrics): no label holds a wallet, a prompt, a
URL or a token id. Each worker builds its own ``CollectorRegistry``: nothing is registered at
import. Not imported by ``glisk.workers``: only a worker that serves metrics loads
prometheus_client.

``WorkerMetrics``, read from ``Worker.stats`` on every scrape, nothing in the worker's
path but the handler timing:
- ``glisk_worker_claims_total``, ``glisk_worker_completions_total``,
  ``glisk_worker_failures_total{kind}`` (attempt: a handler failure, retried or final;
  exhausted: a claim that found the attempts used up; deferred: a RetryLater),
  ``glisk_worker_rescues_total``, ``glisk_worker_refused_total`` (late results dropped),
  ``glisk_worker_released_total``, ``glisk_worker_db_errors_total``,
  ``glisk_worker_results_given_up_total`` (finished results never recorded: an outage outlasted
  their leases or the drain), ``glisk_worker_db_disconnected_seconds_total`` (time with the
  database unreachable, the current outage included)
- ``glisk_worker_handler_duration_seconds{outcome}`` (histogram; one observation per handler
  call: one token, or one reveal batch), ``glisk_worker_handlers_in_flight``
All worker series carry ``stage`` and ``worker`` labels (the holder name recorded on claims).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from glisk.workers.leases import holder_named

if TYPE_CHECKING:
    from glisk.workers.worker import Worker


class _WorkerStatsCollector(Collector):
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def collect(self) -> Iterator[CounterMetricFamily]:
        stats = self.worker.stats
        labels = ["stage", "worker"]
        values = [self.worker.stage.name, self.worker.holder]

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=labels)
            family.add_metric(values, value)
            return family

        yield counter("glisk_worker_claims", "Tokens claimed", stats.claimed)
        yield counter("glisk_worker_completions", "Tokens completed", stats.completed)
        failures = CounterMetricFamily(
            "glisk_worker_failures", "Failures by kind", labels=[*labels, "kind"]
        )
        failures.add_metric([*values, "attempt"], stats.failed)
        failures.add_metric([*values, "exhausted"], stats.exhausted)
        failures.add_metric([*values, "deferred"], stats.deferred)
        yield failures
        yield counter(
            "glisk_worker_rescues", "Tokens taken over from an expired lease", stats.rescued
        )
        yield counter("glisk_worker_refused", "Late results refused (lease lost)", stats.refused)
        yield counter("glisk_worker_released", "Claims given back unstarted", stats.released)
        yield counter(
            "glisk_worker_db_errors", "Database calls failed or timed out", stats.db_errors
        )
        yield counter(
            "glisk_worker_results_given_up",
            "Finished results and failures never recorded (an outage outlasted their leases)",
            stats.given_up,
        )
        yield counter(
            "glisk_worker_db_disconnected_seconds",
            "Seconds with the database unreachable, the current outage included",
            self.worker.outage.disconnected_seconds(),
        )


class WorkerMetrics:
    """A worker's registry. ``wrap`` times its handler (before the Worker is built);
    ``attach`` reads the worker's stats on scrape; ``serve`` starts the HTTP endpoint."""

    def __init__(
        self, stage: str, holder: str | None = None, *, worker_id: str | None = None
    ) -> None:
        # ``holder`` (``worker_id``: its deprecated name) is unused: the ``worker`` label is
        # read from the attached worker.
        holder_named(holder, worker_id)
        self.registry = CollectorRegistry()
        self.stage = stage
        self.duration = Histogram(
            "glisk_worker_handler_duration_seconds",
            "Handler call duration (one token, or one reveal batch)",
            ["stage", "outcome"],
            registry=self.registry,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )
        self.in_flight = Gauge(
            "glisk_worker_handlers_in_flight",
            "Handler calls running now",
            ["stage"],
            registry=self.registry,
        )

    def wrap(self, handler: Any) -> Any:
        """The handler, timed. Keeps a ``reconcile`` method (the reveal stage's Reconciler)."""
        if callable(getattr(handler, "reconcile", None)):
            return _TimedReconciler(handler, self)
        return _Timed(handler, self)

    def attach(self, worker: Worker) -> None:
        self.registry.register(_WorkerStatsCollector(worker))

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Serve ``/metrics`` on ``port`` from a daemon thread for the process's life."""
        from prometheus_client import start_http_server

        start_http_server(port, addr=addr, registry=self.registry)


class _Timed:
    def __init__(self, handler: Callable[[Any], Awaitable[Any]], metrics: WorkerMetrics) -> None:
        self._handler = handler
        self._metrics = metrics

    async def __call__(self, arg: Any) -> Any:
        stage = self._metrics.stage
        started = time.perf_counter()
        outcome = "error"
        self._metrics.in_flight.labels(stage).inc()
        try:
            result = await self._handler(arg)
            outcome = "ok"
            return result
        finally:
            self._metrics.in_flight.labels(stage).dec()
            self._metrics.duration.labels(stage, outcome).observe(time.perf_counter() - started)


class _TimedReconciler(_Timed):
    def reconcile(self, pending: Any) -> Any:
        return self._handler.reconcile(pending)  # type: ignore[attr-defined]
