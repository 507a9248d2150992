"""The follower's Prometheus metrics (``glisk ingest --metrics-port``): counters of what its
committed steps did, the head and cursor it last saw. Counts only: no hash, wallet or token id
is ever a label. Each follower builds its own registry: nothing is registered at import.

- ``glisk_ingest_logs_total{outcome}``: logs read by committed steps, by what recording said
  (new, duplicate, conflict), and ``rolled_back`` for logs of orphaned blocks undone
- ``glisk_ingest_tokens_flagged_total``: tokens in work whose mint was orphaned (operator)
- ``glisk_ingest_steps_total``, ``glisk_ingest_lost_races_total`` (another follower committed the
  same step first), ``glisk_ingest_range_splits_total`` (eth_getLogs ranges refused and split)
- ``glisk_ingest_reorgs_total``, ``glisk_ingest_deep_reorgs_total`` (the follower stopped)
- ``glisk_ingest_errors_total{kind}``: node, database, chain_moved (read again)
- ``glisk_ingest_head_block``, ``glisk_ingest_cursor_block``, ``glisk_ingest_lag_blocks``
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class IngestMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.logs = Counter("glisk_ingest_logs", "Mint logs by outcome", ["outcome"], registry=r)
        self.flagged = Counter(
            "glisk_ingest_tokens_flagged", "Tokens in work whose mint was orphaned", registry=r
        )
        self.steps = Counter("glisk_ingest_steps", "Steps committed", registry=r)
        self.lost_races = Counter(
            "glisk_ingest_lost_races", "Steps another follower committed first", registry=r
        )
        self.splits = Counter(
            "glisk_ingest_range_splits", "eth_getLogs ranges refused and split", registry=r
        )
        self.reorgs = Counter("glisk_ingest_reorgs", "Reorgs rolled back", registry=r)
        self.deep_reorgs = Counter(
            "glisk_ingest_deep_reorgs", "Reorgs deeper than the window (stopped)", registry=r
        )
        self.errors = Counter("glisk_ingest_errors", "Failed steps by kind", ["kind"], registry=r)
        self.head = Gauge("glisk_ingest_head_block", "The node's head at the last step", registry=r)
        self.cursor = Gauge("glisk_ingest_cursor_block", "The last block consumed", registry=r)
        self.lag = Gauge("glisk_ingest_lag_blocks", "Head minus cursor", registry=r)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Serve ``/metrics`` on ``port`` from a daemon thread for the process's life."""
        from prometheus_client import start_http_server

        start_http_server(port, addr=addr, registry=self.registry)
