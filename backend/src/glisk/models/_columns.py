"""Column builders repeated across tables (created_at and friends)."""

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import CheckConstraint, Column, DateTime, Integer, text
from sqlalchemy import Enum as SAEnum
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field

from glisk.core.timezone import DB_NOW, utcnow

# The application always sets timestamps itself (utcnow); the server default only covers raw SQL.
UTC_NOW_SQL = text(DB_NOW)


def created_at_field() -> Any:
    return Field(
        default_factory=utcnow,
        sa_column=Column(DateTime(timezone=False), nullable=False, server_default=UTC_NOW_SQL),
    )


def optional_timestamp_field() -> Any:
    return Field(default=None, sa_column=Column(DateTime(timezone=False), nullable=True))


def optional_jsonb_field() -> Any:
    return Field(default=None, sa_column=Column(JSONB, nullable=True))


def error_data_field() -> Any:
    return optional_jsonb_field()


def timestamp_column() -> Column[datetime]:
    return Column(DateTime(timezone=False), nullable=False)


def closed_set_column(
    enum: type[StrEnum], *, default: StrEnum | None = None, index: bool = False
) -> Column[Any]:
    """VARCHAR(50) holding one of ``enum``'s values, loaded back as the enum member.

    The allowed values are enforced by a CHECK constraint declared on the table (see
    ``in_set_check``), not by a native enum, so adding a value is a one-line migration.
    """
    return Column(
        SAEnum(
            enum,
            native_enum=False,
            create_constraint=False,
            length=50,
            values_callable=lambda e: [m.value for m in e],
            validate_strings=True,
        ),
        nullable=False,
        index=index,
        server_default=default.value if default is not None else None,
    )


def in_set_check(column: str, enum: type[StrEnum], name: str | None = None) -> CheckConstraint:
    values = ", ".join(f"'{m.value}'" for m in enum)
    return CheckConstraint(f"{column} IN ({values})", name=name or f"{column}_allowed")


def retry_count_field() -> Any:
    return Field(default=0, sa_column=Column(Integer, nullable=False, server_default=text("0")))
