"""One repository per entity. Each takes the unit of work's AsyncSession, flushes but never
commits, returns model instances (None when not found) and lets database errors propagate."""

from glisk.repositories.author import AuthorRepository
from glisk.repositories.chain_block import ChainBlockRepository
from glisk.repositories.image_job import ImageGenerationJobRepository
from glisk.repositories.ipfs_record import IPFSUploadRecordRepository
from glisk.repositories.mint_event import MintEventRepository
from glisk.repositories.reveal_tx import RevealTransactionRepository
from glisk.repositories.system_state import SystemStateRepository
from glisk.repositories.token import TokenRepository

__all__ = [
    "AuthorRepository",
    "ChainBlockRepository",
    "IPFSUploadRecordRepository",
    "ImageGenerationJobRepository",
    "MintEventRepository",
    "RevealTransactionRepository",
    "SystemStateRepository",
    "TokenRepository",
]
