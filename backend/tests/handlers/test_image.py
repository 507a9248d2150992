"""The image stage's handler against the Replicate stand-in, run by a real Worker on the test
database: one prediction per token, resumed rather than paid twice, Retry-After honoured, a
refused prompt failed at once with its reason."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from glisk.handlers.image import ImageStage, PromptRefused, seed_for, validate_prompt
from glisk.handlers.records import Records
from glisk.models import ImageJobStatus, TokenStatus
from glisk.pipeline import STAGES, StageName
from glisk.services.replicate import ReplicateService
from glisk.standins.http_service import RunningStandin, StandinControl
from glisk.uow import UnitOfWorkFactory
from glisk.workers import Worker
from glisk.workers.run import connect_options_of
from tests.support import factories
from tests.support.factories import expire_leases
from tests.support.services import REPLICATE_TOKEN, handler_settings, records_on, replicate_standin
from tests.support.waiting import eventually

IMAGE = STAGES[StageName.IMAGE]
PROMPT = "a lighthouse at dusk, drawn in ink"


@pytest.fixture(scope="module")
def replicate() -> Iterator[tuple[RunningStandin, StandinControl]]:
    with replicate_standin() as running:
        yield running


@pytest.fixture
def control(replicate: tuple[RunningStandin, StandinControl]) -> StandinControl:
    replicate[1].reset()
    return replicate[1]


@pytest.fixture
async def stage(
    tmp_path: Path, uow_factory: UnitOfWorkFactory, control: StandinControl
) -> AsyncIterator[ImageStage]:
    handler = ImageStage(
        handler_settings(tmp_path / "images", replicate_url=control.url), records_on(uow_factory)
    )
    yield handler
    await handler.aclose()


async def _token(uow_factory: UnitOfWorkFactory, prompt: str = PROMPT) -> uuid.UUID:
    async with uow_factory() as uow:
        author = await uow.authors.add(factories.author(prompt_text=prompt))
        token = await uow.tokens.add(factories.token(author.id))
    return token.id


async def _row(uow_factory: UnitOfWorkFactory, token: uuid.UUID) -> Any:
    async with uow_factory() as uow:
        result = await uow.session.execute(
            text("SELECT * FROM tokens_s0 WHERE id = :id"), {"id": token}
        )
        return result.mappings().one()


async def _jobs(uow_factory: UnitOfWorkFactory, token: uuid.UUID) -> list[tuple[str, str | None]]:
    async with uow_factory() as uow:
        jobs = await uow.image_jobs.get_by_token(token)
    return sorted((job.status.value, job.external_job_id) for job in jobs)


def _worker(uow_factory: UnitOfWorkFactory, handler: ImageStage, **options: Any) -> Worker:
    defaults: dict[str, Any] = {
        "lease_seconds": 30,
        "backoff_base": 0,
        "backoff_cap": 0,
        "poll_interval": 0.05,
        "max_attempts": 3,
    }
    return Worker(IMAGE, handler, connect_options_of(uow_factory), **{**defaults, **options})


async def _run(uow_factory: UnitOfWorkFactory, handler: ImageStage, **options: Any) -> Any:
    worker = _worker(uow_factory, handler, **options)
    return await asyncio.wait_for(worker.run(exit_when_idle=True), 30)


def test_the_prompt_limit_is_the_authors_tables() -> None:
    from glisk.handlers import image
    from glisk.models.author import PROMPT_MAX

    assert image.PROMPT_MAX == PROMPT_MAX


def test_a_prompt_is_checked_before_any_call() -> None:
    assert validate_prompt("  two lines\n\tand a tab  ") == "two lines\n\tand a tab"
    for bad, rule in (
        ("", "empty"),
        ("   ", "empty"),
        ("x" * 501, "more than 500"),
        ("a bell\x07 rings", "U+0007"),
        ("escape \x1b[31m", "U+001B"),
    ):
        with pytest.raises(PromptRefused, match=rule.replace("+", r"\+")):
            validate_prompt(bad)


async def test_a_token_gets_one_prediction_and_its_image_stored_under_its_hash(
    uow_factory: UnitOfWorkFactory, stage: ImageStage, control: StandinControl, tmp_path: Path
) -> None:
    token = await _token(uow_factory)
    stats = await _run(uow_factory, stage)
    assert stats.completed == 1
    row = await _row(uow_factory, token)
    path = Path(row["image_path"])
    assert path.parent == tmp_path / "images"
    assert path.name == _sha256_of(path) + ".png"
    report = control.stats()
    assert report["created"] == 1
    (recorded,) = report["by_input"]
    assert f'"seed":{seed_for(token)}' in recorded and PROMPT in recorded
    assert await _jobs(uow_factory, token) == [(ImageJobStatus.COMPLETED.value, report_id(control))]


def _sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def report_id(control: StandinControl) -> str:
    """The id of the one prediction the stand-in holds (read through its list endpoint)."""
    import httpx

    listed = httpx.get(
        f"{control.url}/v1/predictions", headers={"Authorization": f"Bearer {REPLICATE_TOKEN}"}
    ).json()
    (only,) = listed["results"]
    return only["id"]


async def test_a_prompt_that_breaks_a_rule_fails_the_token_without_calling_the_model(
    uow_factory: UnitOfWorkFactory, stage: ImageStage, control: StandinControl
) -> None:
    token = await _token(uow_factory, prompt="a bell\x07 that rings twice")
    stats = await _run(uow_factory, stage)
    assert stats.failed == 1
    row = await _row(uow_factory, token)
    assert row["status"] == TokenStatus.FAILED
    assert "control character U+0007" in row["error_data"]["last_error"]["message"]
    assert control.stats()["requests"].get("create", 0) == 0


async def test_a_prompt_the_model_refuses_fails_permanently_with_its_reason(
    uow_factory: UnitOfWorkFactory, stage: ImageStage, control: StandinControl
) -> None:
    control.configure(refuse_words=["dragon"])
    token = await _token(uow_factory, prompt="a dragon eating the moon")
    stats = await _run(uow_factory, stage)
    assert (stats.failed, stats.completed) == (1, 0)
    row = await _row(uow_factory, token)
    assert row["status"] == TokenStatus.FAILED
    assert row["attempts"] == 1  # not retried
    error = row["error_data"]["last_error"]
    assert error["type"] == "PromptRefused"
    assert "NSFW content detected" in error["message"]
    assert control.stats()["created"] == 1
    assert [status for status, _ in await _jobs(uow_factory, token)] == ["failed"]


async def test_retry_after_is_honoured_and_spends_no_attempt(
    uow_factory: UnitOfWorkFactory, stage: ImageStage, control: StandinControl
) -> None:
    control.configure(script={"create": ["429"]}, retry_after=40)
    token = await _token(uow_factory)
    worker = _worker(uow_factory, stage)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    await eventually(lambda: worker.stats.deferred == 1, 10, "the 429 deferred the token")
    stop.set()
    await asyncio.wait_for(task, 10)
    row = await _row(uow_factory, token)
    assert (row["deferrals"], row["attempts"]) == (1, 0)  # the attempt was given back
    async with uow_factory() as uow:
        wait = (
            await uow.session.execute(
                text(
                    "SELECT extract(epoch FROM not_before - (now() AT TIME ZONE 'utc')) "
                    "FROM tokens_s0 WHERE id = :id"
                ),
                {"id": token},
            )
        ).scalar_one()
    assert 35 < wait <= 40  # the Retry-After the service sent, not a backoff of ours
    assert control.stats()["created"] == 0


async def test_a_create_whose_reply_was_lost_is_adopted_not_paid_twice(
    uow_factory: UnitOfWorkFactory, stage: ImageStage, control: StandinControl
) -> None:
    control.configure(script={"create": ["lost"]})
    token = await _token(uow_factory)
    stats = await _run(uow_factory, stage)
    assert stats.completed == 1
    report = control.stats()
    assert (report["created"], report["lost_replies"]) == (1, 1)
    assert await _jobs(uow_factory, token) == [("completed", report_id(control))]


@pytest.mark.parametrize("recorded", ["prediction id", "intent only"])
async def test_a_rescuer_resumes_the_prediction_the_dead_holder_started(
    uow_factory: UnitOfWorkFactory, stage: ImageStage, control: StandinControl, recorded: str
) -> None:
    # The dead holder: claimed, checkpointed its intent, created the prediction, and (for
    # "prediction id") checkpointed its id too; then its lease ran out.
    token = await _token(uow_factory)
    async with uow_factory() as uow:
        (claim,) = (
            await uow.leases.claim(IMAGE, "dead", batch=1, lease_seconds=60, max_attempts=3)
        ).claims
    job = str(uuid.uuid4())
    intent = {"prompt": PROMPT, "seed": seed_for(token)}
    state: dict[str, Any] = {"job": job, "input": intent, "since": datetime.now(UTC).isoformat()}
    service = ReplicateService(api_token=REPLICATE_TOKEN, model="a/b", base_url=control.url)
    created = await service.create(intent)
    await service.aclose()
    if recorded == "prediction id":
        state |= {"prediction": created.id, "created": created.created_at.timestamp()}  # type: ignore[union-attr]
    async with uow_factory() as uow:
        assert await uow.leases.checkpoint([claim], {"replicate": state})
    await expire_leases(uow_factory, token)

    # A short lease: with only the intent recorded the rescuer waits half of one before it looks.
    stats = await _run(uow_factory, stage, lease_seconds=2)
    assert (stats.rescued, stats.completed) == (1, 1)
    assert control.stats()["created"] == 1  # resumed, not paid again
    assert await _jobs(uow_factory, token) == [("completed", created.id)]


class _PausedBeforeWriting(httpx.AsyncBaseTransport):
    """Carries the API's requests; the first create stops the whole process (the event loop is
    blocked: no heartbeat runs) after the call began and before its request is written, as a
    SIGSTOP landing during the connection's set-up would."""

    def __init__(self, pause: float, paused: threading.Event) -> None:
        self._real = httpx.AsyncHTTPTransport()
        self._pause = pause
        self._paused = paused

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and not self._paused.is_set():
            self._paused.set()
            time.sleep(self._pause)  # noqa: ASYNC251 - the pause: nothing in this process runs
        return await self._real.handle_async_request(request)

    async def aclose(self) -> None:
        await self._real.aclose()


class _PausingStage(ImageStage):
    def __init__(self, settings: Any, records: Any, transport: httpx.AsyncBaseTransport) -> None:
        super().__init__(settings, records)
        self._transport = transport

    def _service(self, settings: Any) -> ReplicateService:
        return ReplicateService(
            api_token=REPLICATE_TOKEN,
            model=settings.replicate_model,
            base_url=settings.replicate_base_url,
            transport=self._transport,
        )


async def test_a_holder_paused_inside_its_create_call_never_sends_it_once_a_rescuer_may(
    uow_factory: UnitOfWorkFactory, control: StandinControl, tmp_path: Path
) -> None:
    # The holder checkpoints its intent and calls create; the process stops before the request
    # is written, for longer than its lease. Another worker rescues the token, waits for a
    # create the holder could have sent, finds none and creates the prediction. When the holder
    # wakes its request must not go out: the lease is checked on the wire, not at the call.
    lease, pause = 1.0, 3.2
    settings = handler_settings(tmp_path / "images", replicate_url=control.url)
    paused = threading.Event()
    holder = _PausingStage(settings, records_on(uow_factory), _PausedBeforeWriting(pause, paused))
    token = await _token(uow_factory)
    options = connect_options_of(uow_factory)

    def rescue() -> Any:
        async def run() -> Any:
            rescuer = ImageStage(settings, Records(options))
            try:
                worker = Worker(IMAGE, rescuer, options, lease_seconds=lease, poll_interval=0.05)
                return await asyncio.wait_for(worker.run(exit_when_idle=True), 20)
            finally:
                await rescuer.aclose()

        assert paused.wait(20), "the holder never reached its create"
        time.sleep(lease + 0.2)  # the holder's lease has run out: the token is claimable
        return asyncio.run(run())

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        rescued = pool.submit(rescue)
        try:
            await _run(uow_factory, holder, lease_seconds=lease)
        finally:
            await holder.aclose()
        stats = await asyncio.wrap_future(rescued)
    assert (stats.rescued, stats.completed) == (1, 1)
    assert control.stats()["created"] == 1  # the rescuer's; the woken holder sent nothing
    assert (await _row(uow_factory, token))["image_path"]
    assert [status for status, _ in await _jobs(uow_factory, token)] == ["completed"]


async def test_a_prediction_past_its_timeout_is_canceled_and_the_next_attempt_makes_another(
    uow_factory: UnitOfWorkFactory, control: StandinControl, tmp_path: Path
) -> None:
    control.configure(script={"create": ["slow"]}, slow_seconds=60)
    settings = handler_settings(
        tmp_path / "images", replicate_url=control.url, replicate_prediction_timeout=0.3
    )
    handler = ImageStage(settings, records_on(uow_factory))
    token = await _token(uow_factory)
    try:
        stats = await _run(uow_factory, handler)
    finally:
        await handler.aclose()
    assert (stats.failed, stats.completed) == (1, 1)
    report = control.stats()
    assert report["created"] == 2
    assert report["by_status"] == {"canceled": 1, "succeeded": 1}
    assert [status for status, _ in await _jobs(uow_factory, token)] == ["completed", "failed"]


@pytest.mark.slow  # a glisk worker process per case
@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "REPLICATE_API_TOKEN: is required by this stage's handler"),
        (
            {"REPLICATE_API_TOKEN": "r8_secret_value", "REPLICATE_MODEL": "no-slash"},
            "REPLICATE_MODEL: must be owner/name",
        ),
    ],
)
def test_the_worker_refuses_to_start_without_its_settings(
    env: dict[str, str], message: str
) -> None:
    import subprocess

    from tests.support.processes import GLISK, glisk_env

    result = subprocess.run(
        [*GLISK, "worker", "image", "--handler", "glisk.handlers.image:generate"],
        env=glisk_env("REPLICATE_*", **env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "r8_secret_value" not in result.stdout + result.stderr
