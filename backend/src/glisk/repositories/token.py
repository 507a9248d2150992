from uuid import UUID

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from glisk.models import Token, TokenStatus
from glisk.models import validation as v
from glisk.repositories import _args

# The worker queries. Oldest mint first; ties broken by id so the order is total. SKIP LOCKED makes
# concurrent callers take disjoint rows instead of queueing behind each other; the row locks last
# until the caller's transaction ends (unit of work commit or rollback).
_LOCK_OLDEST = text(
    """
    SELECT * FROM tokens_s0
    WHERE status = CAST(:status AS token_status_enum)
      AND claimed_by IS NULL  -- a token the leased path (glisk.workers) ever held is its own
    ORDER BY mint_timestamp, id
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
    """
)


# Token ids in [start, up_to] without a row, for gap recovery. One ordered pass over the unique
# token_id index (an index-only scan where the table is vacuumed), no sort: each present id and
# the one before it bound a gap; the last present id (one index probe) bounds the tail. Only the
# missing ids are generated and sorted. A generate_series anti-join probes the index once per id
# instead: several times slower at 1M tokens (`python -m bench mint`).
_MISSING = text(
    """
    WITH gaps AS (
        SELECT previous + 1 AS low, token_id - 1 AS high
        FROM (
            SELECT token_id,
                   lag(token_id, 1, CAST(:start AS integer) - 1) OVER (ORDER BY token_id)
                       AS previous
            FROM tokens_s0
            WHERE token_id BETWEEN :start AND :up_to
        ) AS present
        WHERE token_id > previous + 1
        UNION ALL
        SELECT coalesce(max(token_id) + 1, CAST(:start AS integer)), CAST(:up_to AS integer)
        FROM tokens_s0
        WHERE token_id BETWEEN :start AND :up_to
    )
    SELECT n FROM gaps, generate_series(low, high) AS n
    ORDER BY n
    LIMIT :limit
    """
)


class TokenRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get_by_id(self, token_uuid: UUID) -> Token | None:
        return await self.session.get(Token, token_uuid)

    async def get_by_token_id(self, token_id: int) -> Token | None:
        v.int_at_least("token_id", token_id, 0)
        result = await self.session.execute(select(Token).where(col(Token.token_id) == token_id))
        return result.scalar_one_or_none()

    async def add(self, token: Token) -> Token:
        self.session.add(token)
        await self.session.flush()
        return token

    async def _lock_oldest(self, status: TokenStatus, limit: int) -> list[Token]:
        _args.limit(limit)
        statement = (
            select(Token)
            .from_statement(_LOCK_OLDEST.bindparams(status=status.value, limit=limit))
            # A locked row is the truth; refresh any stale copy already in the session.
            .execution_options(populate_existing=True)
        )
        result = await self.session.execute(statement)
        return list(result.scalars())

    async def get_pending_for_generation(self, limit: int = 10) -> list[Token]:
        """Up to ``limit`` tokens in 'detected', oldest mint_timestamp first.

        Locks the returned rows FOR UPDATE SKIP LOCKED until the caller's transaction ends, so
        concurrent callers never receive the same token; rows locked by others are skipped, not
        waited for. Empty list when nothing is available (the caller sleeps and polls again).
        """
        return await self._lock_oldest(TokenStatus.DETECTED, limit)

    async def get_pending_for_upload(self, limit: int = 10) -> list[Token]:
        """Up to ``limit`` tokens in 'generating'; same ordering and locking contract as
        get_pending_for_generation."""
        return await self._lock_oldest(TokenStatus.GENERATING, limit)

    async def get_ready_for_reveal(self, limit: int = 50) -> list[Token]:
        """Up to ``limit`` tokens in 'ready' (a reveal batch holds at most 50); same ordering and
        locking contract as get_pending_for_generation."""
        return await self._lock_oldest(TokenStatus.READY, limit)

    async def get_by_author(self, author_id: UUID, limit: int = 100) -> list[Token]:
        """Newest mint first. No locking."""
        _args.limit(limit)
        result = await self.session.execute(
            select(Token)
            .where(col(Token.author_id) == author_id)
            .order_by(col(Token.mint_timestamp).desc(), col(Token.id).desc())
            .limit(limit)
        )
        return list(result.scalars())

    async def get_by_status(self, status: TokenStatus | str, limit: int = 100) -> list[Token]:
        """Oldest mint first. No locking: for dashboards and admin reads, not for claiming work."""
        wanted = v.one_of("status", status, TokenStatus)
        _args.limit(limit)
        result = await self.session.execute(
            select(Token)
            .where(col(Token.status) == wanted)
            .order_by(col(Token.mint_timestamp), col(Token.id))
            .limit(limit)
        )
        return list(result.scalars())

    async def missing_token_ids(
        self, up_to: int, *, start: int = 1, limit: int = 1000
    ) -> list[int]:
        """Token ids from ``start`` (GliskNFT's first id is 1) to ``up_to``, both included, that
        have no row, ascending, at most ``limit`` (1 to 100,000) of them. No locking: a mint being
        recorded right now may still show as missing; recording it again is harmless.

        Cost is one pass over the token_id index from ``start`` to ``up_to`` (about 0.2 s for 1M
        tokens, see docs/benchmarks.md); a recovery pass that keeps the point up to which it
        found no gap (``SystemStateRepository.advance``) and starts there reads only new ids."""
        v.int_at_least("start", start, 0)
        v.int_at_least("up_to", up_to, 0)
        _args.limit(limit, maximum=100_000)
        if up_to < start:
            return []
        result = await self.session.execute(
            _MISSING, {"start": start, "up_to": up_to, "limit": limit}
        )
        return list(result.scalars())
