"""The DDL a stage needs, rendered from its row in ``glisk.pipeline``: its partial claim index and
the insert trigger's NOTIFY function that wakes every stage's idle workers.

A migration must not change when the code does, so a migration never imports this module: it
holds the text rendered when it was written. To add a stage (CONTRIBUTING.md, "A new stage"):

    uv run alembic revision -m "the <name> stage"
    uv run python -m glisk.migrations.stage_ddl <name>     # paste what it prints into upgrade()

The tests render the same text for a throwaway stage and apply it to a scratch database.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from glisk.pipeline import STAGES, Stage

NOTIFY_FUNCTION_NAME = "glisk_notify_new_tokens"


def claim_index(stage: Stage) -> str:
    """``CREATE INDEX CONCURRENTLY`` of the stage's claim index (outside a transaction: in
    Alembic, inside ``op.get_context().autocommit_block()``)."""
    return (
        f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {stage.index_name} "
        f"ON tokens_s0 (mint_timestamp, id) WHERE {stage.predicate}"
    )


def notify_function(stages: Iterable[Stage]) -> str:
    """The insert trigger's function (``tokens_s0_notify_new``, migration 0004, calls it once per
    statement): NOTIFY each stage whose fresh tokens the statement inserted."""
    checks = "".join(
        f"    IF EXISTS (SELECT 1 FROM inserted_tokens WHERE {stage.fresh}) THEN\n"
        f"        PERFORM pg_notify('{stage.channel}', '');\n"
        "    END IF;\n"
        for stage in stages
    )
    return (
        f"CREATE OR REPLACE FUNCTION {NOTIFY_FUNCTION_NAME}() RETURNS trigger LANGUAGE plpgsql "
        f"AS $$\nBEGIN\n{checks}    RETURN NULL;\nEND\n$$"
    )


def upgrade_text(stage: Stage, stages: Iterable[Stage]) -> str:
    """The body of a migration's ``upgrade()`` adding ``stage`` to a pipeline of ``stages``."""
    return (
        f"op.execute('''{notify_function(stages)}''')\n"
        "with op.get_context().autocommit_block():\n"
        f'    op.execute("{claim_index(stage)}")\n'
    )


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in STAGES:
        print(
            f"usage: python -m glisk.migrations.stage_ddl {{{','.join(STAGES)}}}", file=sys.stderr
        )
        return 2
    print(upgrade_text(STAGES[argv[0]], STAGES.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
