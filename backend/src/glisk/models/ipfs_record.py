from datetime import datetime
from typing import Any
from uuid import UUID, uuid4

from sqlalchemy import CheckConstraint, Column, ForeignKey, Index, String
from sqlalchemy.orm import validates
from sqlmodel import Field

from glisk.models import validation as v
from glisk.models._columns import (
    closed_set_column,
    created_at_field,
    error_data_field,
    in_set_check,
    optional_timestamp_field,
    retry_count_field,
)
from glisk.models.base import Entity
from glisk.models.enums import IPFSRecordType, IPFSUploadStatus


class IPFSUploadRecord(Entity, table=True):
    """One upload of a token's image or metadata to IPFS; a completed upload has its cid."""

    __tablename__ = "ipfs_upload_records"  # pyright: ignore[reportAssignmentType]
    __table_args__ = (
        in_set_check("record_type", IPFSRecordType),
        in_set_check("status", IPFSUploadStatus),
        CheckConstraint("retry_count >= 0", name="retry_count_non_negative"),
        CheckConstraint(
            "status <> 'completed' OR cid IS NOT NULL",
            name="cid_required_when_completed",
        ),
        Index("ix_ipfs_upload_records_record_type_status", "record_type", "status"),
    )

    id: UUID = Field(default_factory=uuid4, primary_key=True)
    token_id: UUID = Field(
        sa_column=Column(ForeignKey("tokens_s0.id", ondelete="CASCADE"), nullable=False, index=True)
    )
    record_type: IPFSRecordType = Field(sa_column=closed_set_column(IPFSRecordType))
    cid: str | None = Field(default=None, sa_column=Column(String(255), nullable=True))
    status: IPFSUploadStatus = Field(
        default=IPFSUploadStatus.PENDING,
        sa_column=closed_set_column(IPFSUploadStatus, default=IPFSUploadStatus.PENDING),
    )
    retry_count: int = retry_count_field()
    error_data: dict[str, Any] | None = error_data_field()
    created_at: datetime = created_at_field()
    completed_at: datetime | None = optional_timestamp_field()

    @validates("record_type")
    def _record_type(self, key: str, value: Any) -> IPFSRecordType:
        return v.one_of(key, value, IPFSRecordType)

    @validates("status")
    def _status(self, key: str, value: Any) -> IPFSUploadStatus:
        return v.one_of(key, value, IPFSUploadStatus)

    @validates("retry_count")
    def _retry_count(self, key: str, value: Any) -> int:
        return v.int_at_least(key, value, 0)

    @validates("cid")
    def _cid(self, key: str, value: Any) -> str | None:
        return v.optional_text(key, value, 255)

    def check_row(self) -> None:
        if self.status == IPFSUploadStatus.COMPLETED:
            v.required_when("cid", self.cid, "status is 'completed'")
