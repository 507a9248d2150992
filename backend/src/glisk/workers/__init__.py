"""Worker coordination for slow stages: leased claims and the worker runtime.

Two ways to take work, side by side:
- ``uow.tokens.get_pending_*``: rows locked FOR UPDATE SKIP LOCKED for one transaction. For short
  work done inside that transaction.
- ``run_worker`` / ``Worker`` (this package): a leased claim made and committed in one statement;
  handlers run concurrently with no transaction open; leases are extended while they run;
  completions are fenced and written in batches.

The layout: ``predicates`` (the partial-index predicates, a leaf), ``stages`` (the stage table),
``queries`` (every statement, whole and named), ``claims`` (what a handler gets), ``connection``
(bounded connections), ``outage`` (an unreachable database: told once, one backoff for every
connection), ``listener`` (LISTEN wake-ups), ``worker`` (the Worker class), ``run``
(run_worker), ``repository`` (``uow.leases``), ``command`` (``glisk worker``), ``noop``.

Names are imported lazily, so that ``glisk.models`` can import the leaf ``predicates`` module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from glisk.workers.checkpoints import checkpoint, record_reveal
    from glisk.workers.claims import Claim, ClaimBatch, Exhausted
    from glisk.workers.connection import ConnectOptions
    from glisk.workers.errors import DatabaseTimeout, LeaseLost, PermanentError, RetryLater
    from glisk.workers.reveal import PendingReveal, RevealState
    from glisk.workers.run import run_worker
    from glisk.workers.stages import STAGES, Stage, StageName
    from glisk.workers.worker import Worker, WorkerStats, install_stop_signals

_EXPORTS = {
    "checkpoint": "checkpoints",
    "record_reveal": "checkpoints",
    "LeaseLost": "errors",
    "PendingReveal": "reveal",
    "RevealState": "reveal",
    "Claim": "claims",
    "ClaimBatch": "claims",
    "Exhausted": "claims",
    "ConnectOptions": "connection",
    "DatabaseTimeout": "errors",
    "PermanentError": "errors",
    "RetryLater": "errors",
    "run_worker": "run",
    "STAGES": "stages",
    "Stage": "stages",
    "StageName": "stages",
    "Worker": "worker",
    "WorkerStats": "worker",
    "install_stop_signals": "worker",
}

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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'glisk.workers' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"glisk.workers.{module}"), name)
    globals()[name] = value
    return value
