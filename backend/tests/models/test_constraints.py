# These tests hand the models deliberately wrong values, strings where enums are declared.
# pyright: reportArgumentType=false
"""Every rule holds twice: the database refuses bad rows from raw SQL, and the models refuse them
before a write with a message naming the field and the rule."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg import errors

from glisk.models import (
    FieldValidationError,
    ImageGenerationJob,
    IPFSUploadRecord,
    MintEvent,
    RevealTransaction,
    SystemState,
    TokenStatus,
)
from glisk.testing import libpq_kwargs
from glisk.uow import UnitOfWorkFactory
from tests.support import factories
from tests.support.database import Database
from tests.support.factories import BASE_TIME

HASH = "0x" + "ab" * 32
WALLET = "0x" + "Ab" * 20

SETUP = f"""
INSERT INTO authors (id, wallet_address, prompt_text, created_at)
VALUES ('00000000-0000-0000-0000-000000000001', '{WALLET}', 'a valid prompt', now());
INSERT INTO tokens_s0 (id, token_id, author_id, minter_address, mint_timestamp, created_at)
VALUES ('00000000-0000-0000-0000-0000000000aa', 1, '00000000-0000-0000-0000-000000000001',
        '{WALLET}', now(), now());
INSERT INTO mint_events (id, tx_hash, log_index, block_number, block_timestamp, token_id,
                         detected_at)
VALUES (gen_random_uuid(), '{HASH}', 0, 10, now(), 1, now());
"""
TOKEN = "'00000000-0000-0000-0000-0000000000aa'"
AUTHOR = "'00000000-0000-0000-0000-000000000001'"


def author_sql(
    wallet: str = "0x" + "cd" * 20, prompt: str = "a valid prompt", twitter: str = "NULL"
) -> str:
    return (
        "INSERT INTO authors (id, wallet_address, prompt_text, twitter_handle, created_at) "
        f"VALUES (gen_random_uuid(), '{wallet}', '{prompt}', {twitter}, now())"
    )


def token_sql(
    status: str = "detected",
    metadata_cid: str = "NULL",
    token_id: int = 2,
    minter: str = WALLET,
    tx: str = "NULL",
) -> str:
    return (
        "INSERT INTO tokens_s0 (id, token_id, author_id, minter_address, status, metadata_cid, "
        "reveal_tx_hash, mint_timestamp, created_at) "
        f"VALUES (gen_random_uuid(), {token_id}, {AUTHOR}, '{minter}', '{status}', "
        f"{metadata_cid}, {tx}, now(), now())"
    )


def event_sql(tx: str = HASH, log_index: int = 1, block: int = 10) -> str:
    return (
        "INSERT INTO mint_events (id, tx_hash, log_index, block_number, block_timestamp, "
        f"token_id, detected_at) VALUES (gen_random_uuid(), '{tx}', {log_index}, {block}, "
        "now(), 1, now())"
    )


def job_sql(service: str = "replicate", status: str = "pending", retry: int = 0) -> str:
    return (
        "INSERT INTO image_generation_jobs (id, token_id, service, status, retry_count, "
        f"created_at) VALUES (gen_random_uuid(), {TOKEN}, '{service}', '{status}', {retry}, now())"
    )


def upload_sql(
    record_type: str = "image", status: str = "pending", cid: str = "NULL", retry: int = 0
) -> str:
    return (
        "INSERT INTO ipfs_upload_records (id, token_id, record_type, status, cid, retry_count, "
        f"created_at) VALUES (gen_random_uuid(), {TOKEN}, '{record_type}', '{status}', {cid}, "
        f"{retry}, now())"
    )


def reveal_sql(
    count: int = 1,
    status: str = "pending",
    tx: str = "NULL",
    block: str = "NULL",
    gas: str = "NULL",
) -> str:
    ids = ",".join("gen_random_uuid()" for _ in range(count))
    array = f"ARRAY[{ids}]::uuid[]" if count else "'{}'::uuid[]"
    return (
        "INSERT INTO reveal_transactions (id, token_ids, status, tx_hash, block_number, "
        f"gas_price_gwei, created_at) VALUES (gen_random_uuid(), {array}, '{status}', {tx}, "
        f"{block}, {gas}, now())"
    )


def state_sql(key: str) -> str:
    return (
        "INSERT INTO system_state (key, state_value, updated_at) "
        f"VALUES ('{key}', '1'::jsonb, now())"
    )


# (statement, expected error class, constraint name or None for a type error)
RAW_SQL_VIOLATIONS = {
    "duplicate wallet in another letter case": (
        author_sql(wallet=WALLET.upper().replace("0X", "0x")),
        errors.UniqueViolation,
        "uq_authors_wallet_address_lower",
    ),
    "malformed wallet": (
        author_sql(wallet="0x123"),
        errors.CheckViolation,
        "ck_authors_wallet_address_format",
    ),
    "prompt too short": (
        author_sql(prompt="short"),
        errors.CheckViolation,
        "ck_authors_prompt_text_length",
    ),
    "prompt too long": (
        author_sql(prompt="x" * 501),
        errors.CheckViolation,
        "ck_authors_prompt_text_length",
    ),
    "twitter handle with @": (
        author_sql(twitter="'@glisk'"),
        errors.CheckViolation,
        "ck_authors_twitter_handle_without_at",
    ),
    "duplicate on-chain token_id": (
        token_sql(token_id=1),
        errors.UniqueViolation,
        "uq_tokens_s0_token_id",
    ),
    "unknown token status": (token_sql(status="pending"), errors.InvalidTextRepresentation, None),
    "ready token without metadata_cid": (
        token_sql(status="ready"),
        errors.CheckViolation,
        "ck_tokens_s0_metadata_cid_required_when_ready",
    ),
    "revealed token without metadata_cid": (
        token_sql(status="revealed"),
        errors.CheckViolation,
        "ck_tokens_s0_metadata_cid_required_when_ready",
    ),
    "malformed minter": (
        token_sql(minter="0xnothex" + "0" * 34),
        errors.CheckViolation,
        "ck_tokens_s0_minter_address_format",
    ),
    "token of a missing author": (
        token_sql().replace(AUTHOR, "'00000000-0000-0000-0000-00000000dead'"),
        errors.ForeignKeyViolation,
        "fk_tokens_s0_author_id_authors",
    ),
    "deleting an author who has tokens": (
        f"DELETE FROM authors WHERE id = {AUTHOR}",
        # PostgreSQL 18 reports ON DELETE RESTRICT as restrict_violation, 15 as foreign_key_violation.
        (errors.RestrictViolation, errors.ForeignKeyViolation),
        "fk_tokens_s0_author_id_authors",
    ),
    "duplicate (tx_hash, log_index)": (
        event_sql(log_index=0),
        errors.UniqueViolation,
        "uq_mint_events_tx_hash_log_index",
    ),
    "uppercase tx_hash (stored lowercase)": (
        event_sql(tx=HASH.upper().replace("0X", "0x")),
        errors.CheckViolation,
        "ck_mint_events_tx_hash_format",
    ),
    "negative log_index": (
        event_sql(log_index=-1),
        errors.CheckViolation,
        "ck_mint_events_log_index_non_negative",
    ),
    "block_number 0": (
        event_sql(block=0),
        errors.CheckViolation,
        "ck_mint_events_block_number_positive",
    ),
    "unknown image service": (
        job_sql(service="dalle"),
        errors.CheckViolation,
        "ck_image_generation_jobs_service_allowed",
    ),
    "unknown job status": (
        job_sql(status="done"),
        errors.CheckViolation,
        "ck_image_generation_jobs_status_allowed",
    ),
    "negative job retry_count": (
        job_sql(retry=-1),
        errors.CheckViolation,
        "ck_image_generation_jobs_retry_count_non_negative",
    ),
    "unknown upload record_type": (
        upload_sql(record_type="video"),
        errors.CheckViolation,
        "ck_ipfs_upload_records_record_type_allowed",
    ),
    "completed upload without cid": (
        upload_sql(status="completed"),
        errors.CheckViolation,
        "ck_ipfs_upload_records_cid_required_when_completed",
    ),
    "negative upload retry_count": (
        upload_sql(retry=-1),
        errors.CheckViolation,
        "ck_ipfs_upload_records_retry_count_non_negative",
    ),
    "reveal of 0 tokens": (
        reveal_sql(count=0),
        errors.CheckViolation,
        "ck_reveal_transactions_token_ids_batch_size",
    ),
    "reveal of 51 tokens": (
        reveal_sql(count=51),
        errors.CheckViolation,
        "ck_reveal_transactions_token_ids_batch_size",
    ),
    "unknown reveal status": (
        reveal_sql(status="mined"),
        errors.CheckViolation,
        "ck_reveal_transactions_status_allowed",
    ),
    "malformed reveal tx_hash": (
        reveal_sql(tx="'0xabc'"),
        errors.CheckViolation,
        "ck_reveal_transactions_tx_hash_format",
    ),
    "negative gas price": (
        reveal_sql(gas="-1"),
        errors.CheckViolation,
        "ck_reveal_transactions_gas_price_non_negative",
    ),
    "gas price beyond NUMERIC(20,9)": (reveal_sql(gas="1e12"), errors.NumericValueOutOfRange, None),
    "state key with a dash": (
        state_sql("last-block"),
        errors.CheckViolation,
        "ck_system_state_key_format",
    ),
}


@pytest.fixture
def raw(postgres_container: Database) -> Iterator[psycopg.Connection[Any]]:
    """A raw psycopg connection inside a transaction holding one author, token and event."""
    with psycopg.connect(**libpq_kwargs(postgres_container.url)) as conn:  # type: ignore[arg-type]
        conn.execute("TRUNCATE authors, tokens_s0, mint_events, system_state CASCADE")
        conn.execute(SETUP)
        yield conn
        conn.rollback()


@pytest.mark.parametrize("case", list(RAW_SQL_VIOLATIONS))
def test_database_refuses_bad_rows_from_raw_sql(raw: psycopg.Connection[Any], case: str) -> None:
    statement, error, constraint = RAW_SQL_VIOLATIONS[case]
    with pytest.raises(error) as info:
        raw.execute(statement)  # type: ignore[arg-type]
    if constraint is not None:
        assert info.value.diag.constraint_name == constraint


def test_the_same_raw_rows_succeed_when_valid(raw: psycopg.Connection[Any]) -> None:
    # Guards the table above: each builder produces an accepted row with its defaults.
    for statement in (
        author_sql(),
        token_sql(),
        token_sql(status="ready", metadata_cid="'m'", token_id=3),
        event_sql(),
        job_sql(),
        upload_sql(status="completed", cid="'bafy'"),
        reveal_sql(count=50, tx=f"'{HASH}'", block="5", gas="12.123456789"),
        state_sql("last_processed_block"),
    ):
        raw.execute(statement)  # type: ignore[arg-type]


MODEL_VIOLATIONS: dict[str, tuple[Callable[[], Any], str]] = {
    "wallet pattern": (
        lambda: factories.author(wallet_address="0x12"),
        "wallet_address: must be 0x followed by 40 hex digits",
    ),
    "prompt length": (
        lambda: factories.author(prompt_text="tiny"),
        "prompt_text: must be 10 to 500 characters",
    ),
    "twitter @": (
        lambda: factories.author(twitter_handle="@me"),
        "twitter_handle: must be given without the leading @",
    ),
    "minter pattern": (
        lambda: factories.token(uuid.uuid4(), minter_address="nope"),
        "minter_address: must be 0x followed by 40 hex digits",
    ),
    "token status": (
        lambda: factories.token(uuid.uuid4(), status="minted"),
        "status: must be one of: detected, generating",
    ),
    "tx hash pattern": (
        lambda: MintEvent(
            tx_hash="0x1", log_index=0, block_number=1, block_timestamp=BASE_TIME, token_id=1
        ),
        "tx_hash: must be 0x followed by 64 hex digits",
    ),
    "log index": (
        lambda: MintEvent(
            tx_hash=HASH, log_index=-1, block_number=1, block_timestamp=BASE_TIME, token_id=1
        ),
        "log_index: must be an integer >= 0",
    ),
    "block number": (
        lambda: MintEvent(
            tx_hash=HASH, log_index=0, block_number=0, block_timestamp=BASE_TIME, token_id=1
        ),
        "block_number: must be an integer >= 1",
    ),
    "image service": (
        lambda: ImageGenerationJob(token_id=uuid.uuid4(), service="dalle"),
        "service: must be one of: replicate, selfhosted",
    ),
    "retry count": (
        lambda: ImageGenerationJob(token_id=uuid.uuid4(), service="replicate", retry_count=-1),
        "retry_count: must be an integer >= 0",
    ),
    "record type": (
        lambda: IPFSUploadRecord(token_id=uuid.uuid4(), record_type="video"),
        "record_type: must be one of: image, metadata",
    ),
    "empty reveal": (
        lambda: RevealTransaction(token_ids=[]),
        "token_ids: must hold 1 to 50 elements",
    ),
    "oversized reveal": (
        lambda: RevealTransaction(token_ids=[uuid.uuid4() for _ in range(51)]),
        "token_ids: must hold 1 to 50 elements",
    ),
    "repeated reveal token": (
        lambda: RevealTransaction(token_ids=[uuid.UUID(int=1)] * 2),
        "token_ids: must not repeat a token",
    ),
    "reveal status": (
        lambda: RevealTransaction(token_ids=[uuid.uuid4()], status="mined"),
        "status: must be one of: pending, sent, confirmed, failed",
    ),
    "gas price": (
        lambda: RevealTransaction(token_ids=[uuid.uuid4()], gas_price_gwei=Decimal("-1")),
        "gas_price_gwei: must be >= 0",
    ),
    "state key": (
        lambda: SystemState(key="bad key!", state_value=1),
        "key: must be 1 to 255 letters, digits or underscores",
    ),
}


@pytest.mark.parametrize("case", list(MODEL_VIOLATIONS))
def test_models_refuse_bad_values_naming_field_and_rule(case: str) -> None:
    build, message = MODEL_VIOLATIONS[case]
    with pytest.raises(FieldValidationError) as info:
        build()
    assert message in str(info.value)


async def test_completed_upload_without_cid_is_refused_by_the_model_at_flush(
    uow_factory: UnitOfWorkFactory,
) -> None:
    with pytest.raises(FieldValidationError, match="cid: is required when status is 'completed'"):
        async with uow_factory() as uow:
            author = await uow.authors.add(factories.author())
            token = await uow.tokens.add(factories.token(author.id))
            await uow.ipfs_records.add(
                IPFSUploadRecord(token_id=token.id, record_type="image", status="completed")
            )


JSON_VALUES: list[Any] = [
    {"nested": {"list": [1, 2.5, {"deep": [True, False, None]}], "empty": {}}},
    ["a", 1, None, {"x": []}],
    {"unicode": 'żółć 🎨 \u2603 "quoted" \\ back', "emoji_key_🔑": "v"},
    {"big": 2**62, "negative": -17, "float": 1.0e-9, "zero": 0},
    12345678,
    "plain string",
    True,
]


@pytest.mark.parametrize("value", JSON_VALUES, ids=lambda v: type(v).__name__)
async def test_jsonb_values_round_trip_unchanged(
    uow_factory: UnitOfWorkFactory, value: Any
) -> None:
    async with uow_factory() as uow:
        await uow.system_state.set_state("roundtrip", value)
        author = await uow.authors.add(factories.author())
        token = await uow.tokens.add(factories.token(author.id))
        token.mark_failed({"payload": value})
    async with uow_factory() as uow:
        assert await uow.system_state.get_state("roundtrip") == value
        loaded = await uow.tokens.get_by_id(token.id)
        assert loaded is not None and loaded.error_data == {"payload": value}
        assert loaded.status == TokenStatus.FAILED
