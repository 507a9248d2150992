"""Closed value sets and the state-machine error.

Each set is stored as its string value; the database enforces the same sets (a native enum for
token status, CHECK constraints for the others), so the two cannot drift apart unnoticed.
"""

from enum import StrEnum


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


class InvalidStateTransition(Exception):
    """A token status change that the state machine does not allow.

    ``current`` is the token's status, ``target`` the status asked for, ``required`` the states it
    could have been in for that change.
    """

    def __init__(
        self,
        current: TokenStatus,
        target: TokenStatus,
        required: tuple[TokenStatus, ...],
        message: str | None = None,
    ) -> None:
        self.current = current
        self.target = target
        self.required = required
        if message is None:
            if len(required) == 1:
                need = f"'{required[0]}' state"
            else:
                need = "one of " + ", ".join(f"'{s}'" for s in required) + " states"
            message = f"Cannot transition from '{current}' to '{target}'. Token must be in {need}."
        super().__init__(message)
