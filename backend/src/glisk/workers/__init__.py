"""Worker coordination for slow stages: leased claims and the worker runtime.

Two ways to take work, side by side:
- ``uow.tokens.get_pending_*``: rows locked FOR UPDATE SKIP LOCKED for one transaction. For short
  work done inside that transaction.
- ``run_worker`` / ``Worker`` (this package): a leased claim made and committed in one statement;
  handlers run concurrently with no transaction open; leases are extended while they run;
  completions are fenced and written in batches.

The layout: ``queries`` (every statement, whole and named), ``claims`` (what a handler gets),
``connection`` (bounded connections), ``outage`` (an unreachable database: told once, one
backoff for every connection), ``listener`` (LISTEN wake-ups), ``worker`` (the Worker
class), ``run`` (run_worker), ``repository`` (``uow.leases``), ``noop``. The stage table is
``glisk.pipeline``; the ``glisk worker`` command is ``glisk.cli.worker``.
"""

from glisk.pipeline import STAGES, Stage, StageName
from glisk.workers.checkpoints import checkpoint, record_reveal
from glisk.workers.claims import Claim, ClaimBatch, Exhausted
from glisk.workers.connection import ConnectOptions
from glisk.workers.errors import DatabaseTimeout, LeaseLost, PermanentError, RetryLater
from glisk.workers.reveal import PendingReveal, RevealState
from glisk.workers.run import run_worker
from glisk.workers.worker import Worker, WorkerStats, install_stop_signals

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
    "install_stop_signals",
    "record_reveal",
    "run_worker",
]
