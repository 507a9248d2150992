"""What a handler raises to steer its token, and what the runtime raises."""

from __future__ import annotations


class PermanentError(Exception):
    """Raised by a handler when retrying cannot help (e.g. a prompt the service refuses): the
    token goes to 'failed' at once instead of being retried."""


class RetryLater(Exception):
    """Raised by a handler when the service asks to be called again later (HTTP 429 with
    ``Retry-After``): the token comes back after exactly ``seconds`` without spending an attempt.

    A worker allows ``max_deferrals`` of these per token and stage; past that a RetryLater counts
    as an ordinary failed attempt (waiting at least ``seconds``).
    """

    def __init__(self, seconds: float, reason: str = "") -> None:
        if not seconds >= 0:
            raise ValueError(f"seconds: must be >= 0 (got {seconds!r})")
        super().__init__(reason or f"retry in {seconds:g} s")
        self.seconds = float(seconds)


class DatabaseTimeout(Exception):
    """A worker's database call did not answer within its time limit; the connection that made
    it was closed (it is in an unknown state) and the next call opens a new one."""


class LeaseLost(Exception):
    """A checkpoint was refused: this worker no longer holds every claim it named (the lease ran
    out, another worker may hold the token now). A handler that gets it must stop before any
    external effect; raised out of a handler, the worker drops the result as refused."""
