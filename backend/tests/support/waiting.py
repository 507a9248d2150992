"""Waiting in a test for something another connection, task or process does."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable


async def eventually(
    check: Callable[[], bool] | Callable[[], Awaitable[bool]],
    seconds: float,
    what: str,
    *,
    poll: float = 0.01,
) -> float:
    """Call ``check`` (plain or async) every ``poll`` seconds until it returns true; the seconds
    that took. Fails once ``seconds`` have passed, naming ``what`` was awaited."""
    started = time.monotonic()
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > seconds:
            raise AssertionError(f"not within {seconds} s: {what}")
        await asyncio.sleep(poll)
