"""Small builders for valid entities, so each test states only what it is about."""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from sqlalchemy import text

from glisk.models import Author, Token, TokenStatus
from glisk.uow import UnitOfWorkFactory

_token_ids = itertools.count(1)
BASE_TIME = datetime(2025, 1, 1, 12, 0, 0)


def wallet() -> str:
    return "0x" + secrets.token_hex(20)


def tx_hash() -> str:
    return "0x" + secrets.token_hex(32)


def author(**overrides: Any) -> Author:
    fields: dict[str, Any] = {"wallet_address": wallet(), "prompt_text": "a cat in a spacesuit"}
    fields.update(overrides)
    return Author(**fields)


def token(author_id: UUID, status: TokenStatus = TokenStatus.DETECTED, **overrides: Any) -> Token:
    number = next(_token_ids)
    fields: dict[str, Any] = {
        "token_id": number,
        "author_id": author_id,
        "minter_address": wallet(),
        "status": status,
        "mint_timestamp": BASE_TIME + timedelta(seconds=number),
    }
    if status in (TokenStatus.READY, TokenStatus.REVEALED):
        fields["metadata_cid"] = "bafy-metadata"
    fields.update(overrides)
    return Token(**fields)


async def seed_tokens(
    uow_factory: UnitOfWorkFactory,
    count: int,
    status: TokenStatus = TokenStatus.DETECTED,
    **fields: Any,
) -> list[UUID]:
    """``count`` tokens of one new author, minted one second apart from BASE_TIME (so claims take
    them in this order); returns their ids."""
    async with uow_factory() as uow:
        owner = await uow.authors.add(author())
        tokens = [
            token(
                owner.id, status=status, mint_timestamp=BASE_TIME + timedelta(seconds=i), **fields
            )
            for i in range(count)
        ]
        uow.session.add_all(tokens)
    return [t.id for t in tokens]


async def seed_in_bulk(
    uow_factory: UnitOfWorkFactory,
    count: int,
    *,
    first_token_id: int,
    status: str = "'detected'",
    image_path: str = "NULL",
    metadata_cid: str = "NULL",
) -> None:
    """``count`` tokens of one new author in one statement, for tests about large tables: token
    ``first_token_id + g`` for g in 1..count, minted g seconds after 2025-01-01, with ``status``,
    ``image_path`` and ``metadata_cid`` given as SQL expressions of g. Then ANALYZE, so that the
    planner's statistics describe them."""
    async with uow_factory() as uow:
        owner = await uow.authors.add(author())
        await uow.session.execute(
            text(
                f"""
                INSERT INTO tokens_s0 (id, token_id, author_id, minter_address, status,
                    mint_timestamp, image_path, metadata_cid, created_at)
                SELECT gen_random_uuid(), :first + g, :author, '0x' || repeat('ab', 20),
                    CAST({status} AS token_status_enum),
                    timestamp '2025-01-01' + g * interval '1 second',
                    {image_path}, {metadata_cid}, now()
                FROM generate_series(1, :count) AS g
                """
            ),
            {"first": first_token_id, "author": owner.id, "count": count},
        )
    async with uow_factory() as uow:
        await uow.session.execute(text("ANALYZE tokens_s0"))


async def _update_tokens(
    uow_factory: UnitOfWorkFactory, statement: str, token_ids: Iterable[UUID]
) -> None:
    async with uow_factory() as uow:
        await uow.session.execute(text(statement), {"ids": list(token_ids)})


async def expire_leases(uow_factory: UnitOfWorkFactory, *token_ids: UUID) -> None:
    """Make these tokens' leases run out now (what a dead holder's lease does), without waiting."""
    await _update_tokens(
        uow_factory,
        "UPDATE tokens_s0 SET lease_expires_at = (now() AT TIME ZONE 'utc') "
        "- interval '1 second' WHERE id = ANY(:ids) AND claim_id IS NOT NULL",
        token_ids,
    )


async def make_ready(uow_factory: UnitOfWorkFactory, token_ids: Iterable[UUID]) -> None:
    """These tokens as the upload stage leaves them: ready, with an image and a metadata CID."""
    await _update_tokens(
        uow_factory,
        "UPDATE tokens_s0 SET status = 'ready', metadata_cid = 'bafy', "
        "image_path = '/img.png' WHERE id = ANY(:ids)",
        token_ids,
    )
