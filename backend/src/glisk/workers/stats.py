"""What a worker counts: ``WorkerStats``, returned by ``Worker.run`` and read by its metrics.

Every part of the worker (claimer, leases, writer, completer) adds to the one instance the
Worker holds; nothing reads it back to decide anything.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class WorkerStats:
    claimed: int = 0
    completed: int = 0
    failed: int = 0  # attempts that failed (retried later or final)
    refused: int = 0  # results dropped because the lease had been lost
    released: int = 0  # claims given back without spending an attempt
    rescued: int = 0
    exhausted: int = 0
    batches: int = 0
    deferred: int = 0  # RetryLater honoured without spending an attempt
    db_errors: int = 0  # database calls that failed or timed out (each retried or given up)
    # Finished results and failures never recorded: the database could not be reached until
    # their leases ran out, or until the worker had to stop. Each is named in an ERROR line.
    given_up: int = 0
    disconnected_seconds: float = 0.0  # time with database calls failing (outages and blips)
