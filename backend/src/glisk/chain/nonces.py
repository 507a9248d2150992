"""Nonces owned by PostgreSQL: one allocator per (chain, sender), shared by every worker.

A nonce is never read from the node's pending count (which every process sees the same and which
a dropped transaction rewinds) and never rewound. A reveal takes its nonce in the statement that
records it (``keeper_record``): the transaction is signed with the allocator's next nonce, and the
statement records it only if the allocator still stands there, moving it on by one; another
worker got there first otherwise, and the transaction is signed again with the next nonce. A
crash can therefore never leave a nonce taken but unrecorded.

``start()`` runs once per process, before its first reveal: the allocator is created at the
chain's confirmed transaction count or moved up to it (the chain ahead means someone else used the
key, or the database was restored: logged as a warning), and says so in the log. Nonces between
the chain's count and the allocator that no pending reveal holds (gaps: nothing would ever be
mined there, so every later transaction would wait forever) are returned for the keeper to fill
with no-op self-sends.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from uuid import UUID

import structlog
from web3 import AsyncWeb3

from glisk.chain import ledger
from glisk.chain.ledger import Signed
from glisk.errors import LeaseLost, RetryLater, RevealInFlight
from glisk.workers.claims import Claim

log = structlog.get_logger("glisk.keeper")

# Signing is fast; losing the allocator this many times in a row means heavy contention.
MAX_TRIES = 25


class NonceAllocator:
    """The nonces of ``address`` (lowercase) on ``chain_id``. No I/O until called."""

    def __init__(self, w3: AsyncWeb3, chain_id: int, address: str) -> None:
        self.w3 = w3
        self.chain_id = chain_id
        self.address = address.lower()
        # The allocator as this process last saw it: the first guess at the next nonce (right
        # unless another worker took some meanwhile; keeper_record says so and what it is now).
        self._guess: int | None = None

    async def start(self) -> list[int]:
        """Reconcile the allocator with the chain's confirmed count; the gaps to fill."""
        checksum = AsyncWeb3.to_checksum_address(self.address)
        confirmed = int(await self.w3.eth.get_transaction_count(checksum, "latest"))
        before, after, pending, lowest = await ledger.start(self.chain_id, self.address, confirmed)
        self._guess = after
        held = await ledger.held_nonces(self.chain_id, self.address, confirmed)
        gaps = [n for n in range(confirmed, after) if n not in held]
        if gaps:  # a reveal may have been mined and completed meanwhile: ask the chain again
            recount = int(await self.w3.eth.get_transaction_count(checksum, "latest"))
            gaps = [n for n in gaps if n >= recount]
        fields: dict[str, Any] = {
            "sender": self.address,
            "chain_id": self.chain_id,
            "chain_confirmed": confirmed,
            "allocator_before": before,
            "allocator": after,
            "in_flight": pending,
            "lowest_in_flight": lowest if pending else None,
            "gaps": gaps,
        }
        if before is not None and confirmed > before:
            log.warning("keeper.nonce_behind_chain", **fields)  # someone else used the key
        else:
            log.info("keeper.nonce_reconciled", **fields)
        return gaps

    async def take(
        self,
        claims: Sequence[Claim],
        sign: Callable[[int], Awaitable[Signed]],
        *,
        key: str,
        data: Callable[[int], dict[str, Any]],
    ) -> tuple[Signed, UUID]:
        """Sign with the next nonce (``sign(nonce)``) and record the reveal in the same fenced
        statement that takes the nonce; again with the next one if another worker took it.
        Returns what was recorded. Raises LeaseLost (a claim is gone: nothing recorded, send
        nothing), RevealInFlight (a token is in a pending reveal), RetryLater (contention)."""
        nonce = self._guess
        if nonce is None:
            nonce = await ledger.next_nonce(self.chain_id, self.address)
        if nonce is None:
            raise RetryLater(0.0, "the nonce allocator is not started")
        for _ in range(MAX_TRIES):
            signed = await sign(nonce)
            recording = await ledger.record(
                claims,
                signed,
                chain_id=self.chain_id,
                sender=self.address,
                key=key,
                data=data(nonce),
            )
            if not recording.live:
                raise LeaseLost("the batch's claims are no longer all live; nothing was recorded")
            if recording.reveal_id is not None:
                self._guess = nonce + 1
                return signed, recording.reveal_id
            if recording.restored or recording.key_taken:
                raise RevealInFlight(
                    0.0,
                    f"{recording.restored} token(s) of the batch are in a reveal still pending"
                    if recording.restored
                    else "a reveal of this very batch exists",
                )
            if recording.allocator is None:
                raise RetryLater(0.0, "the nonce allocator is not started")
            nonce = self._guess = recording.allocator  # another worker took ours: the next one
        raise RetryLater(0.0, f"the nonce allocator was taken {MAX_TRIES} times in a row")
