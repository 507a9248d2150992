from uuid import UUID

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from glisk.models import Author
from glisk.models import validation as v
from glisk.repositories import _args


class AuthorRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get_by_id(self, author_id: UUID) -> Author | None:
        return await self.session.get(Author, author_id)

    async def get_by_wallet(self, address: str) -> Author | None:
        """Case-insensitive; served by the unique index on lower(wallet_address).
        Raises FieldValidationError for a malformed address."""
        v.wallet("address", address)
        result = await self.session.execute(
            select(Author).where(func.lower(col(Author.wallet_address)) == address.lower())
        )
        return result.scalar_one_or_none()

    async def add(self, author: Author) -> Author:
        """Flushes, so a duplicate wallet raises UniqueViolation here, not at commit."""
        self.session.add(author)
        await self.session.flush()
        return author

    async def list_all(self, limit: int = 100, offset: int = 0) -> list[Author]:
        """Newest first (created_at, then id for a stable order); limit 1..1000."""
        _args.limit(limit)
        _args.offset(offset)
        result = await self.session.execute(
            select(Author)
            .order_by(col(Author.created_at).desc(), col(Author.id).desc())
            .limit(limit)
            .offset(offset)
        )
        return list(result.scalars())
