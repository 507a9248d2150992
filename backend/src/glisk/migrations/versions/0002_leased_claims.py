"""leased claims: holder, fencing id, lease and attempts on tokens_s0

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 12:33:23.848275+00:00

Adds what glisk.workers needs to claim tokens in one statement and hold them across slow external
calls without an open transaction. The partial indexes hold only tokens a stage may claim, so the
claim queries stay fast however many finished tokens pile up.

Safe on a live, large table: the columns are nullable or have a constant default (no rewrite);
the CHECKs are added NOT VALID (a brief lock) and validated afterwards under a lock that lets
reads and writes go on; the indexes are built CONCURRENTLY, outside the transaction.
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
        op.execute(f"ALTER TABLE tokens_s0 ADD CONSTRAINT {name} CHECK ({condition}) NOT VALID")
    for name in CHECKS:
        op.execute(f"ALTER TABLE tokens_s0 VALIDATE CONSTRAINT {name}")
    with op.get_context().autocommit_block():
        for name, predicate in CLAIM_INDEXES.items():
            op.create_index(
                name,
                "tokens_s0",
                ["mint_timestamp", "id"],
                postgresql_where=sa.text(predicate),
                postgresql_concurrently=True,
            )


def downgrade() -> None:
    for name in CLAIM_INDEXES:
        op.drop_index(name, table_name="tokens_s0", if_exists=True)
    for name in CHECKS:
        op.drop_constraint(op.f(name), "tokens_s0", type_="check")
    for column in ("attempts", "lease_expires_at", "claim_id", "claimed_by"):
        op.drop_column("tokens_s0", column)
