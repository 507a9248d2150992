"""chain ingest: the block of each mint log, and the follower's window of block hashes

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28 09:00:00+00:00

Issue 25 (glisk ingest, the Alchemy webhook); written beside 0007 (the keeper) and chained after
it when the two branches were merged.

- ``mint_events.block_hash``: the hash of the block a log was read from (NULL for logs recorded
  before, or by a caller that did not know it). A reorg is found by comparing it with the chain.
- ``chain_blocks``: the block hashes the follower consumed, newest first, kept as deep as
  INGEST_REORG_WINDOW: every block that held a mint log, and the last block of each step. The
  follower checks the chain against it at every step and finds the common ancestor there.

Safe on a live table: the column is nullable with no default (no rewrite); its CHECK is added NOT
VALID and validated afterwards (every existing row is NULL, so it passes); the new table is empty.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Copied, not imported: a migration must not change when the models do.
HASH = "^0x[a-f0-9]{64}$"
BLOCK_HASH_CHECK = "ck_mint_events_block_hash_format"


def upgrade() -> None:
    op.add_column("mint_events", sa.Column("block_hash", sa.String(66), nullable=True))
    op.execute(
        f"ALTER TABLE mint_events ADD CONSTRAINT {BLOCK_HASH_CHECK} "
        f"CHECK (block_hash IS NULL OR block_hash ~ '{HASH}') NOT VALID"
    )
    op.execute(f"ALTER TABLE mint_events VALIDATE CONSTRAINT {BLOCK_HASH_CHECK}")
    op.create_table(
        "chain_blocks",
        sa.Column("number", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("hash", sa.String(66), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=False), nullable=False),
        sa.PrimaryKeyConstraint("number", name="pk_chain_blocks"),
        sa.CheckConstraint("number >= 0", name="ck_chain_blocks_number_non_negative"),
        sa.CheckConstraint(f"hash ~ '{HASH}'", name="ck_chain_blocks_hash_format"),
    )


def downgrade() -> None:
    op.drop_table("chain_blocks")
    op.drop_constraint(op.f(BLOCK_HASH_CHECK), "mint_events", type_="check")
    op.drop_column("mint_events", "block_hash")
