"""checkpoints: a claim's durable progress on tokens_s0

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 23:15:00+00:00

``checkpoint`` holds what a handler recorded for its claim before an external effect (for the
reveal stage: the pending reveal transaction it is about to send). It survives a rescue (the next
holder receives it with its claim) and is cleared when the stage completes or the token fails for
good. A nullable column without default: no table rewrite, safe on a live table.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("tokens_s0", sa.Column("checkpoint", JSONB(), nullable=True))


def downgrade() -> None:
    op.drop_column("tokens_s0", "checkpoint")
