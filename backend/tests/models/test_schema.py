"""The migrated schema, inspected in the database itself (not trusted from the models)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import alembic_postgresql_enum  # noqa: F401  (so enum drift is compared too)
import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine

from glisk import migrations
from glisk.models import metadata
from glisk.testing import libpq_kwargs, throwaway_database
from tests.support.database import Database

# table -> column -> (data type, nullable, character length)
EXPECTED_COLUMNS: dict[str, dict[str, tuple[str, bool, int | None]]] = {
    "authors": {
        "id": ("uuid", False, None),
        "wallet_address": ("character varying", False, 42),
        "twitter_handle": ("character varying", True, 255),
        "farcaster_handle": ("character varying", True, 255),
        "prompt_text": ("text", False, None),
        "created_at": ("timestamp without time zone", False, None),
    },
    "tokens_s0": {
        "id": ("uuid", False, None),
        "token_id": ("integer", False, None),
        "author_id": ("uuid", False, None),
        "minter_address": ("character varying", False, 42),
        "status": ("USER-DEFINED", False, None),
        "mint_timestamp": ("timestamp without time zone", False, None),
        "image_path": ("character varying", True, 2048),
        "image_cid": ("character varying", True, 255),
        "metadata_cid": ("character varying", True, 255),
        "reveal_tx_hash": ("character varying", True, 66),
        "error_data": ("jsonb", True, None),
        "created_at": ("timestamp without time zone", False, None),
        # 0002: leased claims
        "claimed_by": ("character varying", True, 255),
        "claim_id": ("uuid", True, None),
        "lease_expires_at": ("timestamp without time zone", True, None),
        "attempts": ("integer", False, None),
        "not_before": ("timestamp without time zone", True, None),
        "deferrals": ("integer", False, None),
        "checkpoint": ("jsonb", True, None),
    },
    "mint_events": {
        "id": ("uuid", False, None),
        "tx_hash": ("character varying", False, 66),
        "log_index": ("integer", False, None),
        "block_number": ("integer", False, None),
        "block_timestamp": ("timestamp without time zone", False, None),
        "token_id": ("integer", False, None),
        "detected_at": ("timestamp without time zone", False, None),
        # 0005: batch mints
        "quantity": ("integer", False, None),
        # 0008: the block a log was read from
        "block_hash": ("character varying", True, 66),
    },
    "image_generation_jobs": {
        "id": ("uuid", False, None),
        "token_id": ("uuid", False, None),
        "service": ("character varying", False, 50),
        "status": ("character varying", False, 50),
        "external_job_id": ("character varying", True, 255),
        "retry_count": ("integer", False, None),
        "error_data": ("jsonb", True, None),
        "created_at": ("timestamp without time zone", False, None),
        "completed_at": ("timestamp without time zone", True, None),
    },
    "ipfs_upload_records": {
        "id": ("uuid", False, None),
        "token_id": ("uuid", False, None),
        "record_type": ("character varying", False, 50),
        "cid": ("character varying", True, 255),
        "status": ("character varying", False, 50),
        "retry_count": ("integer", False, None),
        "error_data": ("jsonb", True, None),
        "created_at": ("timestamp without time zone", False, None),
        "completed_at": ("timestamp without time zone", True, None),
    },
    "reveal_transactions": {
        "id": ("uuid", False, None),
        "token_ids": ("ARRAY", False, None),
        "tx_hash": ("character varying", True, 66),
        "block_number": ("integer", True, None),
        "gas_price_gwei": ("numeric", True, None),
        "status": ("character varying", False, 50),
        "created_at": ("timestamp without time zone", False, None),
        "confirmed_at": ("timestamp without time zone", True, None),
        # 0007: the keeper
        "chain_id": ("bigint", True, None),
        "sender": ("character varying", True, 42),
        "nonce": ("bigint", True, None),
        "idempotency_key": ("character varying", True, 66),
        "block_hash": ("character varying", True, 66),
    },
    "reveal_attempts": {
        "id": ("uuid", False, None),
        "reveal_id": ("uuid", True, None),
        "tx_hash": ("character varying", False, 66),
        "kind": ("character varying", False, 50),
        "sender": ("character varying", False, 42),
        "nonce": ("bigint", False, None),
        "raw": ("bytea", False, None),
        "gas_limit": ("bigint", False, None),
        "max_fee_per_gas": ("numeric", False, None),
        "max_priority_fee_per_gas": ("numeric", False, None),
        "broadcasts": ("integer", False, None),
        "created_at": ("timestamp without time zone", False, None),
        "last_broadcast_at": ("timestamp without time zone", True, None),
    },
    "keeper_nonces": {
        "chain_id": ("bigint", False, None),
        "address": ("character varying", False, 42),
        "next_nonce": ("bigint", False, None),
        "updated_at": ("timestamp without time zone", False, None),
    },
    "system_state": {
        "key": ("character varying", False, 255),
        "state_value": ("jsonb", False, None),
        "updated_at": ("timestamp without time zone", False, None),
    },
    # 0008: the log follower's window of block hashes
    "chain_blocks": {
        "number": ("integer", False, None),
        "hash": ("character varying", False, 66),
        "recorded_at": ("timestamp without time zone", False, None),
    },
}

# index name -> fragment of its definition (pg_indexes.indexdef)
EXPECTED_INDEXES = {
    "uq_authors_wallet_address_lower": "UNIQUE INDEX uq_authors_wallet_address_lower ON public.authors USING btree (lower((wallet_address)::text))",
    "uq_tokens_s0_token_id": "(token_id)",
    "ix_tokens_s0_status_mint_timestamp": "(status, mint_timestamp)",
    "ix_tokens_s0_author_id": "(author_id)",
    "uq_mint_events_tx_hash_log_index": "UNIQUE INDEX uq_mint_events_tx_hash_log_index ON public.mint_events USING btree (tx_hash, log_index)",
    "ix_mint_events_block_number": "(block_number)",
    "ix_mint_events_token_id": "(token_id)",
    "ix_image_generation_jobs_token_id": "(token_id)",
    "ix_image_generation_jobs_service_status": "(service, status)",
    "ix_ipfs_upload_records_token_id": "(token_id)",
    "ix_ipfs_upload_records_record_type_status": "(record_type, status)",
    "ix_reveal_transactions_tx_hash": "(tx_hash)",
    "ix_reveal_transactions_status": "(status)",
    "ix_tokens_s0_claim_image": "(mint_timestamp, id) WHERE ((image_path IS NULL) AND ((status = 'detected'::token_status_enum) OR ((status = 'generating'::token_status_enum) AND (claimed_by IS NOT NULL))))",
    "ix_tokens_s0_claim_upload": "(mint_timestamp, id) WHERE ((image_path IS NOT NULL) AND ((status = 'generating'::token_status_enum) OR ((status = 'uploading'::token_status_enum) AND (claimed_by IS NOT NULL))))",
    "ix_tokens_s0_claim_reveal": "(mint_timestamp, id) WHERE (status = 'ready'::token_status_enum)",
    "ix_tokens_s0_claim_id": "(claim_id) WHERE (claim_id IS NOT NULL)",
    "uq_reveal_transactions_idempotency_key": "UNIQUE INDEX uq_reveal_transactions_idempotency_key ON public.reveal_transactions USING btree (idempotency_key)",
    "uq_reveal_transactions_chain_id_sender_nonce": "(chain_id, sender, nonce)",
    "ix_reveal_transactions_pending_token_ids": "USING gin (token_ids) WHERE ((status)::text = 'pending'::text)",
    "uq_reveal_attempts_tx_hash": "(tx_hash)",
    "ix_reveal_attempts_reveal_id": "(reveal_id)",
    "ix_reveal_attempts_sender_nonce": "(sender, nonce)",
}


@pytest.fixture(scope="module")
def conn(postgres_container: Database) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(**libpq_kwargs(postgres_container.url), autocommit=True) as c:  # type: ignore[arg-type]
        yield c


def test_every_table_has_exactly_the_specified_columns(conn: psycopg.Connection[Any]) -> None:
    rows = conn.execute(
        """
        SELECT table_name, column_name, data_type, is_nullable = 'YES', character_maximum_length
        FROM information_schema.columns WHERE table_schema = 'public'
        AND table_name <> 'alembic_version'
        """
    ).fetchall()
    actual: dict[str, dict[str, tuple[str, bool, int | None]]] = {}
    for table, column, data_type, nullable, length in rows:
        actual.setdefault(table, {})[column] = (data_type, nullable, length)
    assert actual == EXPECTED_COLUMNS


def test_precise_types_jsonb_uuid_array_numeric_and_native_enum(
    conn: psycopg.Connection[Any],
) -> None:
    numeric = conn.execute(
        "SELECT numeric_precision, numeric_scale FROM information_schema.columns "
        "WHERE table_name = 'reveal_transactions' AND column_name = 'gas_price_gwei'"
    ).fetchone()
    assert numeric == (20, 9)
    array_of = conn.execute(
        "SELECT udt_name FROM information_schema.columns "
        "WHERE table_name = 'reveal_transactions' AND column_name = 'token_ids'"
    ).fetchone()
    assert array_of == ("_uuid",)
    status = conn.execute(
        "SELECT udt_name, column_default FROM information_schema.columns "
        "WHERE table_name = 'tokens_s0' AND column_name = 'status'"
    ).fetchone()
    assert status == ("token_status_enum", "'detected'::token_status_enum")
    labels = conn.execute(
        "SELECT array_agg(enumlabel ORDER BY enumsortorder) FROM pg_enum e "
        "JOIN pg_type t ON t.oid = e.enumtypid WHERE t.typname = 'token_status_enum'"
    ).fetchone()
    assert labels == (["detected", "generating", "uploading", "ready", "revealed", "failed"],)


def test_indexes_for_lookups_and_worker_polling_exist(conn: psycopg.Connection[Any]) -> None:
    rows = dict(
        conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'"
        ).fetchall()
    )
    for name, fragment in EXPECTED_INDEXES.items():
        assert name in rows, f"missing index {name}"
        assert fragment in rows[name], rows[name]


def test_foreign_keys_restrict_authors_and_cascade_token_children(
    conn: psycopg.Connection[Any],
) -> None:
    rows = conn.execute(
        """
        SELECT tc.table_name, kcu.column_name, ccu.table_name, rc.delete_rule
        FROM information_schema.referential_constraints rc
        JOIN information_schema.table_constraints tc ON tc.constraint_name = rc.constraint_name
        JOIN information_schema.key_column_usage kcu ON kcu.constraint_name = rc.constraint_name
        JOIN information_schema.constraint_column_usage ccu
          ON ccu.constraint_name = rc.unique_constraint_name
        """
    ).fetchall()
    assert sorted(rows) == [
        ("image_generation_jobs", "token_id", "tokens_s0", "CASCADE"),
        ("ipfs_upload_records", "token_id", "tokens_s0", "CASCADE"),
        ("reveal_attempts", "reveal_id", "reveal_transactions", "CASCADE"),
        ("tokens_s0", "author_id", "authors", "RESTRICT"),
    ]


def test_models_and_migrations_do_not_drift(postgres_container: Database) -> None:
    engine = create_engine(postgres_container.url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection, opts={"compare_type": True, "target_metadata": metadata}
            )
            assert compare_metadata(context, metadata) == []
    finally:
        engine.dispose()


def _tables_and_types(url: str) -> tuple[set[str], set[str]]:
    with psycopg.connect(**libpq_kwargs(url)) as c:  # type: ignore[arg-type]
        tables = {
            r[0] for r in c.execute("SELECT tablename FROM pg_tables WHERE schemaname='public'")
        }
        types = {r[0] for r in c.execute("SELECT typname FROM pg_type WHERE typtype = 'e'")}
    return tables, types


def test_upgrade_is_idempotent_and_downgrade_upgrade_cycles_cleanly(
    postgres_container: Database,
) -> None:
    with throwaway_database(postgres_container.url) as url:
        started = time.perf_counter()
        migrations.upgrade(url)
        first_upgrade = time.perf_counter() - started
        head = migrations.head_revision()
        assert migrations.current_revision(url) == head
        migrations.upgrade(url)  # already at head: nothing to do, no error
        assert migrations.current_revision(url) == head

        migrations.downgrade(url, "base")
        tables, types = _tables_and_types(url)
        assert tables <= {"alembic_version"}
        assert "token_status_enum" not in types
        assert migrations.current_revision(url) is None

        migrations.upgrade(url)
        tables, types = _tables_and_types(url)
        assert set(EXPECTED_COLUMNS) <= tables
        assert "token_status_enum" in types
    # Printed, not asserted: timing goals live in the benchmarks (bench/), not in tests.
    print(f"alembic upgrade head on an empty database: {first_upgrade * 1000:.0f} ms")


def test_the_token_queue_table_is_vacuumed_early(conn: psycopg.Connection[Any]) -> None:
    row = conn.execute("SELECT reloptions FROM pg_class WHERE relname = 'tokens_s0'").fetchone()
    assert row is not None
    assert "autovacuum_vacuum_scale_factor=0.02" in row[0]
