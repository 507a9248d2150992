"""Unit of work: commit on a clean exit, rollback on an exception, connection always returned,
transaction boundaries logged."""

from __future__ import annotations

import pytest
import structlog
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from glisk.core.database import engine_of
from glisk.models import Author
from glisk.uow import UnitOfWork, UnitOfWorkFactory, create_uow_factory
from tests.support import factories


async def _author_count(uow_factory: UnitOfWorkFactory) -> int:
    async with uow_factory() as uow:
        return (await uow.session.execute(select(func.count()).select_from(Author))).scalar_one()


class Boom(Exception):
    pass


async def test_leaving_the_block_commits_every_repository_in_one_transaction(
    uow_factory: UnitOfWorkFactory,
) -> None:
    async with uow_factory() as uow:
        author = await uow.authors.add(factories.author())
        await uow.tokens.add(factories.token(author.id))
        await uow.system_state.set_state("last_processed_block", 7)
    async with uow_factory() as uow:
        assert await uow.authors.get_by_id(author.id) is not None
        assert len(await uow.tokens.get_by_author(author.id)) == 1
        assert await uow.system_state.get_state("last_processed_block") == 7


async def test_an_exception_rolls_back_everything_and_propagates(
    uow_factory: UnitOfWorkFactory,
) -> None:
    with pytest.raises(Boom):
        async with uow_factory() as uow:
            await uow.authors.add(factories.author())
            await uow.system_state.set_state("last_processed_block", 7)
            raise Boom
    assert await _author_count(uow_factory) == 0
    async with uow_factory() as uow:
        assert await uow.system_state.get_state("last_processed_block") is None


async def test_explicit_commit_keeps_earlier_work_when_a_later_step_fails(
    uow_factory: UnitOfWorkFactory,
) -> None:
    with pytest.raises(Boom):
        async with uow_factory() as uow:
            await uow.authors.add(factories.author())
            await uow.commit()
            await uow.authors.add(factories.author())
            raise Boom
    assert await _author_count(uow_factory) == 1


async def test_explicit_rollback_discards_and_the_block_can_continue(
    uow_factory: UnitOfWorkFactory,
) -> None:
    async with uow_factory() as uow:
        await uow.authors.add(factories.author())
        await uow.rollback()
        await uow.authors.add(factories.author())
    assert await _author_count(uow_factory) == 1


async def test_a_constraint_violation_rolls_back_the_whole_unit_and_is_logged_at_error(
    uow_factory: UnitOfWorkFactory,
) -> None:
    wallet = factories.wallet()
    with structlog.testing.capture_logs() as logs, pytest.raises(IntegrityError):
        async with uow_factory() as uow:
            await uow.authors.add(factories.author(wallet_address=wallet))
            await uow.authors.add(
                factories.author(wallet_address=wallet.upper().replace("0X", "0x"))
            )
    assert await _author_count(uow_factory) == 0
    errors = [entry for entry in logs if entry["log_level"] == "error"]
    assert len(errors) == 1
    assert errors[0]["event"] == "uow.database_error"
    assert "uq_authors_wallet_address_lower" in errors[0]["error"]
    # The log line carries the constraint, never the row's values.
    assert wallet.lower() not in errors[0]["error"].lower()
    assert [e["event"] for e in logs if e["log_level"] == "info"] == ["uow.rollback"]


async def test_commit_and_rollback_are_logged_at_info(uow_factory: UnitOfWorkFactory) -> None:
    with structlog.testing.capture_logs() as logs:
        async with uow_factory() as uow:
            await uow.session.execute(text("SELECT 1"))
        with pytest.raises(Boom):
            async with uow_factory():
                raise Boom
        async with uow_factory() as uow:  # an explicit rollback is the last word: no commit
            await uow.session.execute(text("SELECT 1"))
            await uow.rollback()
    assert [(e["event"], e["log_level"]) for e in logs] == [
        ("uow.commit", "info"),
        ("uow.rollback", "info"),
        ("uow.rollback", "info"),
    ]
    assert (logs[1]["reason"], logs[2]["reason"]) == ("Boom", "explicit")


async def test_the_connection_goes_back_to_the_pool_after_commit_rollback_and_error(
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    uow_factory = create_uow_factory(session_factory)
    pool = engine_of(session_factory).pool
    baseline = pool.checkedout()  # type: ignore[attr-defined]
    async with uow_factory() as uow:
        await uow.session.execute(text("SELECT 1"))
        assert pool.checkedout() == baseline + 1  # type: ignore[attr-defined]
    with pytest.raises(Boom):
        async with uow_factory() as uow:
            await uow.session.execute(text("SELECT 1"))
            raise Boom
    with pytest.raises(Exception, match="division by zero"):
        async with uow_factory() as uow:
            await uow.session.execute(text("SELECT 1/0"))
    assert pool.checkedout() == baseline  # type: ignore[attr-defined]


async def test_a_unit_of_work_is_not_usable_outside_or_twice_at_once(
    uow_factory: UnitOfWorkFactory,
) -> None:
    uow = uow_factory()
    assert isinstance(uow, UnitOfWork)
    with pytest.raises(RuntimeError, match="outside 'async with'"):
        _ = uow.session
    async with uow:
        with pytest.raises(RuntimeError, match="not re-entrant"):
            await uow.__aenter__()


async def test_each_unit_of_work_is_isolated_until_it_commits(
    uow_factory: UnitOfWorkFactory,
) -> None:
    async with uow_factory() as writer:
        author = await writer.authors.add(factories.author())
        async with uow_factory() as reader:
            assert await reader.authors.get_by_id(author.id) is None
    async with uow_factory() as reader:
        assert await reader.authors.get_by_id(author.id) is not None


async def test_a_failed_commit_is_logged_once_with_its_rollback(
    uow_factory: UnitOfWorkFactory,
) -> None:
    # A deferred constraint fails at COMMIT, not at flush: the commit path itself must report it.
    with structlog.testing.capture_logs() as logs, pytest.raises(IntegrityError):
        async with uow_factory() as uow:
            await uow.session.execute(
                text(
                    "CREATE TEMP TABLE deferred_check (v int, CONSTRAINT v_unique UNIQUE (v) "
                    "DEFERRABLE INITIALLY DEFERRED) ON COMMIT DROP"
                )
            )
            await uow.session.execute(text("INSERT INTO deferred_check VALUES (1), (1)"))
            await uow.commit()  # explicit: the failure passes through __aexit__ afterwards
    assert [(e["event"], e.get("during"), e.get("reason")) for e in logs] == [
        ("uow.database_error", "commit", None),
        ("uow.rollback", None, "commit failed"),
    ]
