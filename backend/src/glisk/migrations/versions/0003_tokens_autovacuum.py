"""tokens_s0: vacuum early, as a work queue needs

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 13:30:00+00:00

Every claim and completion rewrites a token row (status is indexed, so no HOT update) and leaves
dead index entries at the head of the partial indexes the claim queries walk. With the default
scale factor (20%) autovacuum waits for ~200,000 dead rows on a 1M-row table; the benchmark
(`python -m bench tables --vacuum-every 0`) shows claims slowing several-fold long before that.
Vacuuming after 2% (+1,000) keeps the heads of those indexes clean at little cost.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        "ALTER TABLE tokens_s0 SET (autovacuum_vacuum_scale_factor = 0.02, "
        "autovacuum_vacuum_threshold = 1000, autovacuum_analyze_scale_factor = 0.02)"
    )


def downgrade() -> None:
    op.execute(
        "ALTER TABLE tokens_s0 RESET (autovacuum_vacuum_scale_factor, "
        "autovacuum_vacuum_threshold, autovacuum_analyze_scale_factor)"
    )
