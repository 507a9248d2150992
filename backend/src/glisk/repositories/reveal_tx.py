from uuid import UUID

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from glisk.models import RevealStatus, RevealTransaction
from glisk.models import validation as v
from glisk.repositories import _args


class RevealTransactionRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, reveal: RevealTransaction) -> RevealTransaction:
        self.session.add(reveal)
        await self.session.flush()
        return reveal

    async def get_by_id(self, reveal_id: UUID) -> RevealTransaction | None:
        return await self.session.get(RevealTransaction, reveal_id)

    async def get_by_tx_hash(self, tx_hash: str) -> RevealTransaction | None:
        """tx_hash in any letter case (stored lowercase)."""
        normalized = v.tx_hash("tx_hash", tx_hash)
        result = await self.session.execute(
            select(RevealTransaction).where(col(RevealTransaction.tx_hash) == normalized)
        )
        return result.scalars().first()

    async def get_by_status(
        self, status: RevealStatus | str, limit: int = 100
    ) -> list[RevealTransaction]:
        """Oldest first."""
        wanted = v.one_of("status", status, RevealStatus)
        _args.limit(limit)
        result = await self.session.execute(
            select(RevealTransaction)
            .where(col(RevealTransaction.status) == wanted)
            .order_by(col(RevealTransaction.created_at), col(RevealTransaction.id))
            .limit(limit)
        )
        return list(result.scalars())

    async def get_pending(self) -> list[RevealTransaction]:
        """Transactions submitted and awaiting confirmation (status 'sent'), oldest first."""
        result = await self.session.execute(
            select(RevealTransaction)
            .where(col(RevealTransaction.status) == RevealStatus.SENT)
            .order_by(col(RevealTransaction.created_at), col(RevealTransaction.id))
        )
        return list(result.scalars())
