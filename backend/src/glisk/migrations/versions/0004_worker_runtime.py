"""worker runtime: backoff, deferrals, a claim_id index and wake-ups for new tokens

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 23:10:00+00:00

- ``not_before``: a failed attempt (or a handler's RetryLater) makes a token claimable again only
  from then on. The claim statements filter on it while walking their partial indexes; the
  predicates of those indexes do not change.
- ``deferrals``: RetryLaters in the current stage, bounded by the worker.
- ``ix_tokens_s0_claim_id``: completions, failures, heartbeats and releases find their rows by the
  claim's fencing id; a partial index holds only claimed rows.
- A statement-level trigger NOTIFYs ``glisk_stage_<name>`` when inserted tokens are claimable by a
  stage, so idle workers wake at once instead of at their next poll. (Completions and releases
  notify from their own statements in glisk.workers.queries.)

Safe on a live, large table: the columns are nullable or have a constant default (no rewrite);
the CHECK is added NOT VALID and validated under a lock that lets reads and writes go on; the index
is built CONCURRENTLY, outside the transaction.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The stage conditions for fresh tokens, copied (not imported) from the claim index predicates:
# a migration must not change when the code does.
NOTIFY_FUNCTION = """
CREATE FUNCTION glisk_notify_new_tokens() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('glisk_stage_' || stage, '')
    FROM (
        SELECT DISTINCT CASE
            WHEN status = 'detected' AND image_path IS NULL THEN 'image'
            WHEN status = 'generating' AND image_path IS NOT NULL THEN 'upload'
            WHEN status = 'ready' THEN 'reveal'
        END AS stage
        FROM inserted_tokens
    ) AS stages
    WHERE stage IS NOT NULL;
    RETURN NULL;
END
$$
"""
NOTIFY_TRIGGER = """
CREATE TRIGGER tokens_s0_notify_new AFTER INSERT ON tokens_s0
REFERENCING NEW TABLE AS inserted_tokens
FOR EACH STATEMENT EXECUTE FUNCTION glisk_notify_new_tokens()
"""


def upgrade() -> None:
    op.add_column("tokens_s0", sa.Column("not_before", sa.DateTime(), nullable=True))
    op.add_column(
        "tokens_s0",
        sa.Column("deferrals", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )
    op.execute(
        "ALTER TABLE tokens_s0 ADD CONSTRAINT ck_tokens_s0_deferrals_non_negative "
        "CHECK (deferrals >= 0) NOT VALID"
    )
    op.execute("ALTER TABLE tokens_s0 VALIDATE CONSTRAINT ck_tokens_s0_deferrals_non_negative")
    op.execute(NOTIFY_FUNCTION)
    op.execute(NOTIFY_TRIGGER)
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_tokens_s0_claim_id",
            "tokens_s0",
            ["claim_id"],
            postgresql_where=sa.text("claim_id IS NOT NULL"),
            postgresql_concurrently=True,
        )


def downgrade() -> None:
    op.drop_index("ix_tokens_s0_claim_id", table_name="tokens_s0", if_exists=True)
    op.execute("DROP TRIGGER IF EXISTS tokens_s0_notify_new ON tokens_s0")
    op.execute("DROP FUNCTION IF EXISTS glisk_notify_new_tokens()")
    op.drop_constraint(op.f("ck_tokens_s0_deferrals_non_negative"), "tokens_s0", type_="check")
    op.drop_column("tokens_s0", "deferrals")
    op.drop_column("tokens_s0", "not_before")
