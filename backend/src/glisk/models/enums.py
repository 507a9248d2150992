"""Closed value sets.

Each set is stored as its string value; the database enforces the same sets (a native enum for
token status, CHECK constraints for the others), so the two cannot drift apart unnoticed.
"""

from enum import StrEnum

__all__ = [
    "IPFSRecordType",
    "IPFSUploadStatus",
    "ImageJobStatus",
    "ImageService",
    "RevealStatus",
    "TokenStatus",
]


class TokenStatus(StrEnum):
    DETECTED = "detected"
    GENERATING = "generating"
    UPLOADING = "uploading"
    READY = "ready"
    REVEALED = "revealed"
    FAILED = "failed"


class ImageService(StrEnum):
    REPLICATE = "replicate"
    SELFHOSTED = "selfhosted"


class ImageJobStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


class IPFSRecordType(StrEnum):
    IMAGE = "image"
    METADATA = "metadata"


class IPFSUploadStatus(StrEnum):
    PENDING = "pending"
    UPLOADING = "uploading"
    COMPLETED = "completed"
    FAILED = "failed"


class RevealStatus(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    CONFIRMED = "confirmed"
    FAILED = "failed"
