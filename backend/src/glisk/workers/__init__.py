"""Worker coordination for slow stages: leased claims and the worker runtime.

Two ways to take work, side by side:
- ``uow.tokens.get_pending_*``: rows locked FOR UPDATE SKIP LOCKED for one transaction. For short
  work done inside that transaction.
- ``run_worker`` / ``Worker`` (this package): a leased claim made and committed in one statement;
  handlers run concurrently with no transaction open; leases are extended while they run;
  completions are fenced and written in batches.

The layout: ``queries`` (every statement, whole and named), ``claims`` (what a handler gets),
``connection`` (bounded connections), ``outage`` (an unreachable database: told once, one
backoff for every connection), ``listener`` (LISTEN wake-ups), ``worker`` (the Worker: the claim
loop wiring its parts), and the parts, one job each: ``claimer`` (the claim statement),
``leases`` (the claims held, heartbeats, lost claims), ``executor`` (running handlers),
``reveal`` (the reveal stage's reconcile before its handler), ``retry`` (what a failure does to
its token), ``completer`` (batched writes of what finished, kept through an outage), ``writes``
(retried writes, waits through an outage), ``checkpoints`` (a handler's own writes),
``signals`` (SIGTERM and SIGINT), ``stats``; ``metrics`` (a worker's Prometheus endpoint, loaded
only by ``glisk worker --metrics-port``), ``run`` (run_worker), ``repository``
(``uow.leases``), ``noop``. The stage table is ``glisk.pipeline``; the ``glisk worker``
command is ``glisk.cli.worker``.
"""

from glisk.pipeline import STAGES, Stage, StageName
from glisk.workers.checkpoints import checkpoint, ensure_live, lease_left, record_reveal
from glisk.workers.claims import Claim, ClaimBatch, Exhausted
from glisk.workers.connection import ConnectOptions
from glisk.workers.errors import DatabaseTimeout, LeaseLost, PermanentError, RetryLater
from glisk.workers.reveal import PendingReveal, RevealState
from glisk.workers.run import run_worker
from glisk.workers.signals import install_stop_signals
from glisk.workers.stats import WorkerStats
from glisk.workers.worker import Worker

__all__ = [
    "STAGES",
    "Claim",
    "ClaimBatch",
    "ConnectOptions",
    "DatabaseTimeout",
    "Exhausted",
    "LeaseLost",
    "PendingReveal",
    "PermanentError",
    "RetryLater",
    "RevealState",
    "Stage",
    "StageName",
    "Worker",
    "WorkerStats",
    "checkpoint",
    "ensure_live",
    "install_stop_signals",
    "lease_left",
    "record_reveal",
    "run_worker",
]
