"""mint records: batch mints on mint_events, and the index that finds a token's log

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 09:00:00+00:00

A BatchMinted log mints 1 to 50 consecutive tokens: mint_events.token_id is the first and the new
quantity column says how many (1 for every row recorded before). The index on token_id finds the
log that minted a given token (MintConflict names it). token_id >= 0 was a model rule only; the
database now states it too.

Safe on a live, large table: the column has a constant default (no rewrite); the CHECKs are added
NOT VALID (a brief lock) and validated afterwards under a lock that lets reads and writes go on;
the index is built CONCURRENTLY, outside the transaction.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Copied, not imported: a migration must not change when the models do.
CHECKS = {
    "ck_mint_events_token_id_non_negative": "token_id >= 0",
    "ck_mint_events_quantity_range": "quantity BETWEEN 1 AND 50",
}
INDEX = "ix_mint_events_token_id"


def upgrade() -> None:
    op.add_column(
        "mint_events",
        sa.Column("quantity", sa.Integer(), server_default=sa.text("1"), nullable=False),
    )
    for name, condition in CHECKS.items():
        op.execute(f"ALTER TABLE mint_events ADD CONSTRAINT {name} CHECK ({condition}) NOT VALID")
    for name in CHECKS:
        op.execute(f"ALTER TABLE mint_events VALIDATE CONSTRAINT {name}")
    with op.get_context().autocommit_block():
        op.create_index(INDEX, "mint_events", ["token_id"], postgresql_concurrently=True)


def downgrade() -> None:
    op.drop_index(INDEX, table_name="mint_events", if_exists=True)
    for name in CHECKS:
        op.drop_constraint(op.f(name), "mint_events", type_="check")
    op.drop_column("mint_events", "quantity")
