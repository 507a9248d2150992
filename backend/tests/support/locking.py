"""A test that must not wait for a row lock: a bounded ``lock_timeout`` turns a regression (a
query that queues behind a locked row instead of skipping it) into a clear failure, not a hang."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from sqlalchemy import text

from glisk.errors import DatabaseError
from glisk.uow import UnitOfWork

LOCK_TIMEOUT_SECONDS = 1
LOCK_NOT_AVAILABLE = "55P03"  # SQLSTATE of a statement that gave up waiting for a lock


@asynccontextmanager
async def never_waiting_for_a_lock(uow: UnitOfWork, what: str) -> AsyncIterator[None]:
    """Inside, ``uow``'s statements give up after LOCK_TIMEOUT_SECONDS waiting for any lock,
    and the test fails saying that ``what`` waited for a locked row."""
    await uow.session.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT_SECONDS}s'"))
    try:
        yield
    except DatabaseError as exc:
        if exc.sqlstate == LOCK_NOT_AVAILABLE:
            pytest.fail(f"{what} waited for a locked row instead of skipping it: {exc}")
        raise
