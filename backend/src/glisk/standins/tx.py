"""Reveal transactions as the fake chain takes them.

A transaction is signed by its sender for one nonce; signing is deterministic, so the same
(sender, nonce, token ids, gas price) always gives the same raw bytes and the same hash. That is
what makes a resend after a crash safe: a handler that recorded the raw transaction (or can rebuild
it) sends the very same transaction again, which a node recognises ("already known") instead of
mining a second one. The signature is a stand-in: nothing is verified.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from glisk.errors import GliskError

# GliskNFT.revealTokens takes any number of ids; the backend reveals in batches of at most 50.
MAX_REVEAL_BATCH = 50
DEFAULT_GAS_PRICE = 1_000_000_000  # 1 gwei, in wei
# A pending transaction is replaced only by one paying at least 10% more (geth's default).
REPLACEMENT_BUMP_PERCENT = 10
_ADDRESS = re.compile(r"^0x[a-fA-F0-9]{40}$")


class InvalidTransaction(GliskError, ValueError):
    """Raw bytes that do not decode to a reveal transaction, or fields out of range."""


@dataclass(frozen=True)
class SignedTx:
    """A reveal of ``token_ids`` (on-chain ids) sent by ``sender`` with ``nonce``."""

    sender: str
    nonce: int
    token_ids: tuple[int, ...]
    gas_price: int
    raw: str  # 0x-prefixed hex, what eth_sendRawTransaction takes
    hash: str  # 0x + 64 lowercase hex digits

    def to_json(self) -> dict[str, Any]:
        return {"raw": self.raw, "hash": self.hash}


def sign_reveal(
    sender: str,
    nonce: int,
    token_ids: list[int] | tuple[int, ...],
    *,
    gas_price: int = DEFAULT_GAS_PRICE,
) -> SignedTx:
    """Build and sign a reveal transaction. Raises InvalidTransaction naming the bad field."""
    body = _check(
        {
            "from": sender,
            "nonce": nonce,
            "token_ids": list(token_ids),
            "gas_price": gas_price,
        }
    )
    raw = "0x" + json.dumps(body, sort_keys=True, separators=(",", ":")).encode().hex()
    return decode_raw(raw)


def decode_raw(raw: str) -> SignedTx:
    """The transaction behind raw bytes (as the node reads them). Raises InvalidTransaction."""
    if not isinstance(raw, str) or not raw.startswith("0x"):
        raise InvalidTransaction("raw: must be 0x-prefixed hex")
    try:
        body = json.loads(bytes.fromhex(raw[2:]))
    except (ValueError, UnicodeDecodeError):
        raise InvalidTransaction("raw: does not decode to a transaction") from None
    if not isinstance(body, dict):
        raise InvalidTransaction("raw: does not decode to a transaction")
    body = _check(body)
    return SignedTx(
        sender=body["from"],
        nonce=body["nonce"],
        token_ids=tuple(body["token_ids"]),
        gas_price=body["gas_price"],
        raw=raw,
        hash="0x" + hashlib.sha256(bytes.fromhex(raw[2:])).hexdigest(),
    )


def _check(body: dict[str, Any]) -> dict[str, Any]:
    sender = body.get("from")
    if not isinstance(sender, str) or not _ADDRESS.fullmatch(sender):
        raise InvalidTransaction("from: must be 0x followed by 40 hex digits")
    for field in ("nonce", "gas_price"):
        value = body.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidTransaction(f"{field}: must be an integer >= 0")
    ids = body.get("token_ids")
    if (
        not isinstance(ids, list)
        or not 1 <= len(ids) <= MAX_REVEAL_BATCH
        or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids)
    ):
        raise InvalidTransaction(f"token_ids: must be 1 to {MAX_REVEAL_BATCH} integers >= 0")
    if len(set(ids)) != len(ids):
        raise InvalidTransaction("token_ids: must not repeat a token id")
    nonce, gas_price = body["nonce"], body["gas_price"]
    return {"from": sender, "nonce": nonce, "token_ids": ids, "gas_price": gas_price}
