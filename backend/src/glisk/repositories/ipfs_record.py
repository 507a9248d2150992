from uuid import UUID

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from glisk.models import IPFSRecordType, IPFSUploadRecord
from glisk.models import validation as v


class IPFSUploadRecordRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, record: IPFSUploadRecord) -> IPFSUploadRecord:
        self.session.add(record)
        await self.session.flush()
        return record

    async def get_by_id(self, record_id: UUID) -> IPFSUploadRecord | None:
        return await self.session.get(IPFSUploadRecord, record_id)

    async def get_by_token(
        self, token_uuid: UUID, record_type: IPFSRecordType | str | None = None
    ) -> list[IPFSUploadRecord]:
        """The token's upload records, newest first, optionally of one record_type."""
        statement = select(IPFSUploadRecord).where(col(IPFSUploadRecord.token_id) == token_uuid)
        if record_type is not None:
            wanted = v.one_of("record_type", record_type, IPFSRecordType)
            statement = statement.where(col(IPFSUploadRecord.record_type) == wanted)
        result = await self.session.execute(
            statement.order_by(
                col(IPFSUploadRecord.created_at).desc(),
                col(IPFSUploadRecord.id).desc(),
            )
        )
        return list(result.scalars())
