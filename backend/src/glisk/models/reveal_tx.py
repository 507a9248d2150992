from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4

from sqlalchemy import BigInteger, CheckConstraint, Column, Index, Integer, Numeric, String, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import UUID as PGUUID
from sqlalchemy.orm import validates
from sqlmodel import Field

from glisk.models import validation as v
from glisk.models._columns import (
    closed_set_column,
    created_at_field,
    in_set_check,
    optional_timestamp_field,
)
from glisk.models.base import Entity
from glisk.models.enums import RevealStatus

MAX_BATCH = 50


class RevealTransaction(Entity, table=True):
    """One on-chain reveal of a batch of 1 to 50 tokens (token_ids are tokens_s0.id values).

    ``sent`` means submitted and awaiting confirmation. tx_hash is stored lowercase. A reveal the
    keeper sent holds one nonce of (chain_id, sender) for good; its signed transactions are its
    ``reveal_attempts``, and tx_hash is the one mined once it is. ``idempotency_key`` names the
    batch (chain, contract, token ids, the reveals they were in before): one reveal per key.
    """

    __tablename__ = "reveal_transactions"  # pyright: ignore[reportAssignmentType]
    __table_args__ = (
        in_set_check("status", RevealStatus),
        CheckConstraint(
            f"cardinality(token_ids) BETWEEN 1 AND {MAX_BATCH}",
            name="token_ids_batch_size",
        ),
        CheckConstraint(
            f"tx_hash IS NULL OR tx_hash ~ '{v.TX_HASH_STORED_PATTERN}'",
            name="tx_hash_format",
        ),
        CheckConstraint("block_number IS NULL OR block_number > 0", name="block_number_positive"),
        CheckConstraint(
            "gas_price_gwei IS NULL OR gas_price_gwei >= 0",
            name="gas_price_non_negative",
        ),
        Index("uq_reveal_transactions_idempotency_key", "idempotency_key", unique=True),
        Index(
            "uq_reveal_transactions_chain_id_sender_nonce",
            "chain_id",
            "sender",
            "nonce",
            unique=True,
        ),
        # The keeper's in-flight guard: is any of these tokens in a pending reveal?
        Index(
            "ix_reveal_transactions_pending_token_ids",
            "token_ids",
            postgresql_using="gin",
            postgresql_where=text("status = 'pending'"),
        ),
    )

    id: UUID = Field(default_factory=uuid4, primary_key=True)
    token_ids: list[UUID] = Field(sa_column=Column(ARRAY(PGUUID(as_uuid=True)), nullable=False))
    tx_hash: str | None = Field(
        default=None, sa_column=Column(String(66), nullable=True, index=True)
    )
    block_number: int | None = Field(default=None, sa_column=Column(Integer, nullable=True))
    gas_price_gwei: Decimal | None = Field(
        default=None, sa_column=Column(Numeric(20, 9), nullable=True)
    )
    status: RevealStatus = Field(
        default=RevealStatus.PENDING,
        sa_column=closed_set_column(RevealStatus, default=RevealStatus.PENDING, index=True),
    )
    created_at: datetime = created_at_field()
    confirmed_at: datetime | None = optional_timestamp_field()
    chain_id: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    sender: str | None = Field(default=None, sa_column=Column(String(42), nullable=True))
    nonce: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    idempotency_key: str | None = Field(default=None, sa_column=Column(String(66), nullable=True))
    block_hash: str | None = Field(default=None, sa_column=Column(String(66), nullable=True))

    @validates("token_ids")
    def _token_ids(self, key: str, value: Any) -> list[UUID]:
        items = v.item_count(key, value, 1, MAX_BATCH)
        if not all(isinstance(item, UUID) for item in items):
            raise v.FieldValidationError(key, "must hold UUIDs", items)
        if len(set(items)) != len(items):
            raise v.FieldValidationError(key, "must not repeat a token", items)
        return items

    @validates("tx_hash")
    def _tx_hash(self, key: str, value: Any) -> str | None:
        return v.optional_tx_hash(key, value)

    @validates("block_number")
    def _block_number(self, key: str, value: Any) -> int | None:
        return v.optional_int_at_least(key, value, 1)

    @validates("status")
    def _status(self, key: str, value: Any) -> RevealStatus:
        return v.one_of(key, value, RevealStatus)

    @validates("gas_price_gwei")
    def _gas_price(self, key: str, value: Any) -> Decimal | None:
        if value is None:
            return None
        price = Decimal(str(value))
        if price < 0 or price >= Decimal(10) ** 11:
            raise v.FieldValidationError(key, "must be >= 0 and < 1e11 (NUMERIC(20,9))", value)
        return price
