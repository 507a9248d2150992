"""The keeper's outgoing transactions: signed with its key (EIP-1559, type 2), then sent to the
node. Signing does no I/O and records nothing: the caller records the signed bytes
(``glisk.chain.ledger``) before it asks ``broadcast`` to send them.
"""

from __future__ import annotations

from eth_typing import HexStr
from structlog.typing import FilteringBoundLogger
from web3 import AsyncWeb3
from web3.exceptions import Web3RPCError

from glisk.chain import client, ledger
from glisk.chain.client import TRANSIENT
from glisk.chain.fees import Fees
from glisk.chain.keeper_config import KeeperConfig
from glisk.chain.ledger import Signed

FILLER_GAS = 21_000  # a plain self-send of nothing


class Outbox:
    """Signs for ``config.account`` on ``config.chain_id`` and sends through ``w3``. ``sends``
    counts the eth_sendRawTransaction calls made."""

    def __init__(self, config: KeeperConfig, w3: AsyncWeb3, log: FilteringBoundLogger) -> None:
        self.config = config
        self.w3 = w3
        self.sender = config.account.address.lower()
        self.sends = 0
        self._log = log

    def sign(self, nonce: int, *, to: str, data: bytes, gas: int, fees: Fees) -> Signed:
        """A call of ``to`` with ``data`` at ``nonce``, signed (nothing sent, nothing recorded)."""
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

    def filler(self, nonce: int, fees: Fees) -> Signed:
        """A no-op self-send at ``nonce``: what fills a nonce no reveal can take any more."""
        to = self.config.account.address
        filler = self.sign(nonce, to=to, data=b"", gas=FILLER_GAS, fees=fees)
        return Signed(filler.raw, filler.tx_hash, nonce, FILLER_GAS, fees, kind="filler")

    async def broadcast(self, signed: Signed) -> client.Refusal | None:
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
            self._log.warning(
                "keeper.send_unanswered", tx_hash=signed.tx_hash, error=client.transport_error(exc)
            )
        await ledger.broadcast(signed.tx_hash)
        return refused

    async def rebroadcast_blocking(self, start_at: int, below: int) -> None:
        """Send again the newest signed bytes of the earlier nonces in [start_at, below) that are
        still pending (their holder may be dead, and a later nonce waits behind them)."""
        for tx_hash, raw, nonce in await ledger.blocking(self.sender, start_at, below):
            self._log.info("keeper.rebroadcast_blocking", nonce=nonce, tx_hash=tx_hash)
            await self.broadcast(Signed(raw, tx_hash, nonce, 0, Fees(0, 0)))
