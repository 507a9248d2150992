"""Stopping a worker: SIGTERM and SIGINT set its stop event, and the waits a stop cuts short.

``hold_stop_signals`` goes first thing in a worker process, ``install_stop_signals`` once its
event loop runs: a signal that arrives in between (while the process starts) is remembered and
stops the worker at once, nothing claimed, instead of killing the process half started.
"""

from __future__ import annotations

import asyncio
import signal

# A stop signal that arrived before install_stop_signals (while the process was starting).
_stop_requested = False


def _remember_stop(signum: int, frame: object) -> None:
    global _stop_requested
    _stop_requested = True


def hold_stop_signals() -> None:
    """Call first thing in a worker process: a SIGTERM or SIGINT that arrives before the worker
    runs is remembered (install_stop_signals then stops at once, nothing claimed) instead of
    killing the process halfway through its start-up."""
    signal.signal(signal.SIGTERM, _remember_stop)
    signal.signal(signal.SIGINT, _remember_stop)


def install_stop_signals(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT set ``stop``: the worker stops claiming, lets the handlers in hand
    finish, records their results, gives back what never started, and returns."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if _stop_requested:
        stop.set()


async def wait_any(*events: asyncio.Event, seconds: float | None) -> None:
    """Return when one of ``events`` is set or ``seconds`` passed (None: no limit)."""
    if any(e.is_set() for e in events):
        return
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
