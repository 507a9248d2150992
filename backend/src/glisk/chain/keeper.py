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

Everything the keeper records goes through the reveal worker's write connection; it needs no
connection of its own. The private key never leaves the LocalAccount: it is not logged, not in
an error, not in a repr.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal
from uuid import UUID

import aiohttp
import structlog
from eth_account.signers.local import LocalAccount
from eth_account.typed_transactions.typed_transaction import TypedTransaction
from eth_typing import HexStr
from hexbytes import HexBytes
from web3 import AsyncWeb3
from web3.exceptions import ContractCustomError, TransactionNotFound, Web3RPCError
from web3.types import TxReceipt

from glisk.chain import client, ledger
from glisk.chain import contract as glisk_contract
from glisk.chain.fees import FeePolicy, Fees, gwei
from glisk.chain.ledger import Reveal, Signed
from glisk.chain.nonces import NonceAllocator
from glisk.errors import (
    ChainError,
    FeeAboveCap,
    LeaseLost,
    NodeUnavailable,
    RetryLater,
    RevealFailed,
)
from glisk.workers.claims import Claim
from glisk.workers.reveal import PendingReveal, RevealState, pending_reveal_of

log = structlog.get_logger("glisk.keeper")

Settled = Literal["confirmed", "failed", "unknown"]
# Errors of the transport to the node: it did not answer, or not in time. Waiting may cure them.
TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncio.TimeoutError,
    aiohttp.ClientError,
)
GAS_MARGIN = (6, 5)  # gas limit = estimate * 6/5
# Seconds the chain's count may be past a nonce while no receipt of ours shows before the keeper
# asks the chain which transaction took it (nodes count a transaction before serving its receipt).
SPENT_GRACE = 1.0
FILLER_GAS = 21_000


@dataclass(frozen=True)
class KeeperConfig:
    """What a keeper needs; ``glisk.handlers.reveal`` builds it from the settings."""

    rpc_url: str
    chain_id: int
    contract: str
    account: LocalAccount = field(repr=False)
    max_fee_per_gas: int  # the cap, wei
    confirmations: int = 1
    stuck_after: float = 90.0  # seconds before a transaction next in line is replaced
    poll: float = 1.0  # seconds between two looks at the chain
    wait: float = 120.0  # seconds one handler call waits for its confirmation
    rpc_timeout: float = 10.0

    @property
    def rebroadcast_every(self) -> float:
        """How often the same signed bytes go out again while nothing is mined."""
        return max(self.poll, self.stuck_after / 3)


@dataclass(frozen=True)
class _Mined:
    attempt: ledger.Attempt
    receipt: TxReceipt


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
        self.sends = 0  # eth_sendRawTransaction calls made by this keeper
        self._last_help = 0.0  # when earlier nonces were last broadcast again
        self._next_replace: dict[UUID, float] = {}  # a replacement the cap refused: not before
        self._started = False
        self._start_lock = asyncio.Lock()
        self._log = log.bind(sender=self.sender)

    # -- the two calls a reveal worker makes ------------------------------------------------

    async def __call__(self, claims: Sequence[Claim]) -> dict[UUID, str]:
        try:
            return await self._reveal(list(claims))
        except TRANSIENT as exc:
            raise NodeUnavailable(self.config.poll, f"the node did not answer: {exc}") from None

    async def reconcile(self, pending: PendingReveal) -> RevealState:
        try:
            await self._start()
            state, _ = await self._settle(pending.id, pending.claims, rebroadcast_now=True)
            return state
        except TRANSIENT as exc:  # the node may be down: nothing known, nothing decided
            self._log.warning("keeper.node_unavailable", error=str(exc))
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
            return self._sign(nonce, to=self.contract.address, data=data, gas=gas, fees=quote.fees)

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
        refused = await self._broadcast(signed)
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
        state, tx_hash = await self._settle(
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
                    results[by_token[token].token_uuid] = await self._revealed_by(token)
                elif name in ("ERC721NonexistentToken", "EmptyURI") and token in by_token:
                    self._log.warning("keeper.token_refused", token_id=token, error=name)
                else:
                    raise ChainError(f"revealTokens would revert: {name or exc}") from None
                batch.remove(by_token[token])
                continue
            num, den = GAS_MARGIN
            return batch, int(estimate) * num // den
        return [], 0

    async def _revealed_by(self, token_id: int) -> str:
        """The hash of the transaction that revealed ``token_id``, from the chain alone, once it
        is confirmed and canonical; RetryLater until then."""
        block_number = int(await self.contract.functions.revealedAt(token_id).call())
        event = self.contract.events.TokensRevealed()
        logs = await self.w3.eth.get_logs(
            {
                "address": self.contract.address,
                "fromBlock": block_number,
                "toBlock": block_number,
                "topics": [event.topic],
            }
        )
        for entry in logs:
            if token_id in event.process_log(entry)["args"]["tokenIds"]:
                tx_hash = entry["transactionHash"].to_0x_hex()
                if not await self._confirmed(block_number, entry["blockHash"]):
                    raise RetryLater(self.config.poll, f"token {token_id}: {tx_hash} unconfirmed")
                self._log.info(
                    "keeper.already_revealed",
                    token_id=token_id,
                    tx_hash=tx_hash,
                    block=block_number,
                )
                return tx_hash
        raise ChainError(f"token {token_id} is revealed but no TokensRevealed log names it")

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

    def _sign(self, nonce: int, *, to: str, data: bytes, gas: int, fees: Fees) -> Signed:
        signed = self.config.account.sign_transaction(
            {
                "type": 2,
                "chainId": self.config.chain_id,
                "nonce": nonce,
                "to": HexStr(to),
                "data": data,
                "value": 0,
                "gas": gas,
                "maxFeePerGas": fees.max_fee_per_gas,
                "maxPriorityFeePerGas": fees.max_priority_fee_per_gas,
            }
        )
        return Signed(
            raw=bytes(signed.raw_transaction),
            tx_hash=signed.hash.to_0x_hex().lower(),
            nonce=nonce,
            gas_limit=gas,
            fees=fees,
        )

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
        signed = self._filler(nonce, quote.fees)
        if await ledger.gap_filler(self.config.chain_id, self.sender, signed):
            self._log.warning("keeper.gap_filled", nonce=nonce, tx_hash=signed.tx_hash)
            await self._broadcast(signed)

    def _filler(self, nonce: int, fees: Fees) -> Signed:
        to = self.config.account.address
        filler = self._sign(nonce, to=to, data=b"", gas=FILLER_GAS, fees=fees)
        return Signed(filler.raw, filler.tx_hash, nonce, FILLER_GAS, fees, kind="filler")

    # -- broadcast and settle -----------------------------------------------------------------

    async def _broadcast(self, signed: Signed) -> client.Refusal | None:
        """Send the signed bytes; what the node refused them as (None: accepted). Counted in the
        attempt's broadcasts whatever the answer."""
        refused: client.Refusal | None = None
        self.sends += 1
        try:
            await self.w3.eth.send_raw_transaction(signed.raw)
        except Web3RPCError as exc:
            refused = client.refusal(exc)
            if refused not in ("known", "nonce_too_low", "underpriced"):
                self._log.warning(
                    "keeper.send_refused", tx_hash=signed.tx_hash, refusal=refused, error=str(exc)
                )
        except TRANSIENT as exc:  # maybe taken, maybe not: a later rebroadcast settles it
            self._log.warning("keeper.send_unanswered", tx_hash=signed.tx_hash, error=str(exc))
        await ledger.broadcast(signed.tx_hash)
        return refused

    async def _settle(
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
        rebroadcasts and fills as the module docstring says. ``known``: the reveal as just
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
            mined = await self._receipt(reveal)
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
                        await self._spent_by_another(reveal)
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
                await self._rebroadcast_blocking(count, reveal.nonce)
        elif filler_now or (
            latest.signed.kind == "reveal"
            and latest.age >= self.config.stuck_after
            and now >= self._next_replace.get(reveal.id, 0.0)
        ):
            if not await self._replace(reveal, claims, filler=filler_now):
                self._next_replace[reveal.id] = now + self.config.stuck_after
        elif rebroadcast_now or latest.since_broadcast >= self.config.rebroadcast_every:
            refused = await self._broadcast(latest.signed)
            if refused == "other" and latest.signed.kind == "reveal":
                await self._replace(reveal, claims, filler=True)  # refused for good: fill it

    async def _receipt(self, reveal: Reveal) -> _Mined | None:
        """A receipt under any of the reveal's hashes, newest attempt first."""
        for attempt in reversed(reveal.attempts):
            try:
                receipt = await self.w3.eth.get_transaction_receipt(
                    HexBytes(attempt.signed.tx_hash)
                )
            except TransactionNotFound:
                continue
            return _Mined(attempt, receipt)
        return None

    async def _judge(self, reveal: Reveal, mined: _Mined) -> Settled:
        """Confirmed, failed, or unknown (not deep enough yet, or its block was reorged out)."""
        receipt = mined.receipt
        if not await self._confirmed(receipt["blockNumber"], receipt["blockHash"]):
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

    async def _confirmed(self, block_number: int, block_hash: bytes) -> bool:
        """Whether ``block_number`` is ``confirmations`` deep and ``block_hash`` still the
        canonical block at that height."""
        if self.config.confirmations > 1:
            latest = int(await self.w3.eth.block_number)
            if latest - block_number + 1 < self.config.confirmations:
                return False
        block = await self.w3.eth.get_block(block_number)
        return bytes(block.get("hash") or b"") == bytes(block_hash)

    async def _spent_by_another(self, reveal: Reveal) -> bool:
        """The chain's count is past the reveal's nonce and none of its attempts had a receipt.
        A missing receipt proves nothing (a node may count a transaction before it serves its
        receipt; behind a load balancer, two calls may reach two nodes), so the chain is asked
        which transaction took the nonce: the first block where the sender's count passes it,
        searched by bisection, and that block's transaction with this sender and nonce. Spent by
        another only if that transaction is none of the reveal's attempts and its block is
        ``confirmations`` deep and still canonical."""
        assert reveal.nonce is not None
        taker = await self._nonce_taker(reveal.nonce)
        if taker is None:
            return False
        tx_hash, block_number, block_hash = taker
        if tx_hash in {a.signed.tx_hash for a in reveal.attempts}:
            return False  # ours: its receipt will show
        return await self._confirmed(block_number, block_hash)

    async def _nonce_taker(self, nonce: int) -> tuple[str, int, bytes] | None:
        """The transaction from the keeper's address with ``nonce`` on the canonical chain, as
        (hash, block number, block hash); None if the chain has not got it (any more)."""
        address = self.config.account.address
        high = int(await self.w3.eth.block_number)
        if int(await self.w3.eth.get_transaction_count(address, high)) <= nonce:
            return None
        low = 0  # invariant: count at ``high`` > nonce; at ``low - 1`` <= nonce
        while low < high:
            middle = (low + high) // 2
            if int(await self.w3.eth.get_transaction_count(address, middle)) > nonce:
                high = middle
            else:
                low = middle + 1
        block = await self.w3.eth.get_block(high, full_transactions=True)
        for tx in block.get("transactions", []):
            if (
                isinstance(tx, Mapping)
                and str(tx.get("from", "")).lower() == self.sender
                and int(tx.get("nonce", -1)) == nonce
            ):
                tx_hash = HexBytes(tx.get("hash", b"")).to_0x_hex().lower()
                return tx_hash, high, bytes(block.get("hash") or b"")
        return None  # the chain moved under the search (a reorg): look again later

    async def _rebroadcast_blocking(self, start_at: int, below: int) -> None:
        """Send again the newest signed bytes of the earlier nonces this one waits behind."""
        for tx_hash, raw, nonce in await ledger.blocking(self.sender, start_at, below):
            self._log.info("keeper.rebroadcast_blocking", nonce=nonce, tx_hash=tx_hash)
            await self._broadcast(Signed(raw, tx_hash, nonce, 0, Fees(0, 0)))

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
            signed = self._filler(reveal.nonce, fees)
        else:
            original = TypedTransaction.from_bytes(HexBytes(latest.raw)).as_dict()
            signed = self._sign(
                reveal.nonce,
                to=AsyncWeb3.to_checksum_address(original["to"]),
                data=bytes(original["data"]),
                gas=int(original["gas"]),
                fees=fees,
            )
        if not await ledger.add_attempt(claims, reveal.id, signed, sender=self.sender):
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
        await self._broadcast(signed)
        return True
