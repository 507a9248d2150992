from typing import Any
from uuid import UUID

from sqlalchemy import Select, case, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from glisk.core.timezone import utcnow
from glisk.models import ImageGenerationJob, ImageJobStatus, ImageService
from glisk.models import validation as v

_FINAL = (ImageJobStatus.COMPLETED, ImageJobStatus.FAILED)


class ImageGenerationJobRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, job: ImageGenerationJob) -> ImageGenerationJob:
        self.session.add(job)
        await self.session.flush()
        return job

    async def get_by_id(self, job_id: UUID) -> ImageGenerationJob | None:
        return await self.session.get(ImageGenerationJob, job_id)

    async def record(
        self,
        job_id: UUID,
        token_uuid: UUID,
        *,
        service: ImageService | str,
        status: ImageJobStatus | str,
        external_job_id: str | None = None,
        error: dict[str, Any] | None = None,
    ) -> None:
        """Create or move forward the job ``job_id`` in one statement (INSERT ... ON CONFLICT
        (id) DO UPDATE), so a handler and a rescuer may both record the same job in any order:
        a known ``external_job_id`` is never erased, and a job already completed or failed keeps
        that status (a late 'running' does not undo it). ``completed_at`` is set when the status
        becomes completed or failed. No lock beyond the row's."""
        wanted = v.one_of("status", status, ImageJobStatus)
        values: dict[str, Any] = {
            "id": job_id,
            "token_id": token_uuid,
            "service": v.one_of("service", service, ImageService).value,
            "status": wanted.value,
            "external_job_id": v.optional_text("external_job_id", external_job_id, 255),
            "error_data": error,
            "completed_at": utcnow() if wanted in _FINAL else None,
        }
        statement = insert(ImageGenerationJob).values(**values)
        table = ImageGenerationJob.__table__.c  # pyright: ignore[reportAttributeAccessIssue]
        final = table.status.in_([s.value for s in _FINAL])
        statement = statement.on_conflict_do_update(
            index_elements=[table.id],
            set_={
                "status": case((final, table.status), else_=statement.excluded.status),
                "external_job_id": func.coalesce(
                    statement.excluded.external_job_id, table.external_job_id
                ),
                "error_data": func.coalesce(statement.excluded.error_data, table.error_data),
                "completed_at": func.coalesce(table.completed_at, statement.excluded.completed_at),
            },
        )
        await self.session.execute(statement)

    async def get_by_token(self, token_uuid: UUID) -> list[ImageGenerationJob]:
        """Every attempt for the token, newest first."""
        result = await self.session.execute(_newest_first(token_uuid))
        return list(result.scalars())

    async def get_latest_by_token(self, token_uuid: UUID) -> ImageGenerationJob | None:
        result = await self.session.execute(_newest_first(token_uuid).limit(1))
        return result.scalar_one_or_none()


def _newest_first(token_uuid: UUID) -> Select[ImageGenerationJob]:
    return (
        select(ImageGenerationJob)
        .where(col(ImageGenerationJob.token_id) == token_uuid)
        .order_by(col(ImageGenerationJob.created_at).desc(), col(ImageGenerationJob.id).desc())
    )
