from datetime import datetime
from typing import Any

from sqlalchemy import CheckConstraint, Column, String
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import validates
from sqlmodel import Field

from glisk.core.timezone import utcnow
from glisk.models import validation as v
from glisk.models._columns import timestamp_column
from glisk.models.base import Entity


class SystemState(Entity, table=True):
    """Operational key-value state (last_processed_block, reveal_worker_enabled, ...).

    state_value is any JSON value; JSON null is stored as JSON, not SQL NULL.
    """

    __tablename__ = "system_state"  # pyright: ignore[reportAssignmentType]
    __table_args__ = (CheckConstraint(f"key ~ '{v.STATE_KEY_PATTERN}'", name="key_format"),)

    key: str = Field(sa_column=Column(String(255), primary_key=True))
    state_value: Any = Field(sa_column=Column(JSONB(none_as_null=False), nullable=False))
    updated_at: datetime = Field(default_factory=utcnow, sa_column=timestamp_column())

    @validates("key")
    def _key(self, key: str, value: Any) -> str:
        return v.state_key(key, value)
