"""The upload stage's handler against the Pinata stand-in (whose CIDs Helia computes), run by a
real Worker on the test database: every CID known before pinning, a lost reply resumed without a
second pin, a pin under another CID refused."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from glisk.handlers.upload import UploadStage, metadata_document
from glisk.ipfs.unixfs import file_cid
from glisk.models import TokenStatus
from glisk.pipeline import STAGES, StageName
from glisk.standins.http_service import RunningStandin, StandinControl
from glisk.standins.png import render_png
from glisk.uow import UnitOfWorkFactory
from glisk.workers import Worker
from glisk.workers.run import connect_options_of
from tests.support import factories
from tests.support.services import handler_settings, pinata_standin, records_on

UPLOAD = STAGES[StageName.UPLOAD]
PROMPT = "a lighthouse at dusk, drawn in ink"


@pytest.fixture(scope="module")
def pinata() -> Iterator[tuple[RunningStandin, StandinControl]]:
    with pinata_standin() as running:
        yield running


@pytest.fixture
def control(pinata: tuple[RunningStandin, StandinControl]) -> StandinControl:
    pinata[1].reset()
    return pinata[1]


@pytest.fixture
async def stage(
    tmp_path: Path, uow_factory: UnitOfWorkFactory, control: StandinControl
) -> AsyncIterator[UploadStage]:
    handler = UploadStage(
        handler_settings(tmp_path, pinata_url=control.url), records_on(uow_factory)
    )
    yield handler
    await handler.aclose()


async def _token(uow_factory: UnitOfWorkFactory, image: Path) -> tuple[uuid.UUID, str]:
    """A token as the image stage leaves it (generating, with its image); its id and wallet."""
    async with uow_factory() as uow:
        author = await uow.authors.add(factories.author(prompt_text=PROMPT))
        token = await uow.tokens.add(
            factories.token(author.id, status=TokenStatus.GENERATING, image_path=str(image))
        )
    return token.id, author.wallet_address


def _image(tmp_path: Path, extra: int = 0) -> Path:
    """A PNG, followed by ``extra`` bytes that do not compress (an image over 256 KiB)."""
    path = tmp_path / "image.png"
    noise = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(extra // 32 + 1))
    path.write_bytes(render_png(b"an image", 64) + noise[:extra])
    return path


def _gateway(control: StandinControl, cid: str) -> httpx.Response:
    """GET /ipfs/CID from the stand-in (blocking: a test's one read)."""
    return httpx.get(f"{control.url}/ipfs/{cid}")


async def _run(uow_factory: UnitOfWorkFactory, handler: UploadStage) -> Any:
    worker = Worker(
        UPLOAD,
        handler,
        connect_options_of(uow_factory),
        lease_seconds=30,
        backoff_base=0,
        backoff_cap=0,
        poll_interval=0.05,
        max_attempts=3,
    )
    return await asyncio.wait_for(worker.run(exit_when_idle=True), 30)


async def _row(uow_factory: UnitOfWorkFactory, token: uuid.UUID) -> Any:
    async with uow_factory() as uow:
        result = await uow.session.execute(
            text("SELECT * FROM tokens_s0 WHERE id = :id"), {"id": token}
        )
        return result.mappings().one()


async def _records(uow_factory: UnitOfWorkFactory, token: uuid.UUID) -> dict[str, Any]:
    async with uow_factory() as uow:
        records = await uow.ipfs_records.get_by_token(token)
    return {r.record_type.value: (r.status.value, r.cid, r.error_data) for r in records}


async def test_the_image_and_its_metadata_are_pinned_under_the_cids_computed_before(
    uow_factory: UnitOfWorkFactory, stage: UploadStage, control: StandinControl, tmp_path: Path
) -> None:
    image = _image(tmp_path, extra=300_000)  # over 256 KiB: a dag-pb root, not a single leaf
    token, wallet = await _token(uow_factory, image)
    stats = await _run(uow_factory, stage)
    assert stats.completed == 1
    row = await _row(uow_factory, token)
    image_cid = file_cid(image.read_bytes())
    assert image_cid.startswith("bafybei")
    expected = metadata_document(row["token_id"], image_cid, wallet, PROMPT)
    assert row["status"] == TokenStatus.READY
    assert row["metadata_cid"] == file_cid(expected)
    # Fetched back from the service: ERC-721 JSON pointing at the image, the image's bytes.
    metadata = _gateway(control, row["metadata_cid"]).json()
    assert metadata == {
        "name": f"GLISK #{row['token_id']}",
        "description": PROMPT,
        "image": f"ipfs://{image_cid}",
        "attributes": [{"trait_type": "Author", "value": wallet}],
    }
    assert _gateway(control, image_cid).content == image.read_bytes()
    assert await _records(uow_factory, token) == {
        "image": ("completed", image_cid, None),
        "metadata": ("completed", row["metadata_cid"], None),
    }
    assert control.stats()["uploads_by_cid"] == {image_cid: 1, row["metadata_cid"]: 1}


async def test_a_lost_reply_after_a_pin_is_resumed_without_a_second_distinct_pin(
    uow_factory: UnitOfWorkFactory, stage: UploadStage, control: StandinControl, tmp_path: Path
) -> None:
    control.configure(script={"pin": ["lost"]})  # the image is pinned, the reply cut
    image = _image(tmp_path)
    token, _ = await _token(uow_factory, image)
    stats = await _run(uow_factory, stage)
    assert stats.completed == 1
    report = control.stats()
    image_cid = file_cid(image.read_bytes())
    metadata_cid = (await _row(uow_factory, token))["metadata_cid"]
    assert report["lost_replies"] == 1
    assert report["pinned"] == 2  # the image and the metadata, once each
    assert report["uploads_by_cid"] == {image_cid: 2, metadata_cid: 1}
    assert report["duplicates"] == 1  # the image again: isDuplicate


async def test_a_pin_under_another_cid_is_refused_and_the_token_does_not_become_ready(
    uow_factory: UnitOfWorkFactory, stage: UploadStage, control: StandinControl, tmp_path: Path
) -> None:
    control.configure(script={"pin": ["wrong_cid"]})  # the service pins the image as CIDv0
    image = _image(tmp_path)
    token, _ = await _token(uow_factory, image)
    stats = await _run(uow_factory, stage)
    assert (stats.failed, stats.completed) == (1, 0)
    row = await _row(uow_factory, token)
    assert row["status"] == TokenStatus.FAILED and row["metadata_cid"] is None
    image_cid = file_cid(image.read_bytes())
    error = row["error_data"]["last_error"]
    assert error["type"] == "CIDMismatch"
    assert image_cid in error["message"] and "pinned as Qm" in error["message"]
    records = await _records(uow_factory, token)
    status, cid, detail = records["image"]
    assert (status, cid, detail["expected"]) == ("failed", image_cid, image_cid)
    assert detail["pinned"].startswith("Qm")
    assert records["metadata"][0] == "uploading"  # never pinned
    assert control.stats()["pin_requests"] == 1


async def test_a_rate_limited_pin_comes_back_after_retry_after(
    uow_factory: UnitOfWorkFactory, stage: UploadStage, control: StandinControl, tmp_path: Path
) -> None:
    control.configure(script={"pin": ["429"]}, retry_after=0.2)
    token, _ = await _token(uow_factory, _image(tmp_path))
    stats = await _run(uow_factory, stage)
    assert (stats.deferred, stats.completed) == (1, 1)
    row = await _row(uow_factory, token)
    assert row["status"] == TokenStatus.READY
    assert control.stats()["pin_requests"] == 3  # the 429, then the image and the metadata


def test_metadata_bytes_are_canonical() -> None:
    document = metadata_document(7, "bafkreiabc", "0x" + "ab" * 20, "un phare, à l'aube")
    assert document == json.dumps(
        json.loads(document), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")
    assert "à".encode() in document
