from datetime import datetime
from typing import Any
from uuid import UUID, uuid4

from sqlalchemy import CheckConstraint, Column, Index, String, Text, func, text
from sqlalchemy.orm import validates
from sqlmodel import Field

from glisk.models import validation as v
from glisk.models._columns import created_at_field
from glisk.models.base import Entity

PROMPT_MIN, PROMPT_MAX = 10, 500


class Author(Entity, table=True):
    """A creator: a wallet and the prompt their tokens' images are generated from.

    Wallet addresses keep the letter case they were given (EIP-55 checksums are meaningful) and are
    unique case-insensitively through a unique index on ``lower(wallet_address)``, which is also
    the index ``get_by_wallet`` uses.
    """

    __tablename__ = "authors"  # pyright: ignore[reportAssignmentType]
    __table_args__ = (
        CheckConstraint(f"wallet_address ~ '{v.WALLET_PATTERN}'", name="wallet_address_format"),
        CheckConstraint(
            f"char_length(prompt_text) BETWEEN {PROMPT_MIN} AND {PROMPT_MAX}",
            name="prompt_text_length",
        ),
        CheckConstraint("left(twitter_handle, 1) <> '@'", name="twitter_handle_without_at"),
        Index(
            "uq_authors_wallet_address_lower",
            func.lower(text("wallet_address")),
            unique=True,
        ),
    )

    id: UUID = Field(default_factory=uuid4, primary_key=True)
    wallet_address: str = Field(sa_column=Column(String(42), nullable=False))
    twitter_handle: str | None = Field(default=None, sa_column=Column(String(255), nullable=True))
    farcaster_handle: str | None = Field(default=None, sa_column=Column(String(255), nullable=True))
    prompt_text: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = created_at_field()

    @validates("wallet_address")
    def _wallet(self, key: str, value: Any) -> str:
        return v.wallet(key, value)

    @validates("prompt_text")
    def _prompt(self, key: str, value: Any) -> str:
        return v.text_length(key, value, PROMPT_MIN, PROMPT_MAX)

    @validates("twitter_handle")
    def _twitter(self, key: str, value: Any) -> str | None:
        handle = v.optional_text(key, value, 255)
        if handle is not None and handle.startswith("@"):
            raise v.FieldValidationError(key, "must be given without the leading @", value)
        return handle

    @validates("farcaster_handle")
    def _farcaster(self, key: str, value: Any) -> str | None:
        return v.optional_text(key, value, 255)
