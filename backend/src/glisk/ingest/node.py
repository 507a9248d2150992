"""What the follower asks the node: the head, a block's hash and time, the GLISK contract's
``BatchMinted`` logs over a block range, and ``nextTokenId()`` at a block.

Raw JSON-RPC through the web3 client's provider (``glisk.chain.client.connect``: calls counted,
each bounded by its timeout), so a node's refusal reaches us as the node worded it.

**Adaptive ranges.** Providers refuse an ``eth_getLogs`` over too many blocks or with too many
results, each in its own words (Alchemy: "Log response size exceeded ... 2K block range";
Infura: "query returned more than 10000 results"; QuickNode, Ankr, geth: "block range ... too
large", "limit exceeded"). ``logs(first, last)`` asks for at most ``span`` blocks at a time; a
refused range is split in two and each half asked for again, down to one block, and ``span``
halves so the next ranges start smaller; after ``GROW_AFTER`` answers in a row it doubles again,
up to ``max_range`` but never to a span that was refused (until the process restarts). Any other
failure (a node that does not answer, an HTTP error, an error that is not about the range) raises
NodeUnavailable: the follower waits and tries again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from web3 import AsyncWeb3
from web3.types import RPCEndpoint

from glisk.chain.client import transport_error
from glisk.errors import GliskError
from glisk.ingest import logs as decoding
from glisk.ingest.logs import batch_minted_topic, quantity
from glisk.models import MintLog

GROW_AFTER = 4  # ranges answered in a row before the span doubles again

# How nodes word "this range is too large" (lowercase fragments). -32005 is the code Infura and
# others give for "limit exceeded".
_RANGE_PHRASES = (
    "block range",
    "range is too",
    "range too",
    "too many",
    "more than",
    "limit exceeded",
    "exceed",
    "response size",
    "too large",
    "query timeout",
)
_RANGE_CODES = (-32005,)


class NodeUnavailable(GliskError):
    """The node did not answer, or answered an error other than a range refusal. One line,
    never the URL (it may carry an API key)."""


class ChainMoved(GliskError):
    """The chain changed while it was being read (a block vanished, a hash changed): read
    again."""


class RangeRefused(GliskError):
    """The node refused an eth_getLogs range as too large (internal: ``logs`` splits it)."""


@dataclass(frozen=True)
class Block:
    number: int
    hash: str  # lowercase 0x-hex
    parent_hash: str
    timestamp: int  # Unix seconds


def range_refusal(error: Any) -> bool:
    """Whether a JSON-RPC error object says the log range was too large. A rate limit is not
    (Infura answers -32005 for both): splitting would only send more requests."""
    if not isinstance(error, dict):
        return False
    message = str(error.get("message", "")).lower()
    if "rate" in message or "too many requests" in message:
        return False
    return error.get("code") in _RANGE_CODES or any(p in message for p in _RANGE_PHRASES)


class Node:
    """The chain as the follower reads it. No I/O until a method is awaited."""

    def __init__(self, w3: AsyncWeb3, contract: str, *, max_range: int = 2000) -> None:
        if max_range < 1:
            raise ValueError("max_range must be at least 1")
        self.w3 = w3
        self.contract = AsyncWeb3.to_checksum_address(contract)
        self.max_range = max_range
        self.span = max_range
        self.splits = 0  # ranges refused and split, since start
        self._answered = 0
        self._ceiling = max_range  # the largest span not known to be refused

    async def call(self, method: str, params: list[Any]) -> Any:
        """One JSON-RPC call; its result. Raises RangeRefused for a range refusal of
        eth_getLogs, NodeUnavailable for anything else that went wrong."""
        try:
            response = await self.w3.provider.make_request(RPCEndpoint(method), params)
        except TimeoutError as exc:
            raise NodeUnavailable(f"{method}: no answer in time") from exc
        except Exception as exc:  # aiohttp, HTTP status, decoding: the node is not usable now
            said = transport_error(exc)
            raise NodeUnavailable(f"{method}: {type(exc).__name__}: {said}") from exc
        error = response.get("error")
        if error:
            if method == "eth_getLogs" and range_refusal(error):
                raise RangeRefused(str(error.get("message", error)))
            message = error.get("message", error) if isinstance(error, dict) else error
            raise NodeUnavailable(f"{method}: {message}")
        return response.get("result")

    async def head(self) -> int:
        return quantity(await self.call("eth_blockNumber", []), "eth_blockNumber")

    async def block(self, number: int) -> Block | None:
        """The block at ``number`` on the node's chain now, or None past its head."""
        return _block(await self.call("eth_getBlockByNumber", [hex(number), False]))

    async def block_by_hash(self, block_hash: str) -> Block | None:
        return _block(await self.call("eth_getBlockByHash", [block_hash, False]))

    async def next_token_id(self, block: int) -> int | None:
        """The contract's ``nextTokenId()`` as of ``block``; None when the node answers nothing
        (no contract code there: a block before the deployment, or anvil in the middle of
        switching chains)."""
        selector = "0x" + _selector("nextTokenId()")
        result = await self.call("eth_call", [{"to": self.contract, "data": selector}, hex(block)])
        if result in (None, "", "0x"):
            return None
        return quantity(result, "nextTokenId")

    async def logs(self, first: int, last: int) -> list[dict[str, Any]]:
        """Every BatchMinted log of the contract in blocks ``first..last``, in chain order
        (block, then log index). Splits refused ranges (see the module's docstring). Raises
        NodeUnavailable, or RangeRefused when even one block is refused."""
        found: list[dict[str, Any]] = []
        start = first
        while start <= last:
            end = min(last, start + self.span - 1)
            try:
                found += await self._get_logs(start, end)
            except RangeRefused:
                if end == start:
                    raise
                self.splits += 1
                self._answered = 0
                self._ceiling = min(self._ceiling, end - start)
                self.span = max(1, (end - start + 1) // 2)
                continue
            self._answered += 1
            if self._answered >= GROW_AFTER and self.span < self._ceiling:
                self.span = min(self._ceiling, self.span * 2)
                self._answered = 0
            start = end + 1
        found.sort(key=lambda log: (quantity(log["blockNumber"]), quantity(log["logIndex"])))
        return found

    async def mint_logs(self, first: int, last: int) -> list[MintLog]:
        """``logs(first, last)`` decoded, each minted at its block's time: the log's
        ``blockTimestamp`` when the node gives it (anvil, recent geth and reth do), else the
        block's, asked once per block by hash. Raises ChainMoved when a log's block is gone,
        FieldValidationError for a log that is not a BatchMinted log."""
        return await self.decode(await self.logs(first, last))

    async def decode(self, raw: list[dict[str, Any]]) -> list[MintLog]:
        """Raw eth_getLogs entries decoded (see ``mint_logs``)."""
        times: dict[str, int] = {}
        decoded: list[MintLog] = []
        for item in raw:
            block_hash = str(item.get("blockHash", "")).lower()
            if block_hash not in times:
                if item.get("blockTimestamp") is not None:
                    times[block_hash] = quantity(item["blockTimestamp"], "blockTimestamp")
                else:
                    found = await self.block_by_hash(block_hash)
                    if found is None:
                        raise ChainMoved(f"block {block_hash} of a log is no longer known")
                    times[block_hash] = found.timestamp
            decoded.append(decoding.from_rpc(item, decoding.timestamp(times[block_hash])))
        return decoded

    async def _get_logs(self, first: int, last: int) -> list[dict[str, Any]]:
        result = await self.call(
            "eth_getLogs",
            [
                {
                    "address": self.contract,
                    "fromBlock": hex(first),
                    "toBlock": hex(last),
                    "topics": [batch_minted_topic()],
                }
            ],
        )
        if not isinstance(result, list):
            raise NodeUnavailable(f"eth_getLogs: answered {type(result).__name__}, not a list")
        return result


def _block(raw: Any) -> Block | None:
    if raw is None:
        return None
    return Block(
        number=quantity(raw["number"], "number"),
        hash=str(raw["hash"]).lower(),
        parent_hash=str(raw["parentHash"]).lower(),
        timestamp=quantity(raw["timestamp"], "timestamp"),
    )


def _selector(signature: str) -> str:
    from eth_utils.crypto import keccak

    return keccak(text=signature)[:4].hex()
