"""Fixtures: a real, migrated PostgreSQL for the session; empty tables for every test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from glisk import migrations
from glisk.core.database import engine_of, setup_db_session
from glisk.core.timezone import enforce_utc
from glisk.models import metadata
from glisk.uow import UnitOfWorkFactory, create_uow_factory
from tests.support.database import (
    Database,
    pooler_for,
    provide_database,
)

if TYPE_CHECKING:
    # web3 and eth-account take seconds to import: only the chain tests pay for them, in their
    # fixtures (every xdist process imports this file before it runs a test).
    from glisk.chain.anvil import Anvil
    from tests.support.chain import Chain


@pytest.fixture(scope="session", autouse=True)
def utc_timezone() -> None:
    """Every test runs with TZ=UTC, whatever the machine's zone: timestamps are naive UTC."""
    enforce_utc()


@pytest.fixture(scope="session")
def postgres_container() -> Iterator[Database]:
    """A real PostgreSQL with the migrations applied (``alembic upgrade head``), reached through
    a pooler when GLISK_TEST_POOLER_URL is set (tests/support/database.py). An embedded server
    that is not ready within STARTUP_LIMIT_SECONDS (support/database.py) fails to start."""
    with ExitStack() as stack:
        try:
            url = stack.enter_context(provide_database())
            migrations.upgrade(url)
            connect_url, pooler = pooler_for(url)
        except Exception as exc:
            pytest.fail(f"could not start the test PostgreSQL: {exc}", pytrace=False)
        if pooler != "none":  # processes the tests start read it through load_settings()
            stack.enter_context(pytest.MonkeyPatch.context()).setenv("DB_POOLER", pooler)
        # teardown errors surface as themselves
        yield Database(url=connect_url, direct_url=url, pooler=pooler)


@pytest.fixture(scope="session")
async def session_factory(
    postgres_container: Database,
) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    factory = setup_db_session(
        postgres_container.url, pool_size=20, max_overflow=20, pooler=postgres_container.pooler
    )
    yield factory
    await engine_of(factory).dispose()


_TABLES = ", ".join(table.name for table in metadata.sorted_tables)


async def _empty_tables(factory: async_sessionmaker[AsyncSession]) -> None:
    async with factory() as s:
        await s.execute(text(f"TRUNCATE {_TABLES} CASCADE"))
        await s.commit()


@pytest.fixture
async def session(session_factory: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """A session on emptied tables; whatever the test leaves uncommitted is rolled back."""
    await _empty_tables(session_factory)
    async with session_factory() as s:
        yield s
        await s.rollback()


@pytest.fixture
async def emptied_tables(session_factory: async_sessionmaker[AsyncSession]) -> None:
    """Every table of the session's database emptied, for tests that drive it from processes."""
    await _empty_tables(session_factory)


@pytest.fixture
async def uow_factory(session_factory: async_sessionmaker[AsyncSession]) -> UnitOfWorkFactory:
    """The same factory the app's request dependency uses, on emptied tables."""
    await _empty_tables(session_factory)
    return create_uow_factory(session_factory)


@pytest.fixture(scope="module")
def anvil() -> Iterator[Anvil]:
    """One anvil node (automine) for the test module; ``glisk_chain`` isolates each test."""
    from glisk.chain.anvil import Anvil

    with Anvil() as node:
        yield node


@pytest.fixture
async def glisk_chain(anvil: Anvil) -> AsyncIterator[Chain]:
    """A fresh GLISK contract on the module's anvil (tests/support/chain.py), undone after."""
    from tests.support.chain import deployed

    async with deployed(anvil) as chain:
        yield chain
