"""What the keeper reads back from the chain, never from its own records: a receipt under any hash
of a reveal, whether a block is deep enough and still canonical, which transaction took a nonce,
and which transaction revealed a token. Reads only; it records and sends nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from hexbytes import HexBytes
from structlog.typing import FilteringBoundLogger
from web3 import AsyncWeb3
from web3.contract import AsyncContract
from web3.exceptions import TransactionNotFound
from web3.types import TxReceipt

from glisk.chain import ledger
from glisk.chain.keeper_config import KeeperConfig
from glisk.chain.ledger import Reveal
from glisk.errors import ChainError, RetryLater


@dataclass(frozen=True)
class Mined:
    """A receipt the chain holds for one of a reveal's attempts."""

    attempt: ledger.Attempt
    receipt: TxReceipt


class ChainWatch:
    """The chain as the keeper of ``config.account`` sees it through ``w3``."""

    def __init__(
        self,
        config: KeeperConfig,
        w3: AsyncWeb3,
        contract: AsyncContract,
        log: FilteringBoundLogger,
    ) -> None:
        self.config = config
        self.w3 = w3
        self.contract = contract
        self.sender = config.account.address.lower()
        self._log = log

    async def receipt(self, reveal: Reveal) -> Mined | None:
        """A receipt under any of the reveal's hashes, newest attempt first."""
        for attempt in reversed(reveal.attempts):
            try:
                receipt = await self.w3.eth.get_transaction_receipt(
                    HexBytes(attempt.signed.tx_hash)
                )
            except TransactionNotFound:
                continue
            return Mined(attempt, receipt)
        return None

    async def confirmed(self, block_number: int, block_hash: bytes) -> bool:
        """Whether ``block_number`` is ``confirmations`` deep and ``block_hash`` still the
        canonical block at that height."""
        if self.config.confirmations > 1:
            latest = int(await self.w3.eth.block_number)
            if latest - block_number + 1 < self.config.confirmations:
                return False
        block = await self.w3.eth.get_block(block_number)
        return bytes(block.get("hash") or b"") == bytes(block_hash)

    async def spent_by_another(self, reveal: Reveal) -> bool:
        """The chain's count is past the reveal's nonce and none of its attempts had a receipt.
        A missing receipt proves nothing (a node may count a transaction before it serves its
        receipt; behind a load balancer, two calls may reach two nodes), so the chain is asked
        which transaction took the nonce: the first block where the sender's count passes it,
        searched by bisection, and that block's transaction with this sender and nonce. Spent by
        another only if that transaction is none of the reveal's attempts and its block is
        ``confirmations`` deep and still canonical."""
        assert reveal.nonce is not None
        taker = await self.nonce_taker(reveal.nonce)
        if taker is None:
            return False
        tx_hash, block_number, block_hash = taker
        if tx_hash in {a.signed.tx_hash for a in reveal.attempts}:
            return False  # ours: its receipt will show
        return await self.confirmed(block_number, block_hash)

    async def nonce_taker(self, nonce: int) -> tuple[str, int, bytes] | None:
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

    async def revealed_by(self, token_id: int) -> str:
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
                if not await self.confirmed(block_number, entry["blockHash"]):
                    raise RetryLater(self.config.poll, f"token {token_id}: {tx_hash} unconfirmed")
                self._log.info(
                    "keeper.already_revealed",
                    token_id=token_id,
                    tx_hash=tx_hash,
                    block=block_number,
                )
                return tx_hash
        raise ChainError(f"token {token_id} is revealed but no TokensRevealed log names it")
