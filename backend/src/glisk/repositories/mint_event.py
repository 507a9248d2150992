from sqlalchemy import exists, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from glisk.models import MintEvent
from glisk.models import validation as v


class MintEventRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, event: MintEvent) -> MintEvent:
        """Flushes: a duplicate (tx_hash, log_index) raises IntegrityError here."""
        self.session.add(event)
        await self.session.flush()
        return event

    async def exists(self, tx_hash: str, log_index: int) -> bool:
        """Whether this log was recorded; tx_hash in any letter case. Served by the unique key."""
        normalized = v.tx_hash("tx_hash", tx_hash)
        v.int_at_least("log_index", log_index, 0)
        result = await self.session.execute(
            select(
                exists().where(
                    col(MintEvent.tx_hash) == normalized, col(MintEvent.log_index) == log_index
                )
            )
        )
        return bool(result.scalar())

    async def get_by_block_range(self, start: int, end: int) -> list[MintEvent]:
        """Events with start <= block_number <= end, ordered by block_number, log_index."""
        v.int_at_least("start", start, 1)
        v.int_at_least("end", end, 1)
        if end < start:
            raise v.FieldValidationError("end", f"must be >= start ({start})", end)
        result = await self.session.execute(
            select(MintEvent)
            .where(col(MintEvent.block_number).between(start, end))
            .order_by(col(MintEvent.block_number), col(MintEvent.log_index))
        )
        return list(result.scalars())
