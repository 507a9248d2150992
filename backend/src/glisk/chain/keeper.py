"""The reveal keeper: a reveal handler that sends real signed transactions and reveals each token
exactly once (``Worker("reveal", Keeper(config), ...)``; users run ``glisk.handlers.reveal``).

A batch, in order:
1. **Simulate** ``revealTokens`` (``eth_estimateGas``). ``AlreadyRevealed(id)`` is decoded and
   the token's state read from the chain: the block it was revealed in (``revealedAt``), then
   that block's ``TokensRevealed`` log naming it: the token completes with that transaction's
   hash once it is confirmed. A token the contract does not know fails its attempt alone.
2. **Fees** from ``eth_feeHistory`` (glisk.chain.fees): above the cap, the batch waits
   (FeeAboveCap, a RetryLater) rather than overpays.
3. **Sign and record before broadcast**: the nonce comes from PostgreSQL (glisk.chain.nonces) in
   the fenced statement that records the reveal, its signed bytes, hash and fees, and points each
   token's checkpoint at it. A token already in a pending reveal is refused there
   (RevealInFlight), and a batch has an idempotency key (one reveal per key, ever).
4. **Broadcast**, then **settle**: poll for a receipt under every hash of the nonce. Mined:
   complete only after ``confirmations`` blocks and only if the receipt's block is still
   canonical; a reveal reorged out is pending again and its newest signed bytes are broadcast
   again (never re-signed at another nonce while this one can still be mined). Not mined:
   rebroadcast the same bytes now and then (a dropped transaction comes back), rebroadcast the
   earlier nonces a later one waits behind (their holder may be dead), and once the transaction
   is next in line and older than ``stuck_after``, replace it at the same nonce with at least
   12.5% higher fees, up to the cap. Refused for good by the node: the nonce is filled with a
   no-op self-send (a filler), so later nonces are not stuck and the tokens go out again.
   The nonce spent by none of ours, or a revert: the reveal failed (RevealFailed); its tokens go
   into a new transaction at the next claim (and an ``AlreadyRevealed`` then resolves them).
5. Not settled within ``wait``: RetryLater; the next claim reconciles.

``reconcile(pending)`` settles a reveal an earlier holder recorded, the same way (step 4), after
rebroadcasting its newest signed bytes.

Its parts: ``outbox`` (sign and send), ``watch`` (read the chain back), ``settle`` (step 4),
``nonces`` (step 3's nonce), ``fees`` (step 2), ``ledger`` (the records); this module runs a
batch through them and reconciles the allocator with the chain once per process.

Everything the keeper records goes through the reveal worker's write connection; it needs no
connection of its own. The private key never leaves the LocalAccount: it is not logged, not in
an error, not in a repr.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from uuid import UUID

import structlog
from hexbytes import HexBytes
from web3 import AsyncWeb3
from web3.exceptions import ContractCustomError

from glisk.chain import client, ledger
from glisk.chain import contract as glisk_contract
from glisk.chain.client import TRANSIENT
from glisk.chain.fees import FeePolicy, gwei
from glisk.chain.keeper_config import KeeperConfig
from glisk.chain.ledger import Reveal, Signed
from glisk.chain.nonces import NonceAllocator
from glisk.chain.outbox import Outbox
from glisk.chain.settle import Settler
from glisk.chain.watch import ChainWatch
from glisk.errors import (
    ChainError,
    FeeAboveCap,
    NodeUnavailable,
    RetryLater,
    RevealFailed,
)
from glisk.workers.claims import Claim
from glisk.workers.reveal import PendingReveal, RevealState, pending_reveal_of

__all__ = ["Keeper", "KeeperConfig"]

log = structlog.get_logger("glisk.keeper")

GAS_MARGIN = (6, 5)  # gas limit = estimate * 6/5


class Keeper:
    """A reveal batch handler with a reconcile (see the module docstring). ``after_send`` runs
    between a batch's first broadcast and the wait for its receipt (tests kill a worker there)."""

    def __init__(
        self,
        config: KeeperConfig,
        *,
        w3: AsyncWeb3 | None = None,
        after_send: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.config = config
        self.w3 = w3 or client.connect(config.rpc_url, timeout=config.rpc_timeout)
        self.sender = config.account.address.lower()
        self.contract = glisk_contract.glisk(self.w3, config.contract)
        self.fees = FeePolicy(config.max_fee_per_gas)
        self.nonces = NonceAllocator(self.w3, config.chain_id, self.sender)
        self.after_send = after_send
        self._started = False
        self._start_lock = asyncio.Lock()
        self._log = log.bind(sender=self.sender)
        self.outbox = Outbox(config, self.w3, self._log)
        self.watch = ChainWatch(config, self.w3, self.contract, self._log)
        self.settler = Settler(config, self.w3, self.fees, self.outbox, self.watch, self._log)

    @property
    def sends(self) -> int:
        """eth_sendRawTransaction calls made by this keeper."""
        return self.outbox.sends

    # -- the two calls a reveal worker makes ------------------------------------------------

    async def __call__(self, claims: Sequence[Claim]) -> dict[UUID, str]:
        try:
            return await self._reveal(list(claims))
        except TRANSIENT as exc:
            said = client.transport_error(exc)
            raise NodeUnavailable(self.config.poll, f"the node did not answer: {said}") from None

    async def reconcile(self, pending: PendingReveal) -> RevealState:
        try:
            await self._start()
            state, _ = await self.settler.settle(pending.id, pending.claims, rebroadcast_now=True)
            return state
        except TRANSIENT as exc:  # the node may be down: nothing known, nothing decided
            self._log.warning("keeper.node_unavailable", error=client.transport_error(exc))
            return "unknown"

    # -- a batch ----------------------------------------------------------------------------

    async def _reveal(self, claims: list[Claim]) -> dict[UUID, str]:
        await self._start()
        results: dict[UUID, str] = {}
        batch, gas = await self._simulate(claims, results)
        if not batch:
            return results
        quote = await self.fees.quote(self.w3)
        if not self.fees.affordable(quote):
            raise FeeAboveCap(
                self.config.stuck_after,
                f"the next block's base fee {gwei(quote.base_fee)} gwei plus a tip of "
                f"{gwei(quote.priority)} is above the cap of {gwei(self.fees.cap)} gwei",
            )
        data = self._reveal_data(batch)
        key = self.idempotency_key(batch)

        async def sign(nonce: int) -> Signed:
            return self.outbox.sign(
                nonce, to=self.contract.address, data=data, gas=gas, fees=quote.fees
            )

        signed, reveal_id = await self.nonces.take(
            batch,
            sign,
            key=key,
            data=lambda nonce: {"nonce": nonce, "sender": self.sender, "key": key},
        )
        self._log.info(
            "keeper.recorded",
            reveal=str(reveal_id),
            tx_hash=signed.tx_hash,
            nonce=signed.nonce,
            tokens=len(batch),
            max_fee_gwei=gwei(signed.fees.max_fee_per_gas),
        )
        refused = await self.outbox.broadcast(signed)
        if self.after_send is not None:
            await self.after_send()
        recorded = Reveal(
            reveal_id,
            "pending",
            self.config.chain_id,
            self.sender,
            signed.nonce,
            signed.tx_hash,
            [ledger.Attempt(signed, age=0.0, since_broadcast=0.0)],
        )
        state, tx_hash = await self.settler.settle(
            reveal_id, batch, filler_now=refused == "other", known=recorded
        )
        if state == "confirmed":
            results.update({claim.token_uuid: tx_hash for claim in batch})
            return results
        if state == "failed":
            from glisk.workers import queries as worker_queries
            from glisk.workers.checkpoints import handler_write

            await handler_write(worker_queries.FAIL_REVEAL, {"id": reveal_id})
            raise RevealFailed(
                f"{signed.tx_hash} (nonce {signed.nonce}) can never reveal its tokens"
            )
        raise RetryLater(self.config.poll, f"{signed.tx_hash} not confirmed yet")

    async def _simulate(
        self, claims: list[Claim], results: dict[UUID, str]
    ) -> tuple[list[Claim], int]:
        """Estimate the batch's gas; tokens the contract says are revealed are resolved from the
        chain into ``results`` and left out, tokens it does not know are left out (their attempt
        fails: no result). Returns the rest and the gas limit to sign with."""
        batch = list(claims)
        while batch:
            try:
                estimate = await self.w3.eth.estimate_gas(
                    {
                        "from": self.config.account.address,
                        "to": self.contract.address,
                        "data": self._reveal_data(batch),
                    }
                )
            except ContractCustomError as exc:
                decoded = glisk_contract.decode_error(exc.data)
                name, args = decoded if decoded is not None else ("", ())
                by_token = {c.token_id: c for c in batch}
                token = int(args[0]) if args and isinstance(args[0], int) else -1
                if name == "AlreadyRevealed" and token in by_token:
                    results[by_token[token].token_uuid] = await self.watch.revealed_by(token)
                elif name in ("ERC721NonexistentToken", "EmptyURI") and token in by_token:
                    self._log.warning("keeper.token_refused", token_id=token, error=name)
                else:
                    raise ChainError(f"revealTokens would revert: {name or exc}") from None
                batch.remove(by_token[token])
                continue
            num, den = GAS_MARGIN
            return batch, int(estimate) * num // den
        return [], 0

    def _reveal_data(self, batch: Sequence[Claim]) -> bytes:
        ids = [c.token_id for c in batch]
        uris = [f"ipfs://{c.metadata_cid}" for c in batch]
        return bytes(HexBytes(self.contract.encode_abi("revealTokens", args=[ids, uris])))

    def idempotency_key(self, batch: Sequence[Claim]) -> str:
        """The batch's identity: chain, contract, token ids and the reveals these tokens were in
        before (a batch sent anew after a failed reveal is another batch). A rescue or an
        operator's retry of the same tokens in the same state computes the same key."""
        previous = sorted(str((pending_reveal_of(c) or {}).get("id", "")) for c in batch)
        identity = "|".join(
            [
                "glisk-reveal/1",
                str(self.config.chain_id),
                self.contract.address.lower(),
                ",".join(str(i) for i in sorted(c.token_id for c in batch)),
                ",".join(p for p in previous if p),
            ]
        )
        return "0x" + hashlib.sha256(identity.encode()).hexdigest()

    # -- start-up -----------------------------------------------------------------------------

    async def _start(self) -> None:
        """Once per process: reconcile the allocator with the chain and fill its gaps."""
        if self._started:
            return
        async with self._start_lock:
            if self._started:
                return
            for nonce in await self.nonces.start():
                await self._fill_gap(nonce)
            self._started = True

    async def _fill_gap(self, nonce: int) -> None:
        quote = await self.fees.quote(self.w3)
        signed = self.outbox.filler(nonce, quote.fees)
        if await ledger.gap_filler(self.config.chain_id, self.sender, signed):
            self._log.warning("keeper.gap_filled", nonce=nonce, tx_hash=signed.tx_hash)
            await self.outbox.broadcast(signed)

    async def _nonce_taker(self, nonce: int) -> tuple[str, int, bytes] | None:
        """``ChainWatch.nonce_taker`` of this keeper (tests ask it directly)."""
        return await self.watch.nonce_taker(nonce)
