"""When a failed token may be claimed again: the failure record and the policy that fills it in.

A handler's failure becomes a ``Failure``: what to write (``error``), whether the attempt counts
(``kind``) and how long the token waits before its next claim (``delay``). The fail statement
(``queries.fail``) writes it; the completer hands it over. Nothing here does I/O.

- ``retry``: the attempt is spent; the token waits ``delay`` and is claimed again until it has
  used ``max_attempts`` (then the statement fails it for good);
- ``permanent``: failed for good now (PermanentError, or a wait that ran out of deferrals);
- ``defer``: no attempt spent; the token waits ``delay`` (RetryLater), at most
  ``max_deferrals`` times per token and stage.

Database statements a worker's own writes send are retried by the writer (``DB_RETRIES``,
``DB_RETRY_DELAY``); an outage is waited out instead (glisk.workers.outage).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Literal

from glisk.errors import PermanentError, RetryLater
from glisk.workers.claims import Claim

FailureKind = Literal["retry", "permanent", "defer"]

# A statement the database refuses for another reason than an outage (a deadlock, a bug) is
# tried this many times, this far apart, then given up on.
DB_RETRIES = 3
DB_RETRY_DELAY = 0.5


@dataclass(frozen=True)
class Failure:
    """A failed attempt (or a wait) to be written for ``claim``; see the module docstring."""

    claim: Claim
    error: dict[str, Any]
    kind: FailureKind
    delay: float


def error_record(exc: BaseException) -> dict[str, Any]:
    """What the token's error history keeps of ``exc``: its type and the start of its message."""
    return {"type": type(exc).__name__, "message": str(exc)[:500]}


class RetryPolicy:
    """A failed attempt waits ``uniform(0, min(backoff_cap, backoff_base * 2**(attempt-1)))``
    seconds (full jitter); ``RetryLater(s)`` waits exactly ``s`` and spends no attempt while the
    token has deferrals left, after that it is an ordinary failure waiting at least ``s``.
    Arguments are validated by the Worker."""

    def __init__(
        self,
        *,
        max_attempts: int,
        backoff_base: float,
        backoff_cap: float,
        max_deferrals: int,
        rng: random.Random,
    ) -> None:
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.max_deferrals = max_deferrals
        self._rng = rng

    def failure(self, claim: Claim, exc: BaseException) -> Failure:
        """What a handler's exception (or a result the stage's rules refuse) does to its token."""
        if isinstance(exc, PermanentError):
            return Failure(claim, error_record(exc), "permanent", 0.0)
        backoff = self._rng.uniform(
            0, min(self.backoff_cap, self.backoff_base * 2 ** (claim.attempt - 1))
        )
        if isinstance(exc, RetryLater):
            if claim.deferrals < self.max_deferrals:
                return Failure(claim, error_record(exc), "defer", exc.seconds)
            backoff = max(backoff, exc.seconds)
        return Failure(claim, error_record(exc), "retry", backoff)

    def wait(self, claim: Claim, error: dict[str, Any], *, then: dict[str, Any]) -> Failure:
        """Come back after ``backoff_base`` seconds without spending an attempt, while the token
        has deferrals left; once they are used, fail it for good with ``then``. For a wait the
        runtime decides, not the handler (a reveal that is neither mined nor dropped yet)."""
        if claim.deferrals < self.max_deferrals:
            return Failure(claim, error, "defer", self.backoff_base)
        return Failure(claim, then, "permanent", 0.0)
