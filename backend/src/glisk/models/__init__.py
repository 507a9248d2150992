"""The ten entities, their enums and rules.

Entity names (``Token``, ``Author``, ...) and ``metadata`` load every entity module on first use,
which registers every table on ``metadata``. The light names (the enums; FieldValidationError,
InvalidStateTransition and MintConflict, which live in glisk.errors) and the submodules
``enums``, ``validation`` and ``transitions`` load without SQLModel: the worker runtime imports
only those.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from glisk.errors import FieldValidationError, InvalidStateTransition, MintConflict
    from glisk.models.author import Author
    from glisk.models.base import metadata
    from glisk.models.chain_block import ChainBlock
    from glisk.models.enums import (
        ImageJobStatus,
        ImageService,
        IPFSRecordType,
        IPFSUploadStatus,
        RevealStatus,
        TokenStatus,
    )
    from glisk.models.image_job import ImageGenerationJob
    from glisk.models.ipfs_record import IPFSUploadRecord
    from glisk.models.keeper import KeeperNonce, RevealAttempt
    from glisk.models.mint_event import MintEvent, MintLog
    from glisk.models.reveal_tx import RevealTransaction
    from glisk.models.system_state import SystemState
    from glisk.models.token import Token

# Name -> module, for names that load without SQLModel (the errors live in glisk.errors).
_LIGHT = {
    "ImageJobStatus": "glisk.models.enums",
    "ImageService": "glisk.models.enums",
    "IPFSRecordType": "glisk.models.enums",
    "IPFSUploadStatus": "glisk.models.enums",
    "RevealStatus": "glisk.models.enums",
    "TokenStatus": "glisk.models.enums",
    "FieldValidationError": "glisk.errors",
    "InvalidStateTransition": "glisk.errors",
    "MintConflict": "glisk.errors",
}
_ENTITIES = {
    "Author": "author",
    "ChainBlock": "chain_block",
    "ImageGenerationJob": "image_job",
    "IPFSUploadRecord": "ipfs_record",
    "KeeperNonce": "keeper",
    "RevealAttempt": "keeper",
    "MintEvent": "mint_event",
    "MintLog": "mint_event",
    "RevealTransaction": "reveal_tx",
    "SystemState": "system_state",
    "Token": "token",
    "metadata": "base",
}

__all__ = [
    "Author",
    "ChainBlock",
    "FieldValidationError",
    "IPFSRecordType",
    "IPFSUploadRecord",
    "IPFSUploadStatus",
    "ImageGenerationJob",
    "ImageJobStatus",
    "ImageService",
    "InvalidStateTransition",
    "KeeperNonce",
    "MintConflict",
    "MintEvent",
    "MintLog",
    "RevealAttempt",
    "RevealStatus",
    "RevealTransaction",
    "SystemState",
    "Token",
    "TokenStatus",
    "metadata",
]


def __getattr__(name: str) -> Any:
    if name in _LIGHT:
        value = getattr(importlib.import_module(_LIGHT[name]), name)
    elif name in _ENTITIES:
        # Any entity (or the metadata) brings all of them: foreign keys between tables resolve
        # by name on the shared metadata.
        for module in set(_ENTITIES.values()):
            importlib.import_module(f"glisk.models.{module}")
        value = getattr(importlib.import_module(f"glisk.models.{_ENTITIES[name]}"), name)
    else:
        raise AttributeError(f"module 'glisk.models' has no attribute '{name}'")
    globals()[name] = value
    return value
