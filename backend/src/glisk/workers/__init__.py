"""Worker coordination for slow stages: leased claims and the worker loop.

Two ways to take work, side by side:
- ``uow.tokens.get_pending_*``: rows locked FOR UPDATE SKIP LOCKED for one transaction. For short
  work done inside that transaction.
- ``run_worker`` (this package): a leased claim made and committed in one statement; the handler
  runs with no transaction open; the lease is extended while it runs; completion is fenced.
"""

from glisk.models.stages import STAGES, Stage, StageName
from glisk.repositories.token_lease import Claim
from glisk.workers.loop import PermanentError, WorkerStats, install_stop_signals, run_worker

__all__ = [
    "STAGES",
    "Claim",
    "PermanentError",
    "Stage",
    "StageName",
    "WorkerStats",
    "install_stop_signals",
    "run_worker",
]
