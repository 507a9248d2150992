"""A reveal handler for the chain stand-in that sends each token in at most one transaction that
can be mined: the reference for a real one (see glisk.workers.reveal for the contract).

Before sending it records the signed transaction (``record_reveal``); to reconcile one an earlier
holder recorded, it rebroadcasts that very transaction (the chain mines a nonce at most once) and
reads where it stands. A transaction the node does not hold counts as failed only once its nonce
is spent by a mined one: until then it could still be mined, so the tokens wait.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Sequence

from glisk.errors import GliskError
from glisk.standins.chain_client import (
    ChainClient,
    NonceTooLow,
    ReplacementUnderpriced,
    TxStatus,
)
from glisk.standins.tx import decode_raw, sign_reveal
from glisk.workers.checkpoints import record_reveal
from glisk.workers.claims import Claim
from glisk.workers.reveal import PendingReveal, RevealState


class RevealNotConfirmed(GliskError):
    """The transaction was sent but not confirmed in time (or reverted): a failed attempt; the
    next claim reconciles it."""


class ChainRevealer:
    """``Worker("reveal", ChainRevealer(client, sender), ...)``. ``after_send`` runs between the
    send and the wait for its receipt (tests kill or stall a worker there)."""

    def __init__(
        self,
        client: ChainClient,
        sender: str,
        *,
        confirm_within: float = 10.0,
        after_send: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.client = client
        self.sender = sender
        self.confirm_within = confirm_within
        self.after_send = after_send

    async def __call__(self, claims: Sequence[Claim]) -> str:
        nonce = await self.client.next_nonce(self.sender)
        tx = sign_reveal(self.sender, nonce, [c.token_id for c in claims])
        await record_reveal(claims, tx.hash, {"raw": tx.raw})  # LeaseLost: nothing is sent
        await self.client.send(tx)  # a refusal fails the attempt; the next claim reconciles
        if self.after_send is not None:
            await self.after_send()
        status = await self.client.wait(tx.hash, max_wait=self.confirm_within)
        if status is not TxStatus.CONFIRMED:
            raise RevealNotConfirmed(f"{tx.hash} is {status}")
        return tx.hash

    async def reconcile(self, pending: PendingReveal) -> RevealState:
        tx = decode_raw(str(pending.data["raw"]))
        # The same signed transaction: safe to repeat. Refused: its nonce is taken, or held by
        # another pending transaction (see below).
        with contextlib.suppress(NonceTooLow, ReplacementUnderpriced):
            await self.client.send(tx)
        status = await self.client.status(tx.hash)
        if status is TxStatus.CONFIRMED:
            return "confirmed"
        if status is TxStatus.REVERTED:
            return "failed"
        if status is TxStatus.PENDING:
            return "unknown"
        spent = await self.client.next_nonce(tx.sender, pending=False)
        return "failed" if spent > tx.nonce else "unknown"
