"""The stage table (glisk.pipeline) is the one place a stage is declared: a throwaway stage added as
one row, with a handler and the DDL rendered from its row, is claimed, completed, woken, reported
and retried like the built-in ones."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace

import pytest

from glisk import migrations
from glisk.core.database import setup_db_session
from glisk.migrations import stage_ddl
from glisk.models import Token, TokenStatus
from glisk.ops.status import collect
from glisk.ops.tokens import RetryFilter, retry_failed
from glisk.pipeline import STAGES, Stage, StageName, check_stage, resolve_stage
from glisk.testing import connect, throwaway_database
from glisk.uow import UnitOfWorkFactory, create_uow_factory
from glisk.workers import Claim, PermanentError, Worker
from glisk.workers.connection import ConnectOptions
from tests.support import factories
from tests.support.database import Database
from tests.support.waiting import eventually

S = TokenStatus
# A second upload stage: its own name, claim index and NOTIFY channel; the same statuses.
THROWAWAY = replace(STAGES[StageName.UPLOAD], name="upload_v2", feeds=None)


def test_every_stage_row_is_a_legal_path_through_the_state_machine() -> None:
    for stage in STAGES.values():
        check_stage(stage)
        assert callable(getattr(Token, stage.complete_with))
        assert stage.retry_target == stage.claim_from
    check_stage(THROWAWAY)


def test_an_unknown_stage_name_is_one_line_naming_the_choices() -> None:
    with pytest.raises(ValueError, match="stage: must be one of: image, upload, reveal"):
        resolve_stage("thumbnail")


@pytest.fixture
def pipeline_with_throwaway(
    postgres_container: Database, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """A scratch database migrated to head, plus the throwaway stage's DDL rendered from its row;
    the row is in the table while the test runs."""
    with throwaway_database(postgres_container.direct_url) as url:
        migrations.upgrade(url)
        monkeypatch.setitem(STAGES, THROWAWAY.name, THROWAWAY)
        with connect(url) as conn:
            conn.execute(stage_ddl.notify_function(STAGES.values()).encode())
            conn.execute(stage_ddl.claim_index(THROWAWAY).encode())
        yield url


async def _seed(uow_factory: UnitOfWorkFactory, count: int) -> None:
    async with uow_factory() as uow:
        author = await uow.authors.add(factories.author())
        for _ in range(count):
            await uow.tokens.add(
                factories.token(author.id, status=S.GENERATING, image_path="i.png")
            )


async def test_a_throwaway_stage_is_claimed_completed_woken_reported_and_retried(
    pipeline_with_throwaway: str,
) -> None:
    url = pipeline_with_throwaway
    uow_factory = create_uow_factory(setup_db_session(url, pool_size=2))
    seen: list[int] = []

    async def handler(claim: Claim) -> str:
        seen.append(claim.token_id)
        if len(seen) == 1:
            raise PermanentError("the first one fails, for the retry below")
        return f"bafy-{claim.token_id}"

    stop = asyncio.Event()
    worker = Worker(THROWAWAY, handler, ConnectOptions(url), poll_interval=60.0, lease_seconds=5)
    running = asyncio.create_task(worker.run(stop))
    assert worker.listener is not None
    await asyncio.wait_for(worker.listener.listening.wait(), 10)
    await _seed(uow_factory, 3)  # no poll is due for a minute: the insert trigger's NOTIFY wakes it

    def finished() -> bool:
        with connect(url) as conn:
            rows = conn.execute("SELECT status::text, count(*) FROM tokens_s0 GROUP BY 1")
            counts = {str(status): int(str(n)) for status, n in rows}
        return counts == {"ready": 2, "failed": 1}

    await eventually(finished, 20, "the throwaway stage finishing its three tokens", poll=0.05)
    stop.set()
    await running

    with connect(url) as conn:
        report = collect(conn)
        assert THROWAWAY.name in report.stages
        failed = conn.execute(
            "SELECT token_id, error_data ->> 'stage' FROM tokens_s0 WHERE status = 'failed'"
        ).fetchall()
        assert [stage for _, stage in failed] == [THROWAWAY.name]
        outcome = retry_failed(conn, RetryFilter.parse(stage=THROWAWAY.name))
        assert [m.target for m in outcome.moved] == [THROWAWAY.retry_target]
        ready = conn.execute(
            "SELECT count(*) FROM tokens_s0 WHERE status = 'ready' AND metadata_cid LIKE 'bafy-%'"
        ).fetchone()
        assert ready == (2,)
    await uow_factory().session_factory.kw["bind"].dispose()


def test_the_rendered_notify_function_names_every_stage_channel() -> None:
    text = stage_ddl.notify_function([*STAGES.values(), THROWAWAY])
    for stage in [*STAGES.values(), THROWAWAY]:
        assert f"pg_notify('{stage.channel}', '')" in text
        assert stage.fresh in text
    assert isinstance(THROWAWAY, Stage)
