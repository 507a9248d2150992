"""Settling a recorded reveal: watch its nonce until one of its transactions is confirmed, the
nonce is lost to another transaction (or a revert), or the wait runs out; meanwhile rebroadcast,
replace and fill as the keeper's module docstring says (step 4). Every replacement or filler is
recorded (``ledger.add_attempt``, fenced by the batch's claims) before it is sent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Literal
from uuid import UUID

from eth_account.typed_transactions.typed_transaction import TypedTransaction
from hexbytes import HexBytes
from structlog.typing import FilteringBoundLogger
from web3 import AsyncWeb3

from glisk.chain import ledger
from glisk.chain.fees import FeePolicy, gwei
from glisk.chain.keeper_config import KeeperConfig
from glisk.chain.ledger import Reveal
from glisk.chain.outbox import Outbox
from glisk.chain.watch import ChainWatch, Mined
from glisk.errors import ChainError, LeaseLost
from glisk.workers.claims import Claim

Settled = Literal["confirmed", "failed", "unknown"]
# Seconds the chain's count may be past a nonce while no receipt of ours shows before the keeper
# asks the chain which transaction took it (nodes count a transaction before serving its receipt).
SPENT_GRACE = 1.0


class Settler:
    """Settles the reveals of one keeper. Remembers, across calls, when earlier nonces were last
    broadcast again and when a replacement the cap refused may be tried again."""

    def __init__(
        self,
        config: KeeperConfig,
        w3: AsyncWeb3,
        fees: FeePolicy,
        outbox: Outbox,
        watch: ChainWatch,
        log: FilteringBoundLogger,
    ) -> None:
        self.config = config
        self.w3 = w3
        self.fees = fees
        self.outbox = outbox
        self.watch = watch
        self._log = log
        self._last_help = 0.0  # when earlier nonces were last broadcast again
        self._next_replace: dict[UUID, float] = {}  # a replacement the cap refused: not before

    async def settle(
        self,
        reveal_id: UUID,
        claims: Sequence[Claim],
        *,
        rebroadcast_now: bool = False,
        filler_now: bool = False,
        known: Reveal | None = None,
    ) -> tuple[Settled, str]:
        """Watch the reveal's nonce until it is confirmed (by one of its reveal attempts),
        failed (reverted, or spent by a filler or a transaction not recorded here) or ``wait``
        has passed (unknown); with the hash that settled it (or the newest one). Replaces,
        rebroadcasts and fills as glisk.chain.keeper says (step 4). ``known``: the reveal as just
        recorded, which spares reading it back the first time round."""
        deadline = time.monotonic() + self.config.wait
        spent_since: float | None = None  # the count passed the nonce with no receipt of ours
        while True:
            reveal = known or await ledger.load(reveal_id)
            known = None
            if reveal is None or not reveal.attempts or reveal.nonce is None:
                raise ChainError(f"reveal {reveal_id} has no signed transaction recorded")
            if reveal.status != "pending":  # settled by another worker meanwhile
                return ("confirmed" if reveal.status == "confirmed" else "failed"), reveal.tx_hash
            latest = reveal.latest
            mined = await self.watch.receipt(reveal)
            if mined is not None:
                state = await self._judge(reveal, mined)
                if state != "unknown":
                    return state, mined.attempt.signed.tx_hash
            else:
                count = int(await self.w3.eth.get_transaction_count(self.config.account.address))
                if count > reveal.nonce:
                    # Usually our own receipt is a moment behind the count: look again for
                    # SPENT_GRACE before asking the chain which transaction took the nonce.
                    spent_since = spent_since or time.monotonic()
                    if time.monotonic() - spent_since >= SPENT_GRACE and (
                        await self.watch.spent_by_another(reveal)
                    ):
                        self._log.warning(
                            "keeper.nonce_spent_elsewhere",
                            reveal=str(reveal_id),
                            nonce=reveal.nonce,
                        )
                        return "failed", latest.signed.tx_hash
                else:
                    spent_since = None
                    await self._unstick(reveal, claims, count, filler_now, rebroadcast_now)
                    filler_now = rebroadcast_now = False
            if time.monotonic() >= deadline:
                return "unknown", latest.signed.tx_hash
            await asyncio.sleep(self.config.poll)

    async def _unstick(
        self,
        reveal: Reveal,
        claims: Sequence[Claim],
        count: int,
        filler_now: bool,
        rebroadcast_now: bool,
    ) -> None:
        """Nothing of ours mined and the nonce not spent: help the earlier nonces it waits
        behind (their newest bytes again), or, next in line, fill it, replace it when stuck, or
        broadcast it again when due. Remembers when the cap refused a replacement."""
        assert reveal.nonce is not None
        latest = reveal.latest
        now = time.monotonic()
        if count < reveal.nonce:
            if now - self._last_help >= self.config.rebroadcast_every:
                self._last_help = now
                await self.outbox.rebroadcast_blocking(count, reveal.nonce)
        elif filler_now or (
            latest.signed.kind == "reveal"
            and latest.age >= self.config.stuck_after
            and now >= self._next_replace.get(reveal.id, 0.0)
        ):
            if not await self._replace(reveal, claims, filler=filler_now):
                self._next_replace[reveal.id] = now + self.config.stuck_after
        elif rebroadcast_now or latest.since_broadcast >= self.config.rebroadcast_every:
            refused = await self.outbox.broadcast(latest.signed)
            if refused == "other" and latest.signed.kind == "reveal":
                await self._replace(reveal, claims, filler=True)  # refused for good: fill it

    async def _judge(self, reveal: Reveal, mined: Mined) -> Settled:
        """Confirmed, failed, or unknown (not deep enough yet, or its block was reorged out)."""
        receipt = mined.receipt
        if not await self.watch.confirmed(receipt["blockNumber"], receipt["blockHash"]):
            return "unknown"
        tx_hash = mined.attempt.signed.tx_hash
        if receipt["status"] != 1 or mined.attempt.signed.kind == "filler":
            self._log.warning("keeper.reveal_failed", reveal=str(reveal.id), tx_hash=tx_hash,
                              reverted=receipt["status"] != 1)  # fmt: skip
            return "failed"
        await ledger.mined(
            reveal.id,
            tx_hash,
            block_number=receipt["blockNumber"],
            block_hash=receipt["blockHash"].to_0x_hex(),
            gas_price=int(receipt.get("effectiveGasPrice", 0)),
        )
        self._log.info("keeper.confirmed", reveal=str(reveal.id), tx_hash=tx_hash,
                       block=receipt["blockNumber"], gas_used=receipt["gasUsed"])  # fmt: skip
        return "confirmed"

    async def _replace(
        self, reveal: Reveal, claims: Sequence[Claim], *, filler: bool = False
    ) -> bool:
        """Record and broadcast another transaction for the reveal's nonce: the same call with
        at least 12.5% higher fees (stuck), or a no-op self-send (``filler``: the node refuses
        the reveal for good). Returns False when the cap leaves no room (it keeps waiting).
        Raises LeaseLost when the claims are gone (nothing recorded, nothing sent)."""
        assert reveal.nonce is not None
        latest = reveal.latest.signed
        quote = await self.fees.quote(self.w3)
        fees = self.fees.bump(latest.fees, quote)
        if fees is None:
            self._log.warning("keeper.stuck_at_cap", reveal=str(reveal.id), nonce=reveal.nonce,
                              max_fee_gwei=gwei(latest.fees.max_fee_per_gas),
                              base_fee_gwei=gwei(quote.base_fee))  # fmt: skip
            return False
        if filler:
            signed = self.outbox.filler(reveal.nonce, fees)
        else:
            original = TypedTransaction.from_bytes(HexBytes(latest.raw)).as_dict()
            signed = self.outbox.sign(
                reveal.nonce,
                to=AsyncWeb3.to_checksum_address(original["to"]),
                data=bytes(original["data"]),
                gas=int(original["gas"]),
                fees=fees,
            )
        sender = self.outbox.sender
        if not await ledger.add_attempt(claims, reveal.id, signed, sender=sender):
            raise LeaseLost("the batch's claims are no longer all live; no replacement recorded")
        self._log.warning(
            "keeper.replaced",
            reveal=str(reveal.id),
            nonce=reveal.nonce,
            kind=signed.kind,
            old=latest.tx_hash,
            new=signed.tx_hash,
            max_fee_gwei=gwei(fees.max_fee_per_gas),
            age=round(reveal.latest.age, 1),
        )
        await self.outbox.broadcast(signed)
        return True
