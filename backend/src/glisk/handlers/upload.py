"""The upload stage against Pinata: the image, then its ERC-721 metadata, each pinned under the
CID computed for it before pinning.

    glisk worker upload --handler glisk.handlers.upload:upload

Settings: PINATA_JWT (required), PINATA_API_URL, PINATA_HTTP_TIMEOUT.

For each token:

1. The image (``claim.image_path``, written by the image stage) is read and its CID computed
   locally (``glisk.ipfs.unixfs``: what IPFS gives the file with CIDv1). The metadata document
   is built (``metadata_document``: ``name``, ``description`` (the prompt), ``image:
   ipfs://<image CID>``, ``attributes``), as canonical JSON bytes (sorted keys, no spaces,
   UTF-8), and its CID computed the same way: both are known before anything is sent.
2. Both CIDs, the metadata's exact bytes and a record id for each are checkpointed (fenced by the
   lease) and recorded in ``ipfs_upload_records`` (uploading, with the CID).
3. The image is pinned, then the metadata, each as a file (``pinFileToIPFS``, CIDv1). A pin that
   comes back under another CID is refused: the record fails with both CIDs and the token fails
   (``CIDMismatch``, a PermanentError), never moving on to ``ready``. A pinned part is
   checkpointed and its record completed.
4. The result is the metadata CID.

A rescuer takes the checkpoint as it finds it: the same bytes, the same CIDs, the parts already
pinned skipped. Pinning the same bytes again (a reply lost after the pin, a worker killed before
its checkpoint) is harmless: Pinata answers ``isDuplicate`` and no second pin exists. A lost
reply is retried twice at once; then the attempt fails and the next one carries on. HTTP 429
-> RetryLater(Retry-After); a file Pinata refuses (400, 413) -> PermanentError.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import structlog

from glisk.errors import (
    CIDMismatch,
    PermanentError,
    ServiceRefused,
    ServiceUnavailable,
)
from glisk.handlers.records import UploadStatus
from glisk.handlers.stage import Parts, ServiceStage
from glisk.workers.checkpoints import checkpoint
from glisk.workers.claims import Claim

if TYPE_CHECKING:
    from glisk.core.config import Settings
    from glisk.services.pinata import PinataService

log = structlog.get_logger("glisk.handlers.upload")

COLLECTION = "GLISK"
# A lost reply or a 5xx while pinning is tried again this many times, after these pauses.
PIN_RETRY_DELAYS = (0.2, 1.0)
Part = Literal["image", "metadata"]
PARTS: tuple[Part, ...] = ("image", "metadata")
CONTENT_TYPES = {".png": "image/png", ".webp": "image/webp", ".jpg": "image/jpeg"}


def metadata_document(token_id: int, image_cid: str, wallet: str, prompt: str) -> bytes:
    """The token's ERC-721 metadata JSON as canonical bytes (sorted keys, no whitespace, UTF-8):
    the same token, image and author always give the same bytes, hence the same CID."""
    document: dict[str, Any] = {
        "name": f"{COLLECTION} #{token_id}",
        "description": prompt,
        "image": f"ipfs://{image_cid}",
        "attributes": [{"trait_type": "Author", "value": wallet}],
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class UploadStage(ServiceStage["PinataService"]):
    """The upload stage's handler; ``upload`` below is the one ``glisk worker`` runs."""

    secret_setting = "pinata_jwt"  # noqa: S105 - the setting's name, not its value

    def _service(self, settings: Settings) -> PinataService:
        from glisk.services.pinata import PinataService

        return PinataService(
            jwt=settings.require_secret(self.secret_setting),
            api_url=settings.pinata_api_url,
            timeout=settings.pinata_http_timeout,
        )

    async def _run(self, claim: Claim, parts: Parts[PinataService]) -> str:
        try:
            return await _Upload(claim, parts).run()
        except ServiceRefused as exc:
            raise PermanentError(f"the pinning service refused the file: {exc}") from exc


class _Upload:
    def __init__(self, claim: Claim, parts: Parts[PinataService]) -> None:
        self.claim = claim
        self.service = parts.service
        self.records = parts.records
        self.state: dict[str, Any] = dict((claim.checkpoint or {}).get("pinata") or {})

    async def run(self) -> str:
        if self.claim.image_path is None:  # the upload stage only claims tokens with an image
            raise PermanentError("the token has no image to upload")
        image_path = Path(self.claim.image_path)
        try:
            image = await asyncio.to_thread(image_path.read_bytes)
        except FileNotFoundError as exc:
            raise PermanentError(f"the image is not at {image_path}") from exc
        image_cid = await asyncio.to_thread(_cid, image)
        if self.state.get("image", {}).get("cid") != image_cid:
            await self._plan(image_cid)
        document = self.state["metadata"]["document"].encode()
        parts: tuple[tuple[Part, bytes, str, str], ...] = (
            ("image", image, image_path.name, _content_type(image_path)),
            ("metadata", document, f"{self.claim.token_id}.json", "application/json"),
        )
        for kind, data, name, content_type in parts:
            await self._pin(kind, data, name, content_type)
        return str(self.state["metadata"]["cid"])

    async def _plan(self, image_cid: str) -> None:
        """Compute the metadata and both CIDs, checkpoint them with new record ids, and record
        both uploads (before anything is pinned)."""
        author = await self.records.author(self.claim.author_id)
        document = metadata_document(self.claim.token_id, image_cid, author.wallet, author.prompt)
        self.state = {
            "image": {"record": str(uuid.uuid4()), "cid": image_cid, "pinned": False},
            "metadata": {
                "record": str(uuid.uuid4()),
                "cid": await asyncio.to_thread(_cid, document),
                "document": document.decode(),
                "pinned": False,
            },
        }
        await checkpoint(self.claim, {"pinata": self.state})
        for kind in PARTS:
            await self._record(kind, "uploading")

    async def _record(
        self, kind: Part, status: UploadStatus, error: dict[str, Any] | None = None
    ) -> None:
        part = self.state[kind]
        await self.records.upload(
            uuid.UUID(part["record"]), self.claim.token_uuid, kind, part["cid"], status, error=error
        )

    async def _pin(self, kind: Part, data: bytes, name: str, content_type: str) -> None:
        part = self.state[kind]
        if part["pinned"]:
            # Pinned and checkpointed by an earlier holder, which may have died before it
            # completed the record: completing it again is an idempotent upsert.
            await self._record(kind, "completed")
            return
        keyvalues = {"token_id": str(self.claim.token_id), "part": kind}
        for delay in (*PIN_RETRY_DELAYS, None):
            try:
                pinned = await self.service.pin_file(
                    data, name=name, content_type=content_type, keyvalues=keyvalues
                )
                break
            except ServiceUnavailable:
                if delay is None:
                    raise
                await asyncio.sleep(delay)
        else:  # pragma: no cover - the loop always breaks or raises
            raise AssertionError("unreachable")
        if pinned.cid != part["cid"]:
            error = {"expected": part["cid"], "pinned": pinned.cid}
            await self._record(kind, "failed", error)
            log.error("upload.cid_mismatch", token_id=self.claim.token_id, part=kind, **error)
            raise CIDMismatch(part["cid"], pinned.cid)
        part["pinned"] = True
        await checkpoint(self.claim, {"pinata": self.state})
        await self._record(kind, "completed")
        log.debug(
            "upload.pinned",
            token_id=self.claim.token_id,
            part=kind,
            duplicate=pinned.duplicate,
        )


def _cid(data: bytes) -> str:
    from glisk.ipfs.unixfs import file_cid

    return file_cid(data)


def _content_type(path: Path) -> str:
    return CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")


upload = UploadStage()
