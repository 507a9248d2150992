from collections.abc import Sequence

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from glisk.core.timezone import utcnow
from glisk.models import ChainBlock
from glisk.models import validation as v
from glisk.repositories import _args

# Keeps block hashes, replacing what was kept for a number: after a reorg the same number holds
# another block. Rows in ascending number order, so two followers writing the same step wait for
# each other instead of deadlocking. Locks the rows written until the transaction ends.
_KEEP = text(
    """
    INSERT INTO chain_blocks AS b (number, hash, recorded_at)
    SELECT n, h, :now
    FROM unnest(CAST(:numbers AS integer[]), CAST(:hashes AS text[])) AS k(n, h)
    ORDER BY n
    ON CONFLICT (number) DO UPDATE SET hash = excluded.hash, recorded_at = excluded.recorded_at
    WHERE b.hash <> excluded.hash
    """
)

# Forgets the blocks below the window, keeping the newest one at or below :keep_from as the
# anchor: the window then spans at least that deep whatever the step sizes were.
_PRUNE = text(
    """
    DELETE FROM chain_blocks
    WHERE number < (SELECT max(number) FROM chain_blocks WHERE number <= :keep_from)
    """
)


class ChainBlockRepository:
    """The follower's window of consumed block hashes (``chain_blocks``)."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def newest(self, limit: int = 1000, *, below: int | None = None) -> list[ChainBlock]:
        """Kept blocks, highest number first, at most ``limit`` (1 to 100,000); only those with
        a number below ``below`` when given. No locking."""
        _args.limit(limit, maximum=100_000)
        statement = select(ChainBlock).order_by(col(ChainBlock.number).desc()).limit(limit)
        if below is not None:
            statement = statement.where(col(ChainBlock.number) < below)
        return list((await self.session.execute(statement)).scalars())

    async def floor(self) -> int | None:
        """The lowest kept number, or None when nothing is kept. No locking."""
        return (await self.session.execute(select(func.min(col(ChainBlock.number))))).scalar()

    async def keep(self, blocks: Sequence[tuple[int, str]]) -> None:
        """Store (number, hash) pairs, replacing the hash kept for a number. Raises
        FieldValidationError for a negative number or a malformed hash, before any SQL."""
        if not blocks:
            return
        pairs = sorted(
            {v.int_at_least("number", n, 0): v.tx_hash("hash", h) for n, h in blocks}.items()
        )
        await self.session.execute(
            _KEEP,
            {"numbers": [n for n, _ in pairs], "hashes": [h for _, h in pairs], "now": utcnow()},
        )

    async def forget_above(self, number: int) -> int:
        """Drop the blocks kept above ``number`` (a reorg orphaned them, or the operator moved
        the cursor back); how many."""
        v.int_at_least("number", number, 0)
        result = await self.session.execute(
            text("DELETE FROM chain_blocks WHERE number > :number"), {"number": number}
        )
        return int(getattr(result, "rowcount", 0) or 0)

    async def prune(self, keep_from: int) -> int:
        """Drop the blocks below ``keep_from`` except the newest of them (the window's anchor);
        how many."""
        result = await self.session.execute(_PRUNE, {"keep_from": keep_from})
        return int(getattr(result, "rowcount", 0) or 0)
