"""The reveal keeper's own rows: its nonce allocators and every signed attempt of a reveal.

The keeper (glisk.chain.keeper) writes these through its own statements (glisk.chain.queries);
the models state the schema (and let the tests and the operator's commands read it).
"""

from datetime import datetime
from decimal import Decimal
from uuid import UUID, uuid4

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    Numeric,
    String,
    text,
)
from sqlalchemy.dialects.postgresql import UUID as PGUUID
from sqlmodel import Field

from glisk.models import validation as v
from glisk.models._columns import created_at_field, timestamp_column
from glisk.models.base import Entity

ADDRESS_STORED_PATTERN = r"^0x[a-f0-9]{40}$"  # senders are kept lowercase


class KeeperNonce(Entity, table=True):
    """The next nonce the keeper gives out for (chain_id, address). Moves up only: by one when a
    reveal is recorded, or to the chain's confirmed count when that is higher (start-up)."""

    __tablename__ = "keeper_nonces"  # pyright: ignore[reportAssignmentType]
    __table_args__ = (
        CheckConstraint(f"address ~ '{ADDRESS_STORED_PATTERN}'", name="address_format"),
        CheckConstraint("next_nonce >= 0", name="next_nonce_non_negative"),
    )

    chain_id: int = Field(sa_column=Column(BigInteger, primary_key=True))
    address: str = Field(sa_column=Column(String(42), primary_key=True))
    next_nonce: int = Field(sa_column=Column(BigInteger, nullable=False))
    updated_at: datetime = Field(sa_column=timestamp_column())


class RevealAttempt(Entity, table=True):
    """One signed transaction for a reveal's nonce, stored before it was broadcast: the first,
    each replacement (same nonce, higher fees), or a filler (a no-op self-send that spends a
    nonce no reveal can use; ``reveal_id`` is NULL for a gap found at start-up)."""

    __tablename__ = "reveal_attempts"  # pyright: ignore[reportAssignmentType]
    __table_args__ = (
        CheckConstraint("kind IN ('reveal', 'filler')", name="kind_allowed"),
        CheckConstraint(f"tx_hash ~ '{v.TX_HASH_STORED_PATTERN}'", name="tx_hash_format"),
        CheckConstraint(f"sender ~ '{ADDRESS_STORED_PATTERN}'", name="sender_format"),
        CheckConstraint("kind = 'filler' OR reveal_id IS NOT NULL", name="reveal_has_row"),
        Index("ix_reveal_attempts_sender_nonce", "sender", "nonce"),
    )

    id: UUID = Field(default_factory=uuid4, primary_key=True)
    reveal_id: UUID | None = Field(
        default=None,
        sa_column=Column(
            PGUUID(as_uuid=True),
            ForeignKey("reveal_transactions.id", ondelete="CASCADE"),
            nullable=True,
            index=True,
        ),
    )
    tx_hash: str = Field(sa_column=Column(String(66), nullable=False, unique=True))
    kind: str = Field(sa_column=Column(String(50), nullable=False))
    sender: str = Field(sa_column=Column(String(42), nullable=False))
    nonce: int = Field(sa_column=Column(BigInteger, nullable=False))
    raw: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    gas_limit: int = Field(sa_column=Column(BigInteger, nullable=False))
    max_fee_per_gas: Decimal = Field(sa_column=Column(Numeric(78, 0), nullable=False))
    max_priority_fee_per_gas: Decimal = Field(sa_column=Column(Numeric(78, 0), nullable=False))
    broadcasts: int = Field(
        default=0, sa_column=Column(Integer, nullable=False, server_default=text("0"))
    )
    created_at: datetime = created_at_field()
    last_broadcast_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=False), nullable=True)
    )
