"""What the image and upload handlers share: a stage handler on a paid service.

It reads its settings and opens the worker's database only on first use (``glisk worker`` calls
``check()`` first, which validates the service's secret and builds nothing), builds its service
client then, and turns the service's rate limit into RetryLater. A subclass names its secret,
builds its client (``_service``) and handles one claim (``_run``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Generic, Literal, Protocol, TypeVar

from glisk.errors import RetryLater, ServiceRateLimited
from glisk.handlers.context import Lazy
from glisk.handlers.records import Records, records_for
from glisk.workers.claims import Claim

if TYPE_CHECKING:
    from glisk.core.config import Settings


class Service(Protocol):
    """A service client a stage handler closes when it is done."""

    async def aclose(self) -> None: ...


S = TypeVar("S", bound=Service)


@dataclass
class Parts(Generic[S]):
    """What a stage handler builds on first use: its settings, service client and records."""

    settings: Settings
    service: S
    records: Records


class ServiceStage(Generic[S]):
    """A stage handler on the service ``S`` (see the module docstring)."""

    # The Settings field of the secret the service needs (``check()`` names its variable).
    secret_setting: ClassVar[Literal["replicate_api_token", "pinata_jwt"]]

    def __init__(self, settings: Settings | None = None, records: Records | None = None) -> None:
        """``settings`` and ``records`` default to ``load_settings()`` and the worker's
        database, read on first use (nothing happens here)."""
        self._settings = settings
        self._records = records
        self._parts: Lazy[Parts[S]] = Lazy(self._build)

    def _load(self) -> Settings:
        from glisk.core.config import load_settings

        return self._settings or load_settings()

    def check(self) -> None:
        """Validate the settings this handler needs (ConfigError naming the variable)."""
        self._load().require_secret(self.secret_setting)

    async def aclose(self) -> None:
        """Close the service client and the database connection, if they were opened."""
        if self._parts.built is not None:
            await self._parts.built.service.aclose()
            await self._parts.built.records.close()

    async def _build(self) -> Parts[S]:
        settings = self._load()
        service = self._service(settings)
        return Parts(settings, service, self._records or records_for(settings))

    def _service(self, settings: Settings) -> S:
        """The service client, from ``settings`` (no I/O)."""
        raise NotImplementedError

    async def _run(self, claim: Claim, parts: Parts[S]) -> str:
        """Handle one claim; its result."""
        raise NotImplementedError

    async def __call__(self, claim: Claim) -> str:
        parts = await self._parts.get()
        try:
            return await self._run(claim, parts)
        except ServiceRateLimited as exc:
            raise RetryLater(exc.retry_after, str(exc)) from exc
