from uuid import UUID

from sqlalchemy import Select, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from glisk.models import ImageGenerationJob


class ImageGenerationJobRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, job: ImageGenerationJob) -> ImageGenerationJob:
        self.session.add(job)
        await self.session.flush()
        return job

    async def get_by_id(self, job_id: UUID) -> ImageGenerationJob | None:
        return await self.session.get(ImageGenerationJob, job_id)

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
