from datetime import datetime
from typing import Any
from uuid import UUID, uuid4

from sqlalchemy import CheckConstraint, Column, ForeignKey, Index, String
from sqlalchemy.orm import validates
from sqlmodel import Field

from glisk.models import validation as v
from glisk.models._columns import (
    closed_set_column,
    created_at_field,
    error_data_field,
    in_set_check,
    optional_timestamp_field,
    retry_count_field,
)
from glisk.models.base import Entity
from glisk.models.enums import ImageJobStatus, ImageService


class ImageGenerationJob(Entity, table=True):
    """One attempt to generate a token's image at an external or self-hosted service."""

    __tablename__ = "image_generation_jobs"  # pyright: ignore[reportAssignmentType]
    __table_args__ = (
        in_set_check("service", ImageService),
        in_set_check("status", ImageJobStatus),
        CheckConstraint("retry_count >= 0", name="retry_count_non_negative"),
        Index("ix_image_generation_jobs_service_status", "service", "status"),
    )

    id: UUID = Field(default_factory=uuid4, primary_key=True)
    token_id: UUID = Field(
        sa_column=Column(ForeignKey("tokens_s0.id", ondelete="CASCADE"), nullable=False, index=True)
    )
    service: ImageService = Field(sa_column=closed_set_column(ImageService))
    status: ImageJobStatus = Field(
        default=ImageJobStatus.PENDING,
        sa_column=closed_set_column(ImageJobStatus, default=ImageJobStatus.PENDING),
    )
    external_job_id: str | None = Field(default=None, sa_column=Column(String(255), nullable=True))
    retry_count: int = retry_count_field()
    error_data: dict[str, Any] | None = error_data_field()
    created_at: datetime = created_at_field()
    completed_at: datetime | None = optional_timestamp_field()

    @validates("service")
    def _service(self, key: str, value: Any) -> ImageService:
        return v.one_of(key, value, ImageService)

    @validates("status")
    def _status(self, key: str, value: Any) -> ImageJobStatus:
        return v.one_of(key, value, ImageJobStatus)

    @validates("retry_count")
    def _retry_count(self, key: str, value: Any) -> int:
        return v.int_at_least(key, value, 0)
