"""leased claims: holder, fencing id, lease and attempts on tokens_s0

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 12:33:23.848275+00:00

Adds what glisk.workers needs to claim tokens in one statement and hold them across slow external
calls without an open transaction. The partial indexes hold only tokens a stage may claim, so the
claim queries stay fast however many finished tokens pile up. Columns are nullable or defaulted:
the migration is instant on a large table (no rewrite).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Copied, not imported: a migration must not change when the models do.
CLAIM_INDEXES = {
    "ix_tokens_s0_claim_image": (
        "image_path IS NULL AND (status = 'detected'"
        " OR (status = 'generating' AND claimed_by IS NOT NULL))"
    ),
    "ix_tokens_s0_claim_upload": (
        "image_path IS NOT NULL AND (status = 'generating'"
        " OR (status = 'uploading' AND claimed_by IS NOT NULL))"
    ),
    "ix_tokens_s0_claim_reveal": "status = 'ready'",
}
CHECKS = {
    "ck_tokens_s0_claim_has_lease": "(claim_id IS NULL) = (lease_expires_at IS NULL)",
    "ck_tokens_s0_claim_has_holder": "claim_id IS NULL OR claimed_by IS NOT NULL",
    "ck_tokens_s0_finished_token_not_claimed": (
        "claim_id IS NULL OR status NOT IN ('revealed', 'failed')"
    ),
    "ck_tokens_s0_attempts_non_negative": "attempts >= 0",
}


def upgrade() -> None:
    op.add_column("tokens_s0", sa.Column("claimed_by", sa.String(length=255), nullable=True))
    op.add_column("tokens_s0", sa.Column("claim_id", sa.UUID(), nullable=True))
    op.add_column("tokens_s0", sa.Column("lease_expires_at", sa.DateTime(), nullable=True))
    op.add_column(
        "tokens_s0",
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )
    for name, condition in CHECKS.items():
        op.create_check_constraint(op.f(name), "tokens_s0", condition)
    for name, predicate in CLAIM_INDEXES.items():
        op.create_index(
            name, "tokens_s0", ["mint_timestamp", "id"], postgresql_where=sa.text(predicate)
        )


def downgrade() -> None:
    for name in CLAIM_INDEXES:
        op.drop_index(name, table_name="tokens_s0")
    for name in CHECKS:
        op.drop_constraint(op.f(name), "tokens_s0", type_="check")
    for column in ("attempts", "lease_expires_at", "claim_id", "claimed_by"):
        op.drop_column("tokens_s0", column)
