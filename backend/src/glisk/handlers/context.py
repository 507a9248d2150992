"""What both stage handlers build on first use: the settings, and the database they record
their jobs in (the worker's own, DATABASE_URL or the embedded server)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar
from uuid import UUID

from glisk.errors import PermanentError

if TYPE_CHECKING:
    from glisk.core.config import Settings
    from glisk.uow import UnitOfWorkFactory

T = TypeVar("T")


def database_url(settings: Settings) -> str:
    """The database the worker uses: DATABASE_URL, else the embedded server's (which
    ``glisk worker`` has started in this process when DATABASE_URL is unset)."""
    if settings.database_url is not None:
        return settings.database_url
    from glisk.cli import _url_for_tools  # pyright: ignore[reportPrivateUsage]
    from glisk.core.config import normalize_database_url

    return normalize_database_url(_url_for_tools(settings))


def uow_factory_for(settings: Settings) -> UnitOfWorkFactory:
    """A unit-of-work factory on the worker's database, pooled like a worker's (no I/O)."""
    from glisk.core.database import setup_db_session
    from glisk.uow import create_uow_factory

    options = settings.engine_options("worker", concurrency=settings.worker_concurrency or 10)
    return create_uow_factory(setup_db_session(database_url(settings), **options))


@dataclass(frozen=True)
class Author:
    wallet: str
    prompt: str


async def author_of(uow_factory: UnitOfWorkFactory, author_id: UUID) -> Author:
    """The token's author; PermanentError when it is gone (the token cannot be made)."""
    async with uow_factory() as uow:
        author = await uow.authors.get_by_id(author_id)
    if author is None:
        raise PermanentError(f"author {author_id} not found")
    return Author(wallet=author.wallet_address, prompt=author.prompt_text)


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
