"""EIP-1559 fees for the keeper: a quote from ``eth_feeHistory``, a cap, and replacement bumps.

- ``quote``: the next block's base fee (the last entry of ``baseFeePerGas``) and a priority fee
  (the median of the recent blocks' ``percentile`` rewards, at least ``priority_floor``);
  ``maxFeePerGas = 2 * base + priority`` (room for six full blocks of base-fee rises), cut to the
  cap.
- ``affordable``: whether the next block can include a transaction at all under the cap
  (``base + priority <= cap``). A batch that cannot be afforded waits (RetryLater) instead of
  overpaying; a transaction in flight is never replaced above the cap.
- ``bump``: fees for a replacement of a stuck transaction: at least ``REPLACEMENT_BUMP`` (12.5%,
  what reth and Erigon demand; geth asks 10%) more on both fields, and at least today's quote;
  None when that would exceed the cap.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from statistics import median

from web3 import AsyncWeb3

from glisk.chain import client

GWEI = 10**9
# Replacement: both fee fields at least this much higher (numerator / denominator: 12.5%).
REPLACEMENT_BUMP = (9, 8)


@dataclass(frozen=True)
class Fees:
    max_fee_per_gas: int  # wei
    max_priority_fee_per_gas: int  # wei

    def at_least_bumped_from(self, old: Fees) -> bool:
        num, den = REPLACEMENT_BUMP
        return (
            self.max_fee_per_gas * den >= old.max_fee_per_gas * num
            and self.max_priority_fee_per_gas * den >= old.max_priority_fee_per_gas * num
        )


@dataclass(frozen=True)
class Quote:
    base_fee: int  # the next block's, wei
    priority: int  # wei
    fees: Fees  # what a new transaction would be signed with (under the cap)


def gwei(wei: int) -> str:
    """Wei as gwei for logs and tables: '1.5'."""
    return f"{Decimal(wei) / GWEI:.9f}".rstrip("0").rstrip(".")


class FeePolicy:
    """Fees under a cap (``cap``: the most maxFeePerGas a keeper transaction may offer, in wei).
    Asks the node once per quote; no state between calls."""

    def __init__(
        self,
        cap: int,
        *,
        blocks: int = 10,
        percentile: float = 50.0,
        priority_floor: int = 10**7,  # 0.01 gwei: empty recent blocks report a 0 reward
    ) -> None:
        if cap <= 0:
            raise ValueError("cap: must be > 0 wei")
        self.cap = cap
        self.blocks = blocks
        self.percentile = percentile
        self.priority_floor = priority_floor

    async def quote(self, w3: AsyncWeb3) -> Quote:
        history = await client.rpc(
            w3, "eth_feeHistory", [hex(self.blocks), "latest", [self.percentile]]
        )
        base = int(history["baseFeePerGas"][-1], 16)
        rewards = [int(r[0], 16) for r in history.get("reward") or [] if r]
        nonzero = [r for r in rewards if r > 0]
        priority = max(self.priority_floor, int(median(nonzero)) if nonzero else 0)
        priority = min(priority, self.cap)
        return Quote(base, priority, Fees(min(self.cap, 2 * base + priority), priority))

    def affordable(self, quote: Quote) -> bool:
        return quote.base_fee + quote.priority <= self.cap

    def bump(self, old: Fees, quote: Quote) -> Fees | None:
        """Fees to replace a transaction signed with ``old``; None if only above the cap."""
        num, den = REPLACEMENT_BUMP
        priority = max(quote.priority, -(-old.max_priority_fee_per_gas * num // den))
        max_fee = max(quote.fees.max_fee_per_gas, -(-old.max_fee_per_gas * num // den))
        max_fee = max(max_fee, priority)
        if max_fee > self.cap:
            return None
        return Fees(max_fee, priority)
