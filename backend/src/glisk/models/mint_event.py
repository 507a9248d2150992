from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

from sqlalchemy import CheckConstraint, Column, Integer, String, UniqueConstraint, text
from sqlalchemy.orm import validates
from sqlmodel import Field

from glisk.core.timezone import utcnow
from glisk.models import validation as v
from glisk.models._columns import timestamp_column
from glisk.models.base import Entity

# GliskNFT.MAX_BATCH_SIZE: one mint() call, and so one BatchMinted log, mints 1 to 50 tokens.
MAX_MINT_QUANTITY = 50


class MintEvent(Entity, table=True):
    """A mint log seen on-chain, kept for deduplication: (tx_hash, log_index) is unique.

    One row per log. A batch mint (GliskNFT's ``BatchMinted``) mints ``quantity`` consecutive
    tokens starting at ``token_id``; ``token_ids`` lists them.

    tx_hash is stored lowercase (the model normalises it; the CHECK refuses anything else), so the
    same event cannot be recorded twice under different letter case.
    """

    __tablename__ = "mint_events"  # pyright: ignore[reportAssignmentType]
    __table_args__ = (
        UniqueConstraint("tx_hash", "log_index"),
        CheckConstraint(f"tx_hash ~ '{v.TX_HASH_STORED_PATTERN}'", name="tx_hash_format"),
        CheckConstraint("log_index >= 0", name="log_index_non_negative"),
        CheckConstraint("block_number > 0", name="block_number_positive"),
        # 0005: batch mints, and the token_id rule the model already had.
        CheckConstraint("token_id >= 0", name="token_id_non_negative"),
        CheckConstraint(f"quantity BETWEEN 1 AND {MAX_MINT_QUANTITY}", name="quantity_range"),
        # 0008: the block the log was read from (NULL when the deliverer did not say).
        CheckConstraint(
            f"block_hash IS NULL OR block_hash ~ '{v.TX_HASH_STORED_PATTERN}'",
            name="block_hash_format",
        ),
    )

    id: UUID = Field(default_factory=uuid4, primary_key=True)
    tx_hash: str = Field(sa_column=Column(String(66), nullable=False))
    log_index: int = Field(sa_column=Column(Integer, nullable=False))
    block_number: int = Field(sa_column=Column(Integer, nullable=False, index=True))
    block_timestamp: datetime = Field(sa_column=timestamp_column())
    # The first token of the log (the only one unless quantity > 1). Indexed so that the log that
    # minted a given token id can be found (MintConflict names it).
    token_id: int = Field(sa_column=Column(Integer, nullable=False, index=True))
    quantity: int = Field(
        default=1, sa_column=Column(Integer, nullable=False, server_default=text("1"))
    )
    detected_at: datetime = Field(default_factory=utcnow, sa_column=timestamp_column())
    # The hash of the block the log was read from, lowercase; None when the deliverer did not
    # give it. The follower compares it with the chain to find logs of orphaned blocks.
    block_hash: str | None = Field(default=None, sa_column=Column(String(66), nullable=True))

    @property
    def token_ids(self) -> range:
        return range(self.token_id, self.token_id + self.quantity)

    @validates("tx_hash")
    def _tx_hash(self, key: str, value: Any) -> str:
        return v.tx_hash(key, value)

    @validates("log_index")
    def _log_index(self, key: str, value: Any) -> int:
        return v.int_at_least(key, value, 0)

    @validates("block_hash")
    def _block_hash(self, key: str, value: Any) -> str | None:
        return v.optional_tx_hash(key, value)

    @validates("block_number")
    def _block_number(self, key: str, value: Any) -> int:
        return v.int_at_least(key, value, 1)

    @validates("token_id")
    def _token_id(self, key: str, value: Any) -> int:
        return v.int_at_least(key, value, 0)

    @validates("quantity")
    def _quantity(self, key: str, value: Any) -> int:
        return _quantity(key, value)


def _quantity(field: str, value: Any) -> int:
    quantity = v.int_at_least(field, value, 1)
    if quantity > MAX_MINT_QUANTITY:
        raise v.FieldValidationError(
            field, f"must be an integer from 1 to {MAX_MINT_QUANTITY}", value
        )
    return quantity


@dataclass(frozen=True)
class MintLog:
    """One decoded ``BatchMinted(minter, promptAuthor, startTokenId, quantity, totalPaid)`` log,
    as a webhook, a block poller or a recovery pass delivers it.

    Identified by (tx_hash, log_index). Construction validates every field and raises
    FieldValidationError naming it; tx_hash and block_hash are lowercased, and block_timestamp is
    stored as naive UTC (an aware datetime is converted, a naive one is taken to be UTC already).
    Wallets keep their letter case. ``block_hash`` is the block the log was read from, when the
    deliverer knows it (a node and Alchemy do): reorg handling compares it with the chain.
    """

    tx_hash: str
    log_index: int
    block_number: int
    block_timestamp: datetime
    minter: str
    author: str
    start_token_id: int
    quantity: int = 1
    block_hash: str | None = dataclasses.field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise once, here
        set_(self, "tx_hash", v.tx_hash("tx_hash", self.tx_hash))
        v.int_at_least("log_index", self.log_index, 0)
        v.int_at_least("block_number", self.block_number, 1)
        set_(self, "block_hash", v.optional_tx_hash("block_hash", self.block_hash))
        if not isinstance(self.block_timestamp, datetime):
            raise v.FieldValidationError(
                "block_timestamp", "must be a datetime", self.block_timestamp
            )
        if self.block_timestamp.tzinfo is not None:
            naive = self.block_timestamp.astimezone(UTC).replace(tzinfo=None)
            set_(self, "block_timestamp", naive)
        v.wallet("minter", self.minter)
        v.wallet("author", self.author)
        v.int_at_least("start_token_id", self.start_token_id, 0)
        _quantity("quantity", self.quantity)

    @property
    def token_ids(self) -> range:
        return range(self.start_token_id, self.start_token_id + self.quantity)

    @property
    def key(self) -> tuple[str, int]:
        """What identifies the log on-chain: (tx_hash, log_index)."""
        return (self.tx_hash, self.log_index)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (for queues, subprocesses and the fake webhook feed)."""
        return {
            "tx_hash": self.tx_hash,
            "log_index": self.log_index,
            "block_number": self.block_number,
            "block_timestamp": self.block_timestamp.isoformat(),
            "minter": self.minter,
            "author": self.author,
            "start_token_id": self.start_token_id,
            "quantity": self.quantity,
            "block_hash": self.block_hash,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MintLog:
        """The inverse of ``to_json``. Raises FieldValidationError naming a missing, unknown or
        malformed field."""
        if not isinstance(data, dict):
            raise v.FieldValidationError("mint log", "must be a JSON object", data)
        known = [f.name for f in dataclasses.fields(cls)]
        for name in data:
            if name not in known:
                raise v.FieldValidationError(name, "is not a mint log field", data[name])
        for name in known[:-2]:  # quantity (1) and block_hash (None) may be left out
            if name not in data:
                raise v.FieldValidationError(name, "is required", None)
        fields = dict(data)
        stamp = fields.get("block_timestamp")
        if isinstance(stamp, str):
            try:
                fields["block_timestamp"] = datetime.fromisoformat(stamp)
            except ValueError:
                raise v.FieldValidationError(
                    "block_timestamp", "must be an ISO 8601 timestamp", stamp
                ) from None
        return cls(**fields)
