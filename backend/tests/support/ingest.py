"""What the ingest tests share: a follower on a test chain, a node that refuses large log ranges
(as hosted providers do), the canonical logs read back from the chain, and Alchemy payloads built
and signed the way Alchemy does."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC
from typing import Any

from web3 import AsyncWeb3
from web3.middleware import AttributeDictMiddleware
from web3.types import RPCEndpoint, RPCResponse

from glisk.chain.client import CountingProvider
from glisk.ingest.alchemy import SIGNATURE_HEADER, signature
from glisk.ingest.follower import Follower, FollowerOptions
from glisk.ingest.logs import batch_minted_topic
from glisk.ingest.node import Node
from glisk.models import MintLog
from glisk.uow import UnitOfWorkFactory

# Alchemy's own words for a refused eth_getLogs (its 2K-block rule).
REFUSAL = (
    "Log response size exceeded. You can make eth_getLogs requests with up to a 2K block range "
    "and no limit on the response size, or you can request any block range with a cap of 10K "
    "logs in the response."
)


class RangeLimitedProvider(CountingProvider):
    """A provider whose node refuses eth_getLogs over more than ``limit`` blocks, and can be told
    to answer with no logs (``drop_logs``: an incomplete answer, as a lagging replica gives) or
    with logs that do not carry their block's time (``drop_timestamps``, as older nodes do)."""

    def __init__(self, url: str, *, limit: int, timeout: float = 10.0) -> None:
        super().__init__(url, timeout=timeout)
        self.limit = limit
        self.refused = 0
        self.spans: list[int] = []  # every eth_getLogs range asked for, in blocks
        self.drop_logs = False
        self.drop_timestamps = False

    async def make_request(self, method: RPCEndpoint, params: Any) -> RPCResponse:
        if method == "eth_getLogs":
            query = params[0]
            span = int(query["toBlock"], 16) - int(query["fromBlock"], 16) + 1
            self.spans.append(span)
            if span > self.limit:
                self.calls[str(method)] += 1
                self.refused += 1
                return {"jsonrpc": "2.0", "id": 1, "error": {"code": -32602, "message": REFUSAL}}
            if self.drop_logs:
                self.calls[str(method)] += 1
                return {"jsonrpc": "2.0", "id": 1, "result": []}
        response = await super().make_request(method, params)
        if method == "eth_getLogs" and self.drop_timestamps:
            for log in response.get("result") or []:
                log.pop("blockTimestamp", None)
        return response


@asynccontextmanager
async def limited_node(url: str, contract: str, *, limit: int) -> AsyncIterator[Node]:
    """A Node whose provider is a RangeLimitedProvider (``node.w3.provider``)."""
    w3 = AsyncWeb3(RangeLimitedProvider(url, limit=limit), middleware=[AttributeDictMiddleware])
    try:
        yield Node(w3, contract)
    finally:
        await w3.provider.disconnect()


def limits(node: Node) -> RangeLimitedProvider:
    provider = node.w3.provider
    assert isinstance(provider, RangeLimitedProvider)
    return provider


def follower(
    w3_or_node: AsyncWeb3 | Node,
    contract: str,
    uow_factory: UnitOfWorkFactory,
    *,
    max_range: int = 2000,
    **options: Any,
) -> Follower:
    """A follower with test defaults: no confirmations, quick polls, no gap pass."""
    defaults: dict[str, Any] = {"confirmations": 0, "poll_interval": 0.05, "gap_interval": 0}
    node = (
        w3_or_node
        if isinstance(w3_or_node, Node)
        else Node(w3_or_node, contract, max_range=max_range)
    )
    return Follower(node, uow_factory, FollowerOptions(**defaults | options))


async def canonical_logs(w3: AsyncWeb3, contract: str) -> list[MintLog]:
    """Every BatchMinted log on the node's chain now, decoded."""
    node = Node(w3, contract)
    return await node.mint_logs(0, await node.head())


def alchemy_payload(
    contract: str,
    block: dict[str, Any],
    logs: Sequence[MintLog],
    *,
    removed: bool = False,
    extra_logs: Sequence[dict[str, Any]] = (),
    event_id: str = "whevt_test",
) -> bytes:
    """An Alchemy custom-webhook body for ``logs`` of one block (``block``: hash, number,
    timestamp), each encoded back into topics and data as the node has them."""
    entries: list[dict[str, Any]] = []
    for log in logs:
        entry: dict[str, Any] = {
            "data": "0x" + f"{log.quantity:064x}" + "0" * 64,
            "topics": [
                batch_minted_topic(),
                "0x" + log.minter[2:].lower().rjust(64, "0"),
                "0x" + log.author[2:].lower().rjust(64, "0"),
                "0x" + f"{log.start_token_id:064x}",
            ],
            "index": log.log_index,
            "account": {"address": contract.lower()},
            "transaction": {"hash": log.tx_hash},
        }
        if removed:
            entry["removed"] = True
        entries.append(entry)
    body = {
        "webhookId": "wh_test",
        "id": event_id,
        "createdAt": "2026-11-28T09:00:00.000Z",
        "type": "GRAPHQL",
        "event": {
            "data": {"block": {**block, "logs": [*entries, *extra_logs]}},
            "sequenceNumber": "10000000000578619000",
            "network": "ETH_MAINNET",
        },
    }
    return json.dumps(body).encode()


def block_of(log: MintLog) -> dict[str, Any]:
    return {
        "hash": log.block_hash,
        "number": log.block_number,
        "timestamp": int(log.block_timestamp.replace(tzinfo=UTC).timestamp()),
    }


def signed(key: str, body: bytes) -> dict[str, str]:
    return {SIGNATURE_HEADER: signature(key, body), "Content-Type": "application/json"}
