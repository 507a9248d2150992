"""A fake Ethereum node for GLISK's reveal transactions: JSON-RPC over HTTP on 127.0.0.1.

Run it as its own process, shared by every worker and outliving any of them:

    python -m glisk.standins.chain --port 0 --block-time 0.05
    # prints "fake chain listening on http://127.0.0.1:PORT" and serves until killed

It behaves like a node, for what a reveal handler does:
- ``eth_getTransactionCount(address, "latest" | "pending")``: the next nonce, counting mined
  transactions only, or pending ones too.
- ``eth_sendRawTransaction(raw)``: accepts a transaction signed by (sender, nonce) (see
  ``glisk.standins.tx``) and returns its hash. The same transaction sent again, pending or mined,
  is refused as "already known" (error -32000, ``data`` holds its hash); a different transaction
  for a nonce already mined is refused as "nonce too low"; one for a nonce that is pending
  replaces it only when it pays 10% more gas, else "replacement transaction underpriced".
- Mining: every ``block_time`` seconds a block takes, per sender, the pending transactions whose
  nonce is next, in nonce order (a gap holds later nonces back). A transaction is mined at most
  once. Like GliskNFT.revealTokens, a reveal that includes a token id already revealed reverts
  (mined, status 0, nonce consumed).
- ``eth_getTransactionReceipt``: null until mined (pending, or unknown), then ``status`` 0x1 or
  0x0. ``eth_getTransactionByHash``: null for a hash the node does not know (never sent, dropped,
  replaced), else the transaction with ``blockNumber`` null while pending.

And it takes orders, for tests (``fake_*`` methods, see ``FakeChainControl``):
- ``fake_fault``: for the next ``count`` new transactions (optionally only those carrying
  ``token_id``), or for the pending one ``tx_hash``: ``drop`` (accepted, then forgotten: never
  mined, unknown), ``delay`` (not mined before ``seconds``), ``fail`` (mined, reverted), or
  ``lose_reply`` (accepted, but the reply is an HTTP 503, as when a proxy times out).
- ``fake_chaos``: the same faults at random rates for every new transaction (seeded).
- ``fake_report``: every transaction ever sent (refused ones too), its state, the token ids it
  carried and how many times it was sent; the revealed token ids and the transaction that
  revealed each.
- ``evm_mine`` mines a block now; ``fake_reset`` forgets everything.

State lives in memory, behind one lock; time comes from ``time.monotonic`` (injectable).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from glisk.standins.tx import REPLACEMENT_BUMP_PERCENT, InvalidTransaction, SignedTx, decode_raw

FAULTS = ("drop", "delay", "fail", "lose_reply")
SERVER_ERROR = -32000  # geth's code for transaction pool refusals
INVALID_PARAMS = -32602
METHOD_NOT_FOUND = -32601
PARSE_ERROR = -32700


class RpcFault(Exception):
    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


@dataclass
class _Tx:
    signed: SignedTx
    sender: str  # lowercase: nonces are per account, whatever the letter case
    sent_at: float
    state: str = "pending"  # pending, mined, dropped, replaced, refused
    sends: int = 1
    not_before: float = 0.0
    fail: bool = False
    block: int | None = None
    success: bool | None = None
    reason: str | None = None  # why it reverted, or why it was refused

    def as_report(self) -> dict[str, Any]:
        return {
            "hash": self.signed.hash,
            "sender": self.signed.sender,
            "nonce": self.signed.nonce,
            "token_ids": list(self.signed.token_ids),
            "gas_price": self.signed.gas_price,
            "state": self.state,
            "status": None if self.success is None else ("success" if self.success else "reverted"),
            "reason": self.reason,
            "block": self.block,
            "sends": self.sends,
        }


@dataclass
class _Fault:
    action: str
    remaining: int
    seconds: float
    token_id: int | None


class FakeChain:
    """The node's state. ``call`` takes the lock and first mines the blocks that are due."""

    def __init__(
        self, block_time: float = 0.05, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if block_time <= 0:
            raise ValueError("block_time: must be > 0 seconds")
        self.block_time = block_time
        self.clock = clock
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self.block_number = 0
        self._next_block_at = self.clock() + self.block_time
        self._txs: dict[str, _Tx] = {}
        self._pending: dict[tuple[str, int], _Tx] = {}
        self._next_nonce: dict[str, int] = {}
        self._revealed: dict[int, str] = {}
        self._faults: list[_Fault] = []
        self._chaos: dict[str, float] = {}
        self._chaos_seconds = 1.0
        self._rng = random.Random(0)  # noqa: S311  (simulated faults, not secrets)
        self._send_calls = 0

    # -- JSON-RPC ------------------------------------------------------------------------------

    def call(self, method: str, params: list[Any]) -> tuple[Any, bool]:
        """Run one JSON-RPC method: (result, lose_reply). Raises RpcFault."""
        handler = _METHODS.get(method)
        if handler is None:
            raise RpcFault(METHOD_NOT_FOUND, f"the method {method} does not exist")
        with self._lock:
            self._produce_blocks(self.clock())
            try:
                return handler(self, *params)
            except TypeError as exc:
                raise RpcFault(INVALID_PARAMS, f"invalid params for {method}: {exc}") from None

    def _get_transaction_count(self, address: str, tag: str = "latest") -> tuple[str, bool]:
        sender = _address(address)
        nonce = self._next_nonce.get(sender, 0)
        if tag == "pending":
            while (sender, nonce) in self._pending:
                nonce += 1
        elif tag != "latest":
            raise RpcFault(INVALID_PARAMS, "block tag: only 'latest' and 'pending' are known")
        return hex(nonce), False

    def _send_raw_transaction(self, raw: str) -> tuple[str, bool]:
        self._send_calls += 1
        try:
            signed = decode_raw(raw)
        except InvalidTransaction as exc:
            raise RpcFault(INVALID_PARAMS, f"invalid transaction: {exc}") from None
        now = self.clock()
        known = self._txs.get(signed.hash)
        if known is not None and known.state in ("pending", "mined"):
            known.sends += 1
            raise RpcFault(SERVER_ERROR, "already known", signed.hash)
        sender = signed.sender.lower()
        tx = _Tx(signed, sender, sent_at=now)
        if known is not None:  # a dropped, replaced or refused transaction sent again
            tx.sends = known.sends + 1
        if signed.nonce < self._next_nonce.get(sender, 0):
            raise self._refuse(tx, "nonce too low")
        rival = self._pending.get((sender, signed.nonce))
        if rival is not None:
            if signed.gas_price * 100 < rival.signed.gas_price * (100 + REPLACEMENT_BUMP_PERCENT):
                raise self._refuse(tx, "replacement transaction underpriced")
            rival.state = "replaced"
        self._txs[signed.hash] = tx
        self._pending[(sender, signed.nonce)] = tx
        lose_reply = False
        for action, seconds in self._faults_for(signed):
            if action == "lose_reply":
                lose_reply = True
            else:
                self._apply(tx, action, seconds, now)
        return signed.hash, lose_reply

    def _refuse(self, tx: _Tx, reason: str) -> RpcFault:
        # Kept in the report: a refused transaction was still built and sent by someone.
        tx.state, tx.reason = "refused", reason
        self._txs[tx.signed.hash] = tx
        return RpcFault(SERVER_ERROR, reason, tx.signed.hash)

    def _get_transaction_receipt(self, tx_hash: str) -> tuple[Any, bool]:
        tx = self._txs.get(_hash(tx_hash))
        if tx is None or tx.state != "mined":
            return None, False
        receipt = {
            "transactionHash": tx.signed.hash,
            "from": tx.signed.sender,
            "blockNumber": hex(tx.block or 0),
            "status": "0x1" if tx.success else "0x0",
            "logs": [],
        }
        return receipt, False

    def _get_transaction_by_hash(self, tx_hash: str) -> tuple[Any, bool]:
        tx = self._txs.get(_hash(tx_hash))
        if tx is None or tx.state not in ("pending", "mined"):
            return None, False
        found = {
            "hash": tx.signed.hash,
            "from": tx.signed.sender,
            "nonce": hex(tx.signed.nonce),
            "gasPrice": hex(tx.signed.gas_price),
            "input": tx.signed.raw,
            "blockNumber": None if tx.block is None else hex(tx.block),
        }
        return found, False

    def _block_number(self) -> tuple[str, bool]:
        return hex(self.block_number), False

    # -- control -------------------------------------------------------------------------------

    def _fault(self, spec: dict[str, Any]) -> tuple[bool, bool]:
        action = spec.get("action")
        if action not in FAULTS:
            raise RpcFault(INVALID_PARAMS, f"action: must be one of {', '.join(FAULTS)}")
        seconds = float(spec.get("seconds", 1.0))
        tx_hash = spec.get("tx_hash")
        if tx_hash is not None:
            tx = self._txs.get(_hash(tx_hash))
            if tx is None or tx.state != "pending" or action == "lose_reply":
                raise RpcFault(INVALID_PARAMS, "tx_hash: only a pending transaction can be hit")
            self._apply(tx, action, seconds, self.clock())
            return True, False
        count = int(spec.get("count", 1))
        token_id = spec.get("token_id")
        only = None if token_id is None else int(token_id)
        self._faults.append(_Fault(action, count, seconds, only))
        return True, False

    def _set_chaos(self, spec: dict[str, Any]) -> tuple[bool, bool]:
        rates = {name: float(spec.get(name, 0.0)) for name in FAULTS}
        if any(not 0.0 <= rate <= 1.0 for rate in rates.values()):
            raise RpcFault(INVALID_PARAMS, "rates: must be between 0 and 1")
        self._chaos = rates
        self._chaos_seconds = float(spec.get("delay_seconds", 1.0))
        self._rng = random.Random(spec.get("seed", 0))  # noqa: S311
        return True, False

    def _report(self) -> tuple[dict[str, Any], bool]:
        report = {
            "block_number": self.block_number,
            "send_calls": self._send_calls,
            "transactions": [tx.as_report() for tx in self._txs.values()],
            "revealed": {str(token): tx_hash for token, tx_hash in sorted(self._revealed.items())},
        }
        return report, False

    def _mine_now(self) -> tuple[str, bool]:
        self._mine_block(self.clock())
        self._next_block_at = self.clock() + self.block_time
        return hex(self.block_number), False

    def _reset_all(self) -> tuple[bool, bool]:
        self._reset()
        return True, False

    # -- faults and mining ---------------------------------------------------------------------

    def _faults_for(self, signed: SignedTx) -> list[tuple[str, float]]:
        hits: list[tuple[str, float]] = []
        for fault in self._faults:
            if fault.remaining > 0 and (
                fault.token_id is None or fault.token_id in signed.token_ids
            ):
                fault.remaining -= 1
                hits.append((fault.action, fault.seconds))
        self._faults = [f for f in self._faults if f.remaining > 0]
        for action, rate in self._chaos.items():
            if rate and self._rng.random() < rate:
                hits.append((action, self._chaos_seconds))
        return hits

    def _apply(self, tx: _Tx, action: str, seconds: float, now: float) -> None:
        if action == "drop":
            tx.state = "dropped"
            del self._pending[(tx.sender, tx.signed.nonce)]
        elif action == "delay":
            tx.not_before = max(tx.not_before, now + seconds)
        elif action == "fail":
            tx.fail = True

    def _produce_blocks(self, now: float) -> None:
        while self._next_block_at <= now:
            due = self._earliest_due()
            if due is None or due > now:  # nothing minable before now: those blocks are empty
                empty = int((now - self._next_block_at) // self.block_time) + 1
                self.block_number += empty
                self._next_block_at += empty * self.block_time
                return
            if due > self._next_block_at:  # skip to the first block at or after `due`
                empty = math.ceil((due - self._next_block_at) / self.block_time)
                self.block_number += empty
                self._next_block_at += empty * self.block_time
                continue
            self._mine_block(self._next_block_at)
            self._next_block_at += self.block_time

    def _earliest_due(self) -> float | None:
        """When the earliest minable pending transaction (its sender's next nonce) may be mined."""
        times = [
            tx.not_before
            for (sender, nonce), tx in self._pending.items()
            if nonce == self._next_nonce.get(sender, 0)
        ]
        return min(times, default=None)

    def _mine_block(self, at: float) -> None:
        self.block_number += 1
        for sender in sorted({tx.sender for tx in self._pending.values()}):
            nonce = self._next_nonce.get(sender, 0)
            while (tx := self._pending.get((sender, nonce))) is not None and tx.not_before <= at:
                del self._pending[(sender, nonce)]
                self._include(tx)
                nonce += 1
            self._next_nonce[sender] = nonce

    def _include(self, tx: _Tx) -> None:
        tx.state, tx.block = "mined", self.block_number
        already = [t for t in tx.signed.token_ids if t in self._revealed]
        if tx.fail:
            tx.success, tx.reason = False, "execution reverted"
        elif already:
            tx.success, tx.reason = False, f"AlreadyRevealed({already[0]})"
        else:
            tx.success = True
            for token_id in tx.signed.token_ids:
                self._revealed[token_id] = tx.signed.hash


_METHODS: dict[str, Callable[..., tuple[Any, bool]]] = {
    "eth_getTransactionCount": FakeChain._get_transaction_count,
    "eth_sendRawTransaction": FakeChain._send_raw_transaction,
    "eth_getTransactionReceipt": FakeChain._get_transaction_receipt,
    "eth_getTransactionByHash": FakeChain._get_transaction_by_hash,
    "eth_blockNumber": FakeChain._block_number,
    "evm_mine": FakeChain._mine_now,
    "fake_fault": FakeChain._fault,
    "fake_chaos": FakeChain._set_chaos,
    "fake_report": FakeChain._report,
    "fake_reset": FakeChain._reset_all,
}


def _address(value: Any) -> str:
    if not isinstance(value, str) or len(value) != 42 or not value.startswith("0x"):
        raise RpcFault(INVALID_PARAMS, "address: must be 0x followed by 40 hex digits")
    return value.lower()


def _hash(value: Any) -> str:
    if not isinstance(value, str) or len(value) != 66 or not value.startswith("0x"):
        raise RpcFault(INVALID_PARAMS, "hash: must be 0x followed by 64 hex digits")
    return value.lower()


# -- HTTP ----------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    chain: FakeChain  # set on the subclass made by make_server
    timeout = 10  # a client that dies mid-request frees its thread after this many seconds

    def do_POST(self) -> None:
        try:
            length = int(self.headers.get("Content-Length", "0"))
            request = json.loads(self.rfile.read(length))
        except ValueError:
            self._reply(200, _error(None, PARSE_ERROR, "parse error"))
            return
        if isinstance(request, list):
            replies = [self._one(item) for item in request]
            lost = any(lose for _, lose in replies)
            body: Any = [reply for reply, _ in replies]
        else:
            body, lost = self._one(request)
        if lost:
            self._reply(503, {"error": "upstream timed out"})
        else:
            self._reply(200, body)

    def _one(self, request: Any) -> tuple[dict[str, Any], bool]:
        if not isinstance(request, dict) or not isinstance(request.get("method"), str):
            return _error(None, INVALID_PARAMS, "not a JSON-RPC request"), False
        params = request.get("params") or []
        if isinstance(params, dict):
            params = [params]
        try:
            result, lost = self.chain.call(request["method"], list(params))
        except RpcFault as fault:
            return _error(request.get("id"), fault.code, fault.message, fault.data), False
        return {"jsonrpc": "2.0", "id": request.get("id"), "result": result}, lost

    def _reply(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        # A client that died (SIGKILLed workers are the point of the chaos tests) is no error.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request would drown the test output


def _error(request_id: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": request_id, "error": error}


def make_server(chain: FakeChain, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """An HTTP server for ``chain`` (port 0: a free one); the caller runs serve_forever()."""
    handler = type("FakeChainHandler", (_Handler,), {"chain": chain})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m glisk.standins.chain", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8545)
    parser.add_argument("--block-time", type=float, default=0.05, help="seconds per block")
    args = parser.parse_args(argv)
    server = make_server(FakeChain(block_time=args.block_time), args.host, args.port)
    host, port = server.server_address[:2]
    print(f"fake chain listening on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    sys.exit(0)


if __name__ == "__main__":
    main()
