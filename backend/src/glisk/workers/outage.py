"""Whether a worker reaches its database: one log line when an outage begins, one when it ends,
and a backoff for every loop that retries while it lasts.

A worker has three connections (claims, writes, LISTEN) and each notices a stopped database on
its own. They report here instead of logging: ``failed(exc)`` for every call that could not
reach the database, ``succeeded()`` for every call that did. The tracker

- tells an outage from a blip: a connection dropped once and reopened at the next try is no
  outage; the outage begins (and is logged, once) when the failures go on for
  ``announce_after`` seconds with no success between them;
- logs ``database unreachable: <reason> (retrying at least every N s)`` with the most telling
  reason seen so far: the first that PostgreSQL gave in its own words (shutting down, too many
  clients, disk full), else the client's latest (connection refused);
- logs ``database back after N s`` once when a call succeeds again;
- wakes every retrying loop at once when a call gets through after an announced outage
  (``back``), so the worker resumes the moment one connection does;
- counts the seconds spent disconnected (``disconnected_seconds``, a Prometheus counter).

Each retrying loop paces itself with a ``Backoff`` (0.25 s after its first failure, doubling up
to ``cap``, with jitter): a loop whose own connection keeps failing while the others work (only
new connections refused: too many clients) cannot spin, and an outage costs each loop at most
one try per ``cap`` seconds.

The first failure of an episode is often the listener's, which sees a closed socket and no
reason; ``probe`` (the worker's: one ``SELECT 1`` on an idle connection) then runs at once: it
tells a blip from an outage, and on a connection the server closed it reads what the server said
(``terminating connection due to administrator command``).

Statement errors (a deadlock, a constraint, a bug) are not outages: ``failed`` returns False for
them and the caller logs them as before.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

from glisk.errors import DatabaseError, DatabaseTimeout, first_line

# SQLSTATE prefixes that mean "the database cannot serve us now", not "this statement is wrong":
# 08 connection exception, 53 insufficient resources (disk full, out of memory, too many
# connections), 57P operator intervention (shutting down, crashed, starting up), 58030 I/O error.
_UNREACHABLE_STATES = ("08", "53", "57P", "58030")

FIRST_DELAY = 0.25
ANNOUNCE_AFTER = 1.0


def unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database could not be reached or could not serve any statement
    (lost or refused connection, no answer in time, shutting down, full), as opposed to an error
    in the statement itself."""
    if isinstance(exc, DatabaseTimeout | OSError | TimeoutError):
        return True
    driver = exc.__cause__ if isinstance(exc, DatabaseError) else exc
    state = getattr(exc, "sqlstate", None) or getattr(driver, "sqlstate", None)
    if state:
        return str(state).startswith(_UNREACHABLE_STATES)
    # No SQLSTATE: no server answered. Only a connection-level driver error means that; a
    # client-side misuse (a bad parameter) has no SQLSTATE either but is a bug, not an outage.
    return isinstance(driver, psycopg.OperationalError | psycopg.InterfaceError | DatabaseTimeout)


def _server_said(exc: BaseException, reason: str) -> bool:
    """Whether the reason is PostgreSQL's own (it sent an error: a SQLSTATE, or a FATAL line
    that libpq quotes when a connection is refused) rather than the client's view of a socket."""
    return bool(getattr(exc, "sqlstate", None)) or "FATAL:" in reason or "PANIC:" in reason


class Outage:
    """One worker's view of its database; see the module docstring. Not thread-safe: every
    caller runs on the worker's event loop."""

    def __init__(
        self,
        log: Any,
        *,
        cap: float = 5.0,
        announce_after: float = ANNOUNCE_AFTER,
        probe: Callable[[], Awaitable[None]] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._log = log
        self._probe = probe
        self._probing: asyncio.Future[None] | None = None
        self.cap = cap
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self._announce_after = announce_after
        self._since: float | None = None  # monotonic time of the episode's first failure
        self._failures = 0  # in this episode
        self._announced = False
        self._reason = ""
        self._reason_from_server = False
        self._past_seconds = 0.0  # episodes that ended
        self.back = asyncio.Event()  # set whenever the last call got through
        self.back.set()

    @property
    def down(self) -> bool:
        """Whether an outage was announced and has not ended."""
        return self._announced

    @property
    def failing(self) -> bool:
        """Whether the last call failed (an outage, or a blip not yet resolved)."""
        return self._since is not None

    @property
    def since(self) -> float | None:
        """When (monotonic) the calls began failing; None while they get through."""
        return self._since

    def disconnected_seconds(self) -> float:
        """Seconds spent with calls failing, the current episode included."""
        current = 0.0 if self._since is None else time.monotonic() - self._since
        return self._past_seconds + current

    def failed(self, exc: BaseException) -> bool:
        """Record a failed call. Returns False (and records nothing) when ``exc`` is not an
        outage but a statement error, for the caller to handle."""
        if not unreachable(exc):
            return False
        now = time.monotonic()
        reason = first_line(exc)
        from_server = _server_said(exc, reason)
        if self._since is None:
            self._since = now
            self._failures = 0
            self._reason, self._reason_from_server = reason, from_server
            self.back.clear()
            if self._probe is not None and (self._probing is None or self._probing.done()):
                self._probing = asyncio.ensure_future(self._probe())
        elif not self._reason_from_server:
            # The most telling reason: PostgreSQL's first words (the root cause, e.g. a full disk
            # before the crash it led to), else the client's latest (refused rather than closed).
            self._reason, self._reason_from_server = reason, from_server
        self._failures += 1
        if (
            not self._announced
            and self._failures >= 2
            and now - self._since >= self._announce_after
        ):
            self._announced = True
            self._log.warning(
                f"database unreachable: {self._reason} (retrying at least every {self.cap:g} s)",
                outage="unreachable",
                reason=self._reason,
            )
        return True

    def succeeded(self) -> None:
        """Record a call that got through: ends the episode, logging the end of an outage."""
        if self._since is None:
            return
        seconds = time.monotonic() - self._since
        self._past_seconds += seconds
        self._since = None
        if self._announced:
            self._announced = False
            self._log.info(
                f"database back after {seconds:.1f} s", outage="back", seconds=round(seconds, 1)
            )
        self.back.set()


class Backoff:
    """One retrying loop's pace while its database calls fail: ``wait()`` after each failure
    sleeps 0.25 s, then twice as long each time up to the outage's cap (with jitter: half of it
    to all of it), and returns early when one of ``events`` is set, or when a call gets through
    after an announced outage. ``reset()`` after a call that got through."""

    def __init__(self, outage: Outage, first: float = FIRST_DELAY) -> None:
        self.outage = outage
        self.first = first
        self.failures = 0

    def reset(self) -> None:
        self.failures = 0

    def next_delay(self) -> float:
        """The longest pause the next ``wait()`` takes."""
        return min(self.outage.cap, self.first * 2**self.failures)

    async def wait(self, *events: asyncio.Event, until: float | None = None) -> None:
        delay = self.next_delay() * self.outage.rng.uniform(0.5, 1.0)
        self.failures += 1
        if until is not None:
            delay = min(delay, until - time.monotonic())
        if delay <= 0:
            return
        # Only an announced outage's end wakes every loop at once; during a blip (or while just
        # one connection fails and the others work) each loop keeps its own pace.
        wake = [*events, self.outage.back] if self.outage.down else list(events)
        waiters = [asyncio.ensure_future(event.wait()) for event in wake]
        try:
            if waiters:
                await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
            else:
                await asyncio.sleep(delay)
        finally:
            for waiter in waiters:
                waiter.cancel()
