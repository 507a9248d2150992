from datetime import datetime
from typing import Any
from uuid import UUID, uuid4

from sqlalchemy import CheckConstraint, Column, Integer, String, UniqueConstraint
from sqlalchemy.orm import validates
from sqlmodel import Field

from glisk.core.timezone import utcnow
from glisk.models import validation as v
from glisk.models._columns import timestamp_column
from glisk.models.base import Entity


class MintEvent(Entity, table=True):
    """A mint log seen on-chain, kept for deduplication: (tx_hash, log_index) is unique.

    tx_hash is stored lowercase (the model normalises it; the CHECK refuses anything else), so the
    same event cannot be recorded twice under different letter case.
    """

    __tablename__ = "mint_events"  # pyright: ignore[reportAssignmentType]
    __table_args__ = (
        UniqueConstraint("tx_hash", "log_index"),
        CheckConstraint(f"tx_hash ~ '{v.TX_HASH_STORED_PATTERN}'", name="tx_hash_format"),
        CheckConstraint("log_index >= 0", name="log_index_non_negative"),
        CheckConstraint("block_number > 0", name="block_number_positive"),
    )

    id: UUID = Field(default_factory=uuid4, primary_key=True)
    tx_hash: str = Field(sa_column=Column(String(66), nullable=False))
    log_index: int = Field(sa_column=Column(Integer, nullable=False))
    block_number: int = Field(sa_column=Column(Integer, nullable=False, index=True))
    block_timestamp: datetime = Field(sa_column=timestamp_column())
    token_id: int = Field(sa_column=Column(Integer, nullable=False))
    detected_at: datetime = Field(default_factory=utcnow, sa_column=timestamp_column())

    @validates("tx_hash")
    def _tx_hash(self, key: str, value: Any) -> str:
        return v.tx_hash(key, value)

    @validates("log_index")
    def _log_index(self, key: str, value: Any) -> int:
        return v.int_at_least(key, value, 0)

    @validates("block_number")
    def _block_number(self, key: str, value: Any) -> int:
        return v.int_at_least(key, value, 1)

    @validates("token_id")
    def _token_id(self, key: str, value: Any) -> int:
        return v.int_at_least(key, value, 0)
