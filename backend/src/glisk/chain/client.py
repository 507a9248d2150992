"""The web3 client glisk uses for every chain call: ``connect(url)`` (no I/O until the first call).

An ``AsyncWeb3`` over HTTP with only the attribute-dict middleware: no ENS lookups, no
validation middleware asking ``eth_chainId`` before calls, no gas-price strategy, so every RPC
call is one the caller made. Its provider counts calls by method (``rpc_calls(w3)``), which is
how the keeper's figures (RPC calls and sends per revealed token) are measured.

Node refusals of ``eth_sendRawTransaction`` differ in wording between nodes (geth, reth,
anvil); ``refusal(exc)`` sorts the ones the keeper acts on. ``transport_error(exc)`` is what may
be said of a failed call: never the URL (where providers put the API key).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter
from typing import Any, Literal

import aiohttp
from web3 import AsyncHTTPProvider, AsyncWeb3
from web3.exceptions import Web3RPCError
from web3.middleware import AttributeDictMiddleware
from web3.types import RPCEndpoint, RPCResponse

Refusal = Literal[
    "known",  # the node holds (or mined) this very transaction: nothing to do
    "nonce_too_low",  # the nonce is spent (by this transaction or another)
    "underpriced",  # another transaction holds the nonce in the pool and pays as much or more
    "fee_too_low",  # below the node's minimum (the base fee rose meanwhile)
    "funds",  # the sender cannot pay for the gas
    "other",
]


# Errors of the transport to the node: it did not answer, or not in time. Waiting may cure them.
TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncio.TimeoutError,
    aiohttp.ClientError,
)


class CountingProvider(AsyncHTTPProvider):
    """AsyncHTTPProvider that counts the calls it makes, by method."""

    def __init__(self, url: str, *, timeout: float) -> None:
        super().__init__(url, request_kwargs={"timeout": aiohttp.ClientTimeout(total=timeout)})
        self.calls: Counter[str] = Counter()

    async def make_request(self, method: RPCEndpoint, params: Any) -> RPCResponse:
        self.calls[str(method)] += 1
        return await super().make_request(method, params)


def connect(url: str, *, timeout: float = 10.0) -> AsyncWeb3:
    """An AsyncWeb3 on ``url`` (http:// or https://); each call is bounded by ``timeout``."""
    # web3's provider logs every request at DEBUG and each disconnect at INFO, URL included
    # (where providers put API keys): only its warnings reach glisk's logs.
    logging.getLogger("web3.providers").setLevel(logging.WARNING)
    return AsyncWeb3(CountingProvider(url, timeout=timeout), middleware=[AttributeDictMiddleware])


def rpc_calls(w3: AsyncWeb3) -> Counter[str]:
    """The calls ``w3`` made so far, by method (empty for a client ``connect`` did not make)."""
    provider = w3.provider
    return provider.calls if isinstance(provider, CountingProvider) else Counter()


async def rpc(w3: AsyncWeb3, method: str, params: list[Any] | None = None) -> Any:
    """A raw JSON-RPC call (anvil's test methods, ``eth_feeHistory`` as the node answers it);
    its result. Raises Web3RPCError on an error answer."""
    response = await w3.provider.make_request(RPCEndpoint(method), params or [])
    if response.get("error"):
        raise Web3RPCError(str(response["error"]), rpc_response=response)
    return response.get("result")


# What nodes say, by refusal (geth, reth, anvil and Erigon word them differently).
_REFUSALS: tuple[tuple[Refusal, tuple[str, ...]], ...] = (
    ("known", ("already known", "already imported", "known transaction")),
    ("nonce_too_low", ("nonce too low", "nonce has already been used")),
    ("underpriced", ("underpriced", "replacement")),
    ("fee_too_low", ("less than block base fee", "fee cap less than")),
    ("funds", ("insufficient funds", "lack of funds")),
)


def refusal(exc: BaseException) -> Refusal:
    """What a node's refusal of a raw transaction means, from its message."""
    message = _message(exc).lower()
    for kind, phrases in _REFUSALS:
        if any(phrase in message for phrase in phrases):
            return kind
    return "other"


def _message(exc: BaseException) -> str:
    if isinstance(exc, Web3RPCError) and isinstance(exc.rpc_response, dict):
        error = exc.rpc_response.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
    return str(exc)


_URL = re.compile(r"\w+://\S+")


def transport_error(exc: BaseException) -> str:
    """What may be logged of a transport error: never a URL (it may carry an API key). An HTTP
    error is its status; anything else its first line, URLs replaced, at most 200 characters."""
    status = getattr(exc, "status", None)
    if isinstance(status, int):  # aiohttp's ClientResponseError prints the URL: say the status
        return f"HTTP {status}"
    text = str(exc).strip().splitlines()
    return _URL.sub("<url>", text[0])[:200] if text else ""
