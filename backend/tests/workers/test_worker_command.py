"""``glisk worker``: one clear line and a supervisor-friendly exit code for every start-up
failure; a real worker process that drains on SIGTERM and exits 0."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from datetime import timedelta

import pytest
from sqlalchemy import text

from glisk.embedded import free_port
from glisk.uow import UnitOfWorkFactory
from tests.support import factories
from tests.support.database import Database
from tests.support.processes import GLISK, glisk_env
from tests.support.waiting import eventually

# End to end (real servers or glisk processes, seconds each): .ci/run runs them in its step
# for slow tests; the default run leaves them out.
pytestmark = pytest.mark.slow


def _worker(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GLISK, "worker", *args],
        capture_output=True,
        text=True,
        env=glisk_env("WORKER_*", **env),
        timeout=60,
    )


@pytest.mark.parametrize(
    ("handler", "message"),
    [
        ("no.such.module:run", "cannot import 'no.such.module'"),
        ("json:no_such_function", "'json' has no attribute 'no_such_function'"),
        ("json:dumps", "must be an async function"),
        ("json", "must be package.module:function"),
    ],
)
def test_a_handler_that_cannot_be_used_is_one_line_and_exit_2(
    postgres_container: Database, handler: str, message: str
) -> None:
    result = _worker("image", "--handler", handler, DATABASE_URL=postgres_container.url)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_a_bad_worker_setting_is_one_line_and_exit_2(postgres_container: Database) -> None:
    result = _worker(
        "reveal", "--handler", "noop", DATABASE_URL=postgres_container.url, WORKER_BATCH="80"
    )
    assert result.returncode == 2
    assert "batch: must be 1 to 50" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_unreachable_database_is_one_line_and_exit_1() -> None:
    result = _worker(
        "image",
        "--handler",
        "noop",
        DATABASE_URL=f"postgresql://glisk:secret@127.0.0.1:{free_port()}/glisk",
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "database unreachable" in lines[0], result.stderr
    assert "secret" not in result.stderr


@pytest.mark.slow
async def test_a_worker_process_drains_the_stage_and_exits_0_on_sigterm(
    uow_factory: UnitOfWorkFactory, postgres_container: Database
) -> None:
    async with uow_factory() as uow:
        author = await uow.authors.add(factories.author())
        uow.session.add_all(
            factories.token(author.id, mint_timestamp=factories.BASE_TIME + timedelta(seconds=i))
            for i in range(40)
        )
    process = subprocess.Popen(  # noqa: ASYNC220 - waited for in a thread below
        [*GLISK, "worker", "image", "--handler", "noop"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=glisk_env("WORKER_*", DATABASE_URL=postgres_container.url, WORKER_CONCURRENCY="8"),
    )
    try:

        async def stage_drained() -> bool:
            async with uow_factory() as uow:
                left = await uow.session.execute(
                    text("SELECT count(*) FROM tokens_s0 WHERE image_path IS NULL")
                )
                return left.scalar_one() == 0

        await eventually(stage_drained, 30, "the worker took the stage's tokens", poll=0.05)
        process.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(process.communicate, timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert "worker.start" in err and "worker.stop" in err
    async with uow_factory() as uow:
        assert await uow.leases.count_claimed() == 0
