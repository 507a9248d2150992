from typing import Any
from uuid import UUID

from sqlalchemy import case, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from glisk.core.timezone import utcnow
from glisk.models import IPFSRecordType, IPFSUploadRecord, IPFSUploadStatus
from glisk.models import validation as v

_FINAL = (IPFSUploadStatus.COMPLETED, IPFSUploadStatus.FAILED)


class IPFSUploadRecordRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, record: IPFSUploadRecord) -> IPFSUploadRecord:
        self.session.add(record)
        await self.session.flush()
        return record

    async def get_by_id(self, record_id: UUID) -> IPFSUploadRecord | None:
        return await self.session.get(IPFSUploadRecord, record_id)

    async def record(
        self,
        record_id: UUID,
        token_uuid: UUID,
        *,
        record_type: IPFSRecordType | str,
        cid: str,
        status: IPFSUploadStatus | str,
        error: dict[str, Any] | None = None,
    ) -> None:
        """Create or move forward the upload ``record_id`` in one statement (INSERT ... ON
        CONFLICT (id) DO UPDATE): a handler and a rescuer may record the same upload in any
        order; a record already completed or failed keeps that status and its CID.
        ``completed_at`` is set when the status becomes completed or failed. No lock beyond
        the row's."""
        wanted = v.one_of("status", status, IPFSUploadStatus)
        values: dict[str, Any] = {
            "id": record_id,
            "token_id": token_uuid,
            "record_type": v.one_of("record_type", record_type, IPFSRecordType).value,
            "cid": v.text_length("cid", cid, 1, 255),
            "status": wanted.value,
            "error_data": error,
            "completed_at": utcnow() if wanted in _FINAL else None,
        }
        statement = insert(IPFSUploadRecord).values(**values)
        table = IPFSUploadRecord.__table__.c  # pyright: ignore[reportAttributeAccessIssue]
        final = table.status.in_([s.value for s in _FINAL])
        statement = statement.on_conflict_do_update(
            index_elements=[table.id],
            set_={
                "status": case((final, table.status), else_=statement.excluded.status),
                "cid": case((final, table.cid), else_=statement.excluded.cid),
                "error_data": func.coalesce(statement.excluded.error_data, table.error_data),
                "completed_at": func.coalesce(table.completed_at, statement.excluded.completed_at),
            },
        )
        await self.session.execute(statement)

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
