"""The keeper's records in PostgreSQL: its nonce allocators, its reveals and every signed attempt.

Thin typed calls over ``glisk.chain.queries``, sent through the reveal worker's write connection
(``handler_write``): they work inside a reveal handler that a Worker runs. Each says whether it
is fenced by the batch's claims (see queries.py for what each statement locks).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal
from uuid import UUID

from glisk.chain import queries
from glisk.chain.fees import Fees
from glisk.workers.checkpoints import handler_write
from glisk.workers.claims import Claim

AttemptKind = Literal["reveal", "filler"]


@dataclass(frozen=True)
class Signed:
    """A signed transaction, as recorded before it is broadcast."""

    raw: bytes
    tx_hash: str  # 0x + 64 lowercase hex
    nonce: int
    gas_limit: int
    fees: Fees
    kind: AttemptKind = "reveal"


@dataclass(frozen=True)
class Attempt:
    signed: Signed
    age: float  # seconds since it was recorded
    since_broadcast: float  # seconds since it last reached the node (or was recorded)


@dataclass(frozen=True)
class Reveal:
    id: UUID
    status: str  # pending, confirmed, failed
    chain_id: int | None
    sender: str | None
    nonce: int | None
    tx_hash: str
    attempts: list[Attempt] = field(default_factory=list[Attempt])  # oldest first

    @property
    def latest(self) -> Attempt:
        return self.attempts[-1]


@dataclass(frozen=True)
class Recording:
    """What keeper_record did."""

    live: bool  # every claim was live
    allocator: int | None  # the allocator's next nonce when the statement ran
    reveal_id: UUID | None  # recorded (None: nothing was)
    restored: int  # tokens found in another pending reveal (their pointers restored)
    key_taken: bool  # a reveal with this idempotency key exists


def _claim_ids(claims: Sequence[Claim]) -> list[UUID]:
    return sorted({c.claim_id for c in claims})


def _signed_params(signed: Signed) -> dict[str, Any]:
    return {
        "tx_hash": signed.tx_hash,
        "nonce": signed.nonce,
        "raw": signed.raw,
        "gas_limit": signed.gas_limit,
        "max_fee": Decimal(signed.fees.max_fee_per_gas),
        "priority_fee": Decimal(signed.fees.max_priority_fee_per_gas),
    }


async def start(chain_id: int, address: str, confirmed: int) -> tuple[int | None, int, int, int]:
    """Reconcile the allocator with the chain's confirmed count (never down). Returns (allocator
    before or None, allocator after, pending reveals, lowest pending nonce or -1)."""
    params = {"chain_id": chain_id, "address": address, "confirmed": confirmed}
    ((before, after, pending, lowest),) = await handler_write(queries.START, params)
    return before, int(after), int(pending), -1 if lowest is None else int(lowest)


async def held_nonces(chain_id: int, address: str, start_at: int) -> set[int]:
    params = {"chain_id": chain_id, "address": address, "from": start_at}
    return {int(row[0]) for row in await handler_write(queries.HELD_NONCES, params)}


async def next_nonce(chain_id: int, address: str) -> int | None:
    rows = await handler_write(queries.NEXT_NONCE, {"chain_id": chain_id, "address": address})
    return int(rows[0][0]) if rows else None


async def record(
    claims: Sequence[Claim],
    signed: Signed,
    *,
    chain_id: int,
    sender: str,
    key: str,
    data: dict[str, Any],
) -> Recording:
    """keeper_record: take ``signed.nonce`` from the allocator and record the reveal, fenced."""
    params = {
        "claim_ids": _claim_ids(claims),
        "chain_id": chain_id,
        "sender": sender,
        "key": key,
        "data": json.dumps(data),
        **_signed_params(signed),
    }
    ((live, allocator, reveal_id, restored, taken, _written),) = await handler_write(
        queries.RECORD, params
    )
    return Recording(
        bool(live),
        None if allocator is None else int(allocator),
        reveal_id,
        int(restored),
        bool(taken),
    )


async def add_attempt(
    claims: Sequence[Claim], reveal_id: UUID, signed: Signed, *, sender: str
) -> bool:
    """keeper_attempt: a replacement or filler for a pending reveal, fenced by ``claims``."""
    params = {
        "claim_ids": _claim_ids(claims),
        "reveal_id": reveal_id,
        "kind": signed.kind,
        "sender": sender,
        **_signed_params(signed),
    }
    return bool(await handler_write(queries.ATTEMPT, params))


async def gap_filler(chain_id: int, sender: str, signed: Signed) -> bool:
    """keeper_gap_filler: a filler for a nonce no pending reveal holds (not fenced: no claim)."""
    params = {"chain_id": chain_id, "sender": sender, **_signed_params(signed)}
    return bool(await handler_write(queries.GAP_FILLER, params))


async def broadcast(tx_hash: str) -> None:
    await handler_write(queries.BROADCAST, {"tx_hash": tx_hash})


async def mined(
    reveal_id: UUID, tx_hash: str, *, block_number: int, block_hash: str, gas_price: int
) -> None:
    params = {
        "reveal_id": reveal_id,
        "tx_hash": tx_hash,
        "block_number": block_number,
        "block_hash": block_hash,
        "gas_price_gwei": Decimal(gas_price) / Decimal(10**9),
    }
    await handler_write(queries.MINED, params)


async def load(reveal_id: UUID) -> Reveal | None:
    """One reveal and its attempts (oldest first); None if no such row."""
    rows = await handler_write(queries.REVEAL, {"reveal_id": reveal_id})
    if not rows:
        return None
    status, chain_id, sender, nonce, tx_hash = rows[0][:5]
    attempts = [
        Attempt(
            Signed(
                raw=bytes(row[7]),
                tx_hash=row[5],
                nonce=int(nonce if nonce is not None else -1),
                gas_limit=int(row[8]),
                fees=Fees(int(row[9]), int(row[10])),
                kind=row[6],
            ),
            age=float(row[11]),
            since_broadcast=float(row[12]),
        )
        for row in rows
        if row[5] is not None
    ]
    return Reveal(
        reveal_id,
        str(status),
        None if chain_id is None else int(chain_id),
        sender,
        None if nonce is None else int(nonce),
        tx_hash or "",
        attempts,
    )


async def blocking(sender: str, start_at: int, below: int) -> list[tuple[str, bytes, int]]:
    """The newest attempt for each nonce in [start_at, below) still pending: (hash, raw, nonce)."""
    params = {"sender": sender, "from": start_at, "below": below}
    return [
        (row[0], bytes(row[1]), int(row[2]))
        for row in await handler_write(queries.BLOCKING, params)
    ]
