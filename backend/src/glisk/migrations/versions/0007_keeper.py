"""keeper: nonces owned by the database, every signed attempt of a reveal kept

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 22:30:00+00:00

The reveal keeper (glisk.chain.keeper) sends real signed transactions:
- ``keeper_nonces``: one allocator per (chain, sender). A reveal takes its nonce in the statement
  that records it, so two workers sharing a key never sign the same nonce, and the allocator is
  never rewound.
- ``reveal_transactions`` learns which chain, sender and nonce a reveal holds, its idempotency
  key (unique: one reveal per batch identity) and the block it was mined in. A partial GIN index
  over the token ids of pending reveals lets the recording statement refuse a token that is
  already in a transaction in flight.
- ``reveal_attempts``: every signed transaction for a reveal's nonce, stored before it is
  broadcast (signed bytes, hash, fees, gas), replacements and fillers included; a filler for a
  nonce no reveal holds any more has no reveal.

Safe on a live table: new tables; nullable columns without defaults on reveal_transactions (no
rewrite); indexes on it built CONCURRENTLY, outside the transaction.
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import BYTEA, UUID

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Copied, not imported: a migration must not change when the models do.
ADDRESS = "^0x[a-f0-9]{40}$"
HASH = "^0x[a-f0-9]{64}$"
# reveal_transactions' new columns, all nullable (rows from before the keeper have none).
COLUMNS: dict[str, sa.types.TypeEngine[Any]] = {
    "chain_id": sa.BigInteger(),
    "sender": sa.String(42),
    "nonce": sa.BigInteger(),
    "idempotency_key": sa.String(66),
    "block_hash": sa.String(66),
}
INDEXES = {
    "uq_reveal_transactions_idempotency_key": (
        "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS {name} "
        "ON reveal_transactions (idempotency_key)"
    ),
    "uq_reveal_transactions_chain_id_sender_nonce": (
        "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS {name} "
        "ON reveal_transactions (chain_id, sender, nonce)"
    ),
    "ix_reveal_transactions_pending_token_ids": (
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} "
        "ON reveal_transactions USING gin (token_ids) WHERE status = 'pending'"
    ),
}


def upgrade() -> None:
    op.create_table(
        "keeper_nonces",
        sa.Column("chain_id", sa.BigInteger(), nullable=False),
        sa.Column("address", sa.String(42), nullable=False),
        sa.Column("next_nonce", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("chain_id", "address", name=op.f("pk_keeper_nonces")),
        sa.CheckConstraint(f"address ~ '{ADDRESS}'", name=op.f("ck_keeper_nonces_address_format")),
        sa.CheckConstraint(
            "next_nonce >= 0", name=op.f("ck_keeper_nonces_next_nonce_non_negative")
        ),
    )
    op.create_table(
        "reveal_attempts",
        sa.Column("id", UUID(as_uuid=True), nullable=False),
        sa.Column("reveal_id", UUID(as_uuid=True), nullable=True),
        sa.Column("tx_hash", sa.String(66), nullable=False),
        sa.Column("kind", sa.String(50), nullable=False),
        sa.Column("sender", sa.String(42), nullable=False),
        sa.Column("nonce", sa.BigInteger(), nullable=False),
        sa.Column("raw", BYTEA(), nullable=False),
        sa.Column("gas_limit", sa.BigInteger(), nullable=False),
        sa.Column("max_fee_per_gas", sa.Numeric(78, 0), nullable=False),
        sa.Column("max_priority_fee_per_gas", sa.Numeric(78, 0), nullable=False),
        sa.Column("broadcasts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(),
            server_default=sa.text("(now() AT TIME ZONE 'utc')"),
            nullable=False,
        ),
        sa.Column("last_broadcast_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reveal_attempts")),
        sa.ForeignKeyConstraint(
            ["reveal_id"],
            ["reveal_transactions.id"],
            name=op.f("fk_reveal_attempts_reveal_id_reveal_transactions"),
            ondelete="CASCADE",
        ),
        sa.UniqueConstraint("tx_hash", name=op.f("uq_reveal_attempts_tx_hash")),
        sa.CheckConstraint(
            "kind IN ('reveal', 'filler')", name=op.f("ck_reveal_attempts_kind_allowed")
        ),
        sa.CheckConstraint(f"tx_hash ~ '{HASH}'", name=op.f("ck_reveal_attempts_tx_hash_format")),
        sa.CheckConstraint(f"sender ~ '{ADDRESS}'", name=op.f("ck_reveal_attempts_sender_format")),
        sa.CheckConstraint(
            "kind = 'filler' OR reveal_id IS NOT NULL",
            name=op.f("ck_reveal_attempts_reveal_has_row"),
        ),
    )
    op.create_index(op.f("ix_reveal_attempts_reveal_id"), "reveal_attempts", ["reveal_id"])
    op.create_index(op.f("ix_reveal_attempts_sender_nonce"), "reveal_attempts", ["sender", "nonce"])
    for name, type_ in COLUMNS.items():
        op.add_column("reveal_transactions", sa.Column(name, type_, nullable=True))
    with op.get_context().autocommit_block():
        for name, statement in INDEXES.items():
            op.execute(statement.format(name=name))


def downgrade() -> None:
    for name in INDEXES:
        op.drop_index(name, table_name="reveal_transactions", if_exists=True)
    for name in COLUMNS:
        op.drop_column("reveal_transactions", name)
    op.drop_table("reveal_attempts")
    op.drop_table("keeper_nonces")
