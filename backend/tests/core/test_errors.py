"""One error hierarchy: everything glisk raises on purpose is a GliskError, and a driver error is
translated once, where glisk meets the driver (SQLAlchemy engines and the worker's connections),
into a named error that carries the constraint, on a real PostgreSQL."""

from __future__ import annotations

import importlib
import inspect
import pickle
import pkgutil
import uuid

import psycopg
import pytest
from sqlalchemy import exc as sa
from sqlalchemy import text

import glisk
from glisk import errors
from glisk.uow import UnitOfWorkFactory
from glisk.workers.connection import ConnectOptions, Link
from tests.support import factories
from tests.support.database import Database
from tests.support.factories import seed_tokens

# Not errors but signals between two pieces of glisk's own code, never raised to a caller.
CONTROL_FLOW = {
    "glisk.cli.serve.Terminated",  # SIGTERM unwinding `glisk serve`: catching GliskError must not stop it
    "glisk.standins.chain.RpcFault",  # the fake node turning a fault into its JSON-RPC reply
}


def _glisk_modules() -> list[str]:
    # glisk.migrations.env runs Alembic's context when imported: only Alembic imports it.
    return [
        info.name
        for info in pkgutil.walk_packages(glisk.__path__, "glisk.")
        if not info.name.startswith("glisk.migrations")
    ]


def test_every_exception_class_glisk_defines_descends_from_glisk_error() -> None:
    strays = []
    for name in _glisk_modules():
        module = importlib.import_module(name)
        for value in vars(module).values():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == name
                and f"{name}.{value.__qualname__}" not in CONTROL_FLOW
                and not issubclass(value, errors.GliskError)
            ):
                strays.append(f"{name}.{value.__qualname__}")
    assert strays == []


def test_old_import_paths_name_the_same_classes() -> None:
    from glisk.core.config import ConfigError
    from glisk.models import FieldValidationError, InvalidStateTransition, MintConflict
    from glisk.workers import LeaseLost, PermanentError, RetryLater

    assert ConfigError is errors.ConfigError
    assert FieldValidationError is errors.FieldValidationError
    assert InvalidStateTransition is errors.InvalidStateTransition
    assert MintConflict is errors.MintConflict
    assert (PermanentError, RetryLater, LeaseLost) == (
        errors.PermanentError,
        errors.RetryLater,
        errors.LeaseLost,
    )


def test_a_bad_argument_is_a_field_validation_error_and_still_a_value_error() -> None:
    with pytest.raises(errors.FieldValidationError, match=r"^seconds: must be >= 0") as info:
        errors.RetryLater(-1)
    assert isinstance(info.value, ValueError)
    assert (info.value.field, info.value.rule) == ("seconds", "must be >= 0")


# --- through a unit of work (SQLAlchemy) ------------------------------------------------------


async def test_a_duplicate_raises_unique_violation_naming_constraint_and_table_not_the_value(
    uow_factory: UnitOfWorkFactory,
) -> None:
    wallet = factories.wallet()
    async with uow_factory() as uow:
        await uow.authors.add(factories.author(wallet_address=wallet))

    with pytest.raises(errors.UniqueViolation) as info:
        async with uow_factory() as uow:
            await uow.authors.add(factories.author(wallet_address=wallet.upper().replace("X", "x")))

    error = info.value
    assert error.constraint == "uq_authors_wallet_address_lower"
    assert error.table == "authors"
    assert error.sqlstate == "23505"
    assert not error.transient
    assert str(error) == (
        'duplicate key value violates unique constraint "uq_authors_wallet_address_lower"'
    )
    assert wallet[2:] not in str(error).lower()
    # Code written against SQLAlchemy keeps working: it is also an IntegrityError.
    assert isinstance(error, sa.IntegrityError)
    assert isinstance(error.orig, psycopg.errors.UniqueViolation)


async def test_a_missing_parent_raises_foreign_key_violation(
    uow_factory: UnitOfWorkFactory,
) -> None:
    with pytest.raises(errors.ForeignKeyViolation) as info:
        async with uow_factory() as uow:
            await uow.tokens.add(factories.token(uuid.uuid4()))

    assert info.value.constraint == "fk_tokens_s0_author_id_authors"
    assert info.value.table == "tokens_s0"


async def test_a_refused_check_and_a_missing_value_are_named(
    uow_factory: UnitOfWorkFactory,
) -> None:
    await seed_tokens(uow_factory, 1)
    with pytest.raises(errors.CheckViolation) as check:
        async with uow_factory() as uow:
            await uow.session.execute(text("UPDATE tokens_s0 SET attempts = -1"))
    assert check.value.constraint == "ck_tokens_s0_attempts_non_negative"

    with pytest.raises(errors.NotNullViolation) as missing:
        async with uow_factory() as uow:
            await uow.session.execute(
                text("INSERT INTO authors (id, prompt_text) VALUES (gen_random_uuid(), 'a cat')")
            )
    assert (missing.value.table, missing.value.column) == ("authors", "wallet_address")


async def test_other_driver_errors_are_database_errors_with_their_sqlstate(
    uow_factory: UnitOfWorkFactory,
) -> None:
    with pytest.raises(errors.DatabaseError) as refused:
        async with uow_factory() as uow:
            await uow.session.execute(text("SELECT 1 / 0"))
    assert (refused.value.sqlstate, str(refused.value)) == ("22012", "division by zero")
    assert not refused.value.transient
    assert isinstance(refused.value, sa.DataError)

    with pytest.raises(errors.DatabaseError) as missing:
        async with uow_factory() as uow:
            await uow.session.execute(text("SELECT * FROM no_such_table"))
    assert missing.value.sqlstate == "42P01"
    assert isinstance(missing.value, sa.ProgrammingError)


async def test_a_connection_killed_mid_transaction_is_transient_and_the_pool_recovers(
    uow_factory: UnitOfWorkFactory,
) -> None:
    with pytest.raises(errors.DatabaseError) as info:
        async with uow_factory() as uow:
            await uow.session.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))

    assert info.value.transient
    assert isinstance(info.value, sa.OperationalError)
    assert info.value.connection_invalidated  # SQLAlchemy's disconnect handling saw it
    async with uow_factory() as uow:
        assert (await uow.session.execute(text("SELECT 1"))).scalar_one() == 1


async def test_a_translated_error_pickles_as_itself(uow_factory: UnitOfWorkFactory) -> None:
    await seed_tokens(uow_factory, 1)
    with pytest.raises(errors.CheckViolation) as info:
        async with uow_factory() as uow:
            await uow.session.execute(text("UPDATE tokens_s0 SET deferrals = -1"))

    # e.g. an error sent back by a process pool
    copy = pickle.loads(pickle.dumps(info.value))  # noqa: S301 (our own bytes)

    assert type(copy) is type(info.value)
    assert copy.constraint == "ck_tokens_s0_deferrals_non_negative"
    assert str(copy) == str(info.value)


# --- through the worker runtime's connections (raw psycopg) -----------------------------------


async def test_the_worker_connection_raises_the_same_named_errors(
    uow_factory: UnitOfWorkFactory, postgres_container: Database
) -> None:
    await seed_tokens(uow_factory, 1)
    link = Link(ConnectOptions(url=postgres_container.url, pooler=postgres_container.pooler))
    try:
        with pytest.raises(errors.CheckViolation) as check:
            await link.fetch("UPDATE tokens_s0 SET attempts = -1", {})
        assert check.value.constraint == "ck_tokens_s0_attempts_non_negative"
        assert isinstance(check.value.__cause__, psycopg.errors.CheckViolation)

        with pytest.raises(errors.DatabaseError) as refused:
            await link.fetch("SELECT 1 / 0", {})
        assert refused.value.sqlstate == "22012"
        assert not isinstance(refused.value, psycopg.Error)

        assert await link.fetch("SELECT 1", {}) == [(1,)]  # the connection is still usable
    finally:
        await link.close()


async def test_a_refused_worker_connection_is_a_transient_database_error(
    postgres_container: Database,
) -> None:
    options = ConnectOptions(url="postgresql://nobody:wrong@127.0.0.1:1/none", connect_timeout=2)

    with pytest.raises(errors.DatabaseError) as info:
        await options.connect()

    assert info.value.transient
    assert "127.0.0.1" in str(info.value)
    assert "wrong" not in str(info.value)
