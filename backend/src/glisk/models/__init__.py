"""The seven entities. Importing this package registers every table on ``metadata``."""

from glisk.models.author import Author
from glisk.models.base import metadata
from glisk.models.enums import (
    ImageJobStatus,
    ImageService,
    InvalidStateTransition,
    IPFSRecordType,
    IPFSUploadStatus,
    RevealStatus,
    TokenStatus,
)
from glisk.models.image_job import ImageGenerationJob
from glisk.models.ipfs_record import IPFSUploadRecord
from glisk.models.mint_event import MintConflict, MintEvent, MintLog
from glisk.models.reveal_tx import RevealTransaction
from glisk.models.system_state import SystemState
from glisk.models.token import Token
from glisk.models.validation import FieldValidationError

__all__ = [
    "Author",
    "FieldValidationError",
    "IPFSRecordType",
    "IPFSUploadRecord",
    "IPFSUploadStatus",
    "ImageGenerationJob",
    "ImageJobStatus",
    "ImageService",
    "InvalidStateTransition",
    "MintConflict",
    "MintEvent",
    "MintLog",
    "RevealStatus",
    "RevealTransaction",
    "SystemState",
    "Token",
    "TokenStatus",
    "metadata",
]
