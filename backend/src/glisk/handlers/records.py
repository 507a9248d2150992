"""What the stage handlers read and record in the database, on the worker runtime's raw psycopg
connection (``glisk.workers.connection.Link``): one connection per process, statements one at a
time, each in its own autocommit transaction. Neither SQLAlchemy nor the ORM is loaded, so a
worker restarted under chaos is claiming again as soon as the runtime is.

Every statement is written whole below. The two records are upserts by id: the id is made when
the handler first intends the effect and kept in the claim's checkpoint, so the handler, a
rescuer and a late holder may write the same record in any order without duplicating it, and a
record that reached ``completed`` or ``failed`` keeps that status.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal
from uuid import UUID

from glisk.errors import PermanentError
from glisk.workers.connection import ConnectOptions, Link

JobStatus = Literal["pending", "running", "completed", "failed"]
UploadStatus = Literal["pending", "uploading", "completed", "failed"]

# author: the token's author (no lock).
AUTHOR = """
SELECT wallet_address, prompt_text FROM authors WHERE id = %(author_id)s
"""

# record_image_job: create the image job or move it forward; a final status is kept, a known
# prediction id never erased. Locks the job's row.
RECORD_IMAGE_JOB = """
INSERT INTO image_generation_jobs AS j
    (id, token_id, service, status, external_job_id, error_data, completed_at)
VALUES (%(id)s, %(token_id)s, %(service)s, CAST(%(status)s AS text), %(external_job_id)s,
        CAST(%(error_data)s AS jsonb),
        CASE WHEN CAST(%(status)s AS text) IN ('completed', 'failed')
             THEN now() AT TIME ZONE 'utc' END)
ON CONFLICT (id) DO UPDATE SET
    status = CASE WHEN j.status IN ('completed', 'failed') THEN j.status ELSE excluded.status END,
    external_job_id = coalesce(excluded.external_job_id, j.external_job_id),
    error_data = coalesce(excluded.error_data, j.error_data),
    completed_at = coalesce(j.completed_at, excluded.completed_at)
"""

# record_upload: create the IPFS upload record or move it forward; a final status keeps its CID.
# Locks the record's row.
RECORD_UPLOAD = """
INSERT INTO ipfs_upload_records AS r
    (id, token_id, record_type, cid, status, error_data, completed_at)
VALUES (%(id)s, %(token_id)s, %(record_type)s, %(cid)s, CAST(%(status)s AS text),
        CAST(%(error_data)s AS jsonb),
        CASE WHEN CAST(%(status)s AS text) IN ('completed', 'failed')
             THEN now() AT TIME ZONE 'utc' END)
ON CONFLICT (id) DO UPDATE SET
    status = CASE WHEN r.status IN ('completed', 'failed') THEN r.status ELSE excluded.status END,
    cid = CASE WHEN r.status IN ('completed', 'failed') THEN r.cid ELSE excluded.cid END,
    error_data = coalesce(excluded.error_data, r.error_data),
    completed_at = coalesce(r.completed_at, excluded.completed_at)
"""


@dataclass(frozen=True)
class Author:
    wallet: str
    prompt: str


class Records:
    """The handlers' database access: ``Records(ConnectOptions(url))``; no I/O until used.

    ``connections`` links, opened as needed: a statement goes to a free one (else the next in
    turn), so handlers running at once commit side by side instead of queueing behind one
    connection's commits."""

    def __init__(self, connect: ConnectOptions, connections: int = 4) -> None:
        self._links = [Link(connect) for _ in range(max(1, connections))]
        self._turn = 0

    @property
    def _link(self) -> Link:
        for link in self._links:
            if not link.lock.locked():
                return link
        self._turn = (self._turn + 1) % len(self._links)
        return self._links[self._turn]

    async def close(self) -> None:
        for link in self._links:
            await link.close()

    async def author(self, author_id: UUID) -> Author:
        """The token's author; PermanentError when it is gone (the token cannot be made)."""
        rows = await self._link.fetch(AUTHOR, {"author_id": author_id})
        if not rows:
            raise PermanentError(f"author {author_id} not found")
        wallet, prompt = rows[0]
        return Author(wallet=wallet, prompt=prompt)

    async def image_job(
        self,
        job_id: UUID,
        token_id: UUID,
        status: JobStatus,
        *,
        prediction_id: str | None = None,
        error: dict[str, Any] | None = None,
    ) -> None:
        """Record the image job ``job_id`` (a Replicate prediction) of ``token_id``."""
        await self._link.fetch(
            RECORD_IMAGE_JOB,
            {
                "id": job_id,
                "token_id": token_id,
                "service": "replicate",
                "status": status,
                "external_job_id": prediction_id,
                "error_data": None if error is None else json.dumps(error),
            },
        )

    async def upload(
        self,
        record_id: UUID,
        token_id: UUID,
        record_type: Literal["image", "metadata"],
        cid: str,
        status: UploadStatus,
        *,
        error: dict[str, Any] | None = None,
    ) -> None:
        """Record the upload ``record_id`` of ``token_id``'s image or metadata under ``cid``."""
        await self._link.fetch(
            RECORD_UPLOAD,
            {
                "id": record_id,
                "token_id": token_id,
                "record_type": record_type,
                "cid": cid,
                "status": status,
                "error_data": None if error is None else json.dumps(error),
            },
        )


def records_for(settings: Any) -> Records:
    """Records on the worker's database (DATABASE_URL, or the embedded server's), following
    DB_POOLER and WORKER_DB_TIMEOUT like the worker's own connections."""
    from glisk.handlers.context import database_url

    return Records(
        ConnectOptions(
            database_url(settings), timeout=settings.worker_db_timeout, pooler=settings.db_pooler
        )
    )
