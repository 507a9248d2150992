from datetime import datetime
from typing import Any

from sqlalchemy import CheckConstraint, Column, Integer, String
from sqlalchemy.orm import validates
from sqlmodel import Field

from glisk.core.timezone import utcnow
from glisk.models import validation as v
from glisk.models._columns import timestamp_column
from glisk.models.base import Entity


class ChainBlock(Entity, table=True):
    """A block the log follower (``glisk ingest``) consumed, as the chain had it then: its number
    and hash (lowercase). The follower keeps these for every block that held a mint log and for
    the last block of each step, as deep as INGEST_REORG_WINDOW below its cursor, and compares
    them with the chain to find where a reorg starts. One chain per database: the number is the
    key."""

    __tablename__ = "chain_blocks"  # pyright: ignore[reportAssignmentType]
    __table_args__ = (
        CheckConstraint("number >= 0", name="number_non_negative"),
        CheckConstraint(f"hash ~ '{v.TX_HASH_STORED_PATTERN}'", name="hash_format"),
    )

    number: int = Field(sa_column=Column(Integer, primary_key=True, autoincrement=False))
    hash: str = Field(sa_column=Column(String(66), nullable=False))
    recorded_at: datetime = Field(default_factory=utcnow, sa_column=timestamp_column())

    @validates("number")
    def _number(self, key: str, value: Any) -> int:
        return v.int_at_least(key, value, 0)

    @validates("hash")
    def _hash(self, key: str, value: Any) -> str:
        return v.tx_hash(key, value)
