"""Talking to the fake chain: the async client a reveal handler uses, the control tests use, and
a launcher for the node process.

A reveal handler's round, with the client:

    chain = ChainClient(url)
    nonce = await chain.next_nonce(SENDER)                 # pending transactions included
    tx = sign_reveal(SENDER, nonce, token_ids)             # deterministic: same inputs, same hash
    # ... record tx.hash / tx.raw durably before sending (a crash after the send must find it)
    await chain.send(tx)                                   # "already known" is not an error
    status = await chain.wait(tx.hash, max_wait=30)         # CONFIRMED, REVERTED, UNKNOWN, PENDING

The client speaks plain JSON-RPC over HTTP (stdlib only), one connection per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import selectors
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from glisk.errors import GliskError
from glisk.standins.tx import SignedTx


class ChainError(GliskError):
    """Anything that went wrong talking to the chain."""


class ChainUnavailable(ChainError):
    """No answer (refused, timed out, HTTP 5xx). A transaction being sent may or may not have
    reached the node: ask for its status before building another one."""


class RpcError(ChainError):
    """The node answered with a JSON-RPC error."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"{message} (code {code})")
        self.code = code
        self.message = message
        self.data = data


class NonceTooLow(RpcError):
    """The nonce was already used by a mined transaction (this one or another)."""


class ReplacementUnderpriced(RpcError):
    """Another transaction is pending with this nonce, and this one does not pay enough more."""


class TxStatus(StrEnum):
    PENDING = "pending"  # known to the node, not mined yet
    CONFIRMED = "confirmed"  # mined, succeeded
    REVERTED = "reverted"  # mined, failed: its nonce is spent
    UNKNOWN = "unknown"  # never seen, or dropped: it will not be mined as things stand


@dataclass(frozen=True)
class Sent:
    tx_hash: str
    already_known: bool  # the node had this very transaction already (pending or mined)


@dataclass(frozen=True)
class Receipt:
    tx_hash: str
    block_number: int
    success: bool


class ChainClient:
    """JSON-RPC client for the calls a reveal handler makes. Methods raise ChainUnavailable
    when the node does not answer and RpcError (or a subclass) when it refuses."""

    def __init__(self, url: str, *, timeout: float = 5.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"url: must be http://host:port (got {url!r})")
        self.url = url
        self._host = parts.hostname
        self._port = parts.port or 80
        self._path = parts.path or "/"
        self.timeout = timeout
        self._ids = itertools.count(1)

    async def next_nonce(self, address: str, *, pending: bool = True) -> int:
        """The nonce for the account's next transaction: after its pending ones too when
        ``pending`` (what to sign with), or after its mined ones only. Two workers asking at once
        get the same nonce; the second one's send is then refused (ReplacementUnderpriced while
        the first is pending, NonceTooLow once it is mined): ask again and sign anew."""
        tag = "pending" if pending else "latest"
        return int(await self.call("eth_getTransactionCount", [address, tag]), 16)

    async def send(self, tx: SignedTx) -> Sent:
        """Send a signed transaction. The very same transaction sent again (pending or mined)
        returns its hash with ``already_known``. Raises NonceTooLow, ReplacementUnderpriced,
        ChainUnavailable (the send may have happened), RpcError."""
        try:
            tx_hash = await self.call("eth_sendRawTransaction", [tx.raw])
        except RpcError as exc:
            if exc.message == "already known":
                return Sent(tx.hash, already_known=True)
            if exc.message == "nonce too low":
                raise NonceTooLow(exc.code, exc.message, exc.data) from None
            if exc.message.startswith("replacement transaction underpriced"):
                raise ReplacementUnderpriced(exc.code, exc.message, exc.data) from None
            raise
        return Sent(str(tx_hash), already_known=False)

    async def receipt(self, tx_hash: str) -> Receipt | None:
        """The receipt of a mined transaction; None while pending or when unknown."""
        found = await self.call("eth_getTransactionReceipt", [tx_hash])
        if found is None:
            return None
        return Receipt(
            tx_hash=found["transactionHash"],
            block_number=int(found["blockNumber"], 16),
            success=found["status"] == "0x1",
        )

    async def status(self, tx_hash: str) -> TxStatus:
        """Where a transaction stands: a receipt says mined; otherwise the node either still
        holds it (pending) or does not know it (dropped, replaced, never sent)."""
        receipt = await self.receipt(tx_hash)
        if receipt is not None:
            return TxStatus.CONFIRMED if receipt.success else TxStatus.REVERTED
        known = await self.call("eth_getTransactionByHash", [tx_hash])
        if known is None:
            return TxStatus.UNKNOWN
        # Mined between the two calls: ask again rather than report pending.
        if known.get("blockNumber") is not None:
            return await self.status(tx_hash)
        return TxStatus.PENDING

    async def wait(self, tx_hash: str, *, max_wait: float, poll: float = 0.05) -> TxStatus:
        """Poll until the transaction is no longer pending, or ``max_wait`` seconds pass (then
        PENDING). UNKNOWN is returned at once: a dropped transaction does not come back."""
        deadline = time.monotonic() + max_wait
        while True:
            status = await self.status(tx_hash)
            if status is not TxStatus.PENDING or time.monotonic() >= deadline:
                return status
            await asyncio.sleep(poll)

    async def block_number(self) -> int:
        return int(await self.call("eth_blockNumber", []), 16)

    async def call(self, method: str, params: list[Any]) -> Any:
        """One JSON-RPC call: its result, or RpcError / ChainUnavailable."""
        request = {"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": params}
        status, body = await self._post(json.dumps(request).encode())
        if status >= 500:
            raise ChainUnavailable(f"{method}: HTTP {status} from {self.url}")
        try:
            reply = json.loads(body)
        except ValueError:
            raise ChainError(f"{method}: HTTP {status}, not JSON") from None
        if "error" in reply:
            error = reply["error"]
            raise RpcError(error.get("code", 0), error.get("message", ""), error.get("data"))
        return reply.get("result")

    async def _post(self, payload: bytes) -> tuple[int, bytes]:
        head = (
            f"POST {self._path} HTTP/1.1\r\nHost: {self._host}:{self._port}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
        ).encode()
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(self._host, self._port)
                try:
                    writer.write(head + payload)
                    await writer.drain()
                    data = await reader.read()  # the server closes after its reply
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        except (OSError, TimeoutError) as exc:
            raise ChainUnavailable(f"no answer from {self.url}: {exc!r}") from exc
        header, _, body = data.partition(b"\r\n\r\n")
        try:
            status = int(header.split(b" ", 2)[1])
        except (IndexError, ValueError):
            raise ChainUnavailable(f"no HTTP reply from {self.url}") from None
        return status, body


# -- test-side control ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TxRecord:
    """One transaction as the node saw it. ``state``: pending, mined, dropped, replaced or refused;
    ``status``: success or reverted once mined; ``sends``: how often it was sent."""

    hash: str
    sender: str
    nonce: int
    token_ids: tuple[int, ...]
    state: str
    status: str | None
    block: int | None
    sends: int
    reason: str | None  # why it reverted, or why the node refused it


@dataclass(frozen=True)
class ChainReport:
    block_number: int
    send_calls: int  # eth_sendRawTransaction calls, repeats and refusals included
    transactions: tuple[TxRecord, ...]
    revealed: dict[int, str]  # token id -> the transaction that revealed it

    @property
    def mined(self) -> list[TxRecord]:
        return [tx for tx in self.transactions if tx.state == "mined"]

    @property
    def confirmed(self) -> list[TxRecord]:
        return [tx for tx in self.mined if tx.status == "success"]


class FakeChainControl(ChainClient):
    """The fake node's ``fake_*`` methods, for tests and demos (see glisk.standins.chain)."""

    async def fault(
        self,
        action: str,
        *,
        count: int = 1,
        seconds: float = 1.0,
        token_id: int | None = None,
        tx_hash: str | None = None,
    ) -> None:
        """``drop``, ``delay`` (by ``seconds``), ``fail`` or ``lose_reply`` the next ``count``
        new transactions (only those carrying ``token_id`` if given), or the pending ``tx_hash``."""
        spec: dict[str, Any] = {"action": action, "count": count, "seconds": seconds}
        if token_id is not None:
            spec["token_id"] = token_id
        if tx_hash is not None:
            spec["tx_hash"] = tx_hash
        await self.call("fake_fault", [spec])

    async def chaos(
        self,
        *,
        drop: float = 0.0,
        delay: float = 0.0,
        fail: float = 0.0,
        lose_reply: float = 0.0,
        delay_seconds: float = 1.0,
        seed: int = 0,
    ) -> None:
        """Hit every new transaction with each fault at the given probability."""
        spec = {
            "drop": drop,
            "delay": delay,
            "fail": fail,
            "lose_reply": lose_reply,
            "delay_seconds": delay_seconds,
            "seed": seed,
        }
        await self.call("fake_chaos", [spec])

    async def mine(self) -> int:
        """Mine a block now; its number."""
        return int(await self.call("evm_mine", []), 16)

    async def reset(self) -> None:
        await self.call("fake_reset", [])

    async def report(self) -> ChainReport:
        raw = await self.call("fake_report", [])
        return ChainReport(
            block_number=raw["block_number"],
            send_calls=raw["send_calls"],
            transactions=tuple(
                TxRecord(
                    hash=tx["hash"],
                    sender=tx["sender"],
                    nonce=tx["nonce"],
                    token_ids=tuple(tx["token_ids"]),
                    state=tx["state"],
                    status=tx["status"],
                    block=tx["block"],
                    sends=tx["sends"],
                    reason=tx["reason"],
                )
                for tx in raw["transactions"]
            ),
            revealed={int(token): tx_hash for token, tx_hash in raw["revealed"].items()},
        )


# -- the node process -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunningChain:
    url: str
    process: subprocess.Popen[str]


@contextlib.contextmanager
def fake_chain_process(
    *, block_time: float = 0.05, startup_timeout: float = 15.0
) -> Iterator[RunningChain]:
    """Start the fake node in its own process on a free port; stop it on exit. Worker processes
    reach it at ``.url`` and may be killed at will: the node does not depend on them."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "glisk.standins.chain",
            "--port",
            "0",
            "--block-time",
            str(block_time),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            ready = selector.select(startup_timeout)
        line = process.stdout.readline() if ready else ""
        if not line.startswith("fake chain listening on "):
            raise ChainError(
                f"the fake chain did not start within {startup_timeout:.0f} s "
                f"(exit code {process.poll()}, said {line.strip()!r})"
            )
        yield RunningChain(url=line.rsplit(" ", 1)[1].strip(), process=process)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
