"""Unit of work: one session, one transaction, nine repositories.

    async with uow_factory() as uow:
        tokens = await uow.tokens.get_pending_for_generation(limit=10)
        for token in tokens:
            token.mark_generating()
    # committed here; an exception inside the block rolls back and propagates

Repositories flush; only the unit of work commits or rolls back. The session is always closed on
exit, returning its connection to the pool.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

import structlog
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from glisk.errors import DatabaseError, first_line
from glisk.repositories import (
    AuthorRepository,
    ChainBlockRepository,
    ImageGenerationJobRepository,
    IPFSUploadRecordRepository,
    MintEventRepository,
    RevealTransactionRepository,
    SystemStateRepository,
    TokenRepository,
)
from glisk.workers.repository import TokenLeaseRepository

log = structlog.get_logger("glisk.uow")


class UnitOfWork:
    authors: AuthorRepository
    tokens: TokenRepository
    mint_events: MintEventRepository
    image_jobs: ImageGenerationJobRepository
    ipfs_records: IPFSUploadRecordRepository
    reveal_txs: RevealTransactionRepository
    system_state: SystemStateRepository
    leases: TokenLeaseRepository  # leased claims for slow stages (glisk.workers)
    chain_blocks: ChainBlockRepository  # the log follower's window of block hashes (glisk.ingest)

    def __init__(self, session_factory: async_sessionmaker[AsyncSession]) -> None:
        # No I/O here: the session (and its connection) is opened by __aenter__.
        self._session_factory = session_factory
        self._session: AsyncSession | None = None
        # A commit failure is logged and rolled back once, where it happens; __aexit__ then
        # recognises the same exception passing through and does not report it again.
        self._failed_commit: BaseException | None = None

    @property
    def session_factory(self) -> async_sessionmaker[AsyncSession]:
        """Where this unit of work's sessions come from (no I/O)."""
        return self._session_factory

    @property
    def session(self) -> AsyncSession:
        if self._session is None:
            raise RuntimeError("UnitOfWork used outside 'async with'")
        return self._session

    async def __aenter__(self) -> UnitOfWork:
        if self._session is not None:
            raise RuntimeError("UnitOfWork is not re-entrant; create a new one per transaction")
        session = self._session = self._session_factory()
        self.authors = AuthorRepository(session)
        self.tokens = TokenRepository(session)
        self.mint_events = MintEventRepository(session)
        self.image_jobs = ImageGenerationJobRepository(session)
        self.ipfs_records = IPFSUploadRecordRepository(session)
        self.reveal_txs = RevealTransactionRepository(session)
        self.system_state = SystemStateRepository(session)
        self.leases = TokenLeaseRepository(session)
        self.chain_blocks = ChainBlockRepository(session)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc is None:
                # Nothing to commit after an explicit commit/rollback with no work since.
                if self.session.in_transaction():
                    await self.commit()
            elif exc is not self._failed_commit:
                if isinstance(exc, SQLAlchemyError | DatabaseError):
                    log.error("uow.database_error", error=first_line(exc))
                await self.rollback(reason=type(exc).__name__)
        finally:
            self._failed_commit = None
            session, self._session = self._session, None
            if session is not None:
                await session.close()

    async def commit(self) -> None:
        """Commit now; the unit of work stays usable for a next transaction on the same session.
        A failed commit is logged at ERROR, rolled back and re-raised."""
        try:
            await self.session.commit()
        except SQLAlchemyError as exc:
            log.error("uow.database_error", error=first_line(exc), during="commit")
            self._failed_commit = exc
            await self.rollback(reason="commit failed")
            raise
        log.info("uow.commit")

    async def rollback(self, reason: str = "explicit") -> None:
        await self.session.rollback()
        log.info("uow.rollback", reason=reason)


UnitOfWorkFactory = Callable[[], UnitOfWork]


def create_uow_factory(session_factory: async_sessionmaker[AsyncSession]) -> UnitOfWorkFactory:
    """``uow_factory()`` returns a fresh UnitOfWork bound to ``session_factory``."""

    def factory() -> UnitOfWork:
        return UnitOfWork(session_factory)

    return factory
