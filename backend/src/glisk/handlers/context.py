"""What both stage handlers share: the worker's database URL, and values built on first use."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from glisk.core.config import Settings

T = TypeVar("T")


def database_url(settings: Settings) -> str:
    """The database the worker uses: DATABASE_URL, else the embedded server's (which
    ``glisk worker`` has started in this process when DATABASE_URL is unset)."""
    if settings.database_url is not None:
        return settings.database_url
    from glisk.core.database_url import normalize_database_url
    from glisk.core.embedded import url_for_tools

    return normalize_database_url(url_for_tools(settings))


class Lazy(Generic[T]):
    """A value built by ``build`` on first ``get()`` (once, even when many calls race)."""

    def __init__(self, build: Callable[[], Awaitable[T]]) -> None:
        self._build = build
        self._value: T | None = None
        self._lock = asyncio.Lock()

    @property
    def built(self) -> T | None:
        """The value if it was built, else None (builds nothing)."""
        return self._value

    async def get(self) -> T:
        if self._value is None:
            async with self._lock:
                if self._value is None:
                    self._value = await self._build()
        return self._value
