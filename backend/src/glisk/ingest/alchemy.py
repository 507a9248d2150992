"""Alchemy custom-webhook (``GRAPHQL``) deliveries: the signature checked, the payload decoded.

**Signature.** Alchemy signs the raw request body with the webhook's signing key: the
``X-Alchemy-Signature`` header is the hex HMAC-SHA256 of the body, nothing else (no prefix, no
timestamp). ``signature_valid`` recomputes it and compares in constant time.

**Payload.** The webhook runs a GraphQL query on every new block and posts the result::

    {"webhookId": "wh_...", "id": "whevt_...", "createdAt": "...", "type": "GRAPHQL",
     "event": {"data": {"block": {"hash": "0x...", "number": 123, "timestamp": 1700000000,
                                  "logs": [{"data": "0x...", "topics": ["0x...", ...],
                                            "index": 7, "account": {"address": "0x..."},
                                            "transaction": {"hash": "0x..."}}]}},
               "sequenceNumber": "...", "network": "BASE_MAINNET"}}

The query GLISK needs (README): ``block { hash number timestamp logs(filter: {addresses:
[CONTRACT], topics: [[BATCH_MINTED_TOPIC]]}) { data topics index account { address }
transaction { hash } } }``. Logs nested under ``block.transactions[].logs`` are read too. A log
may carry ``removed: true`` (its block was orphaned). Logs of another contract or event are
counted as ignored; anything malformed raises FieldValidationError naming the field (its JSON
path) and the rule.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any

from glisk.errors import FieldValidationError
from glisk.ingest import logs as decoding
from glisk.models import MintLog

SIGNATURE_HEADER = "X-Alchemy-Signature"

# Alchemy's network names and their chain ids. A contract deployed from the same account and
# nonce has the same address on every chain: the network is what tells a Base Sepolia payload
# from a Base one.
NETWORKS = {
    "ETH_MAINNET": 1,
    "ETH_SEPOLIA": 11155111,
    "ETH_HOLESKY": 17000,
    "BASE_MAINNET": 8453,
    "BASE_SEPOLIA": 84532,
    "OPT_MAINNET": 10,
    "OPT_SEPOLIA": 11155420,
    "ARB_MAINNET": 42161,
    "ARB_SEPOLIA": 421614,
    "MATIC_MAINNET": 137,
}


def check_network(payload: Payload, chain_id: int | None) -> None:
    """Raise FieldValidationError when the payload names a known network that is not
    ``chain_id``'s (nothing is checked without a chain id or for a network not listed)."""
    known = NETWORKS.get(payload.network or "")
    if chain_id is not None and known is not None and known != chain_id:
        raise FieldValidationError(
            "event.network", f"must be the network of CHAIN_ID {chain_id}", payload.network
        )


def signature(key: str, body: bytes) -> str:
    """The X-Alchemy-Signature of ``body`` under ``key`` (hex HMAC-SHA256)."""
    return hmac.new(key.encode(), body, hashlib.sha256).hexdigest()


def signature_valid(key: str | None, body: bytes, given: str | None) -> bool:
    """Whether ``given`` is the signature of ``body`` under ``key``; False without a key or a
    signature. Constant time in the signature's content."""
    if not key or not given:
        return False
    return hmac.compare_digest(signature(key, body).encode(), given.strip().lower().encode())


@dataclass(frozen=True)
class Delivered:
    log: MintLog
    removed: bool = False


@dataclass(frozen=True)
class Payload:
    """A decoded delivery: its ids (for the log), its network, the GLISK mint logs it carries
    (in payload order) and how many other logs it carried."""

    webhook_id: str | None
    event_id: str | None
    network: str | None
    logs: list[Delivered]
    ignored: int = 0


def _get(obj: Any, key: str, path: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise FieldValidationError(f"{path}.{key}" if path else key, "is required", None)
    return obj[key]


def parse(body: bytes, *, contract: str) -> Payload:
    """Decode a delivery's body; only BatchMinted logs emitted by ``contract`` are kept."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise FieldValidationError("body", "must be a JSON object", None) from None
    if not isinstance(document, dict):
        raise FieldValidationError("body", "must be a JSON object", None)
    kind = document.get("type")
    if kind != "GRAPHQL":
        raise FieldValidationError("type", "must be GRAPHQL (an Alchemy custom webhook)", kind)
    event = _get(document, "event", "")
    block = _get(_get(event, "data", "event"), "block", "event.data")
    path = "event.data.block"
    raw_logs: list[tuple[str, dict[str, Any], str | None]] = []
    for i, item in enumerate(block.get("logs") or []):
        raw_logs.append((f"{path}.logs[{i}]", item, None))
    for t, tx in enumerate(block.get("transactions") or []):
        tx_hash = tx.get("hash") if isinstance(tx, dict) else None
        for i, item in enumerate((tx or {}).get("logs") or []):
            raw_logs.append((f"{path}.transactions[{t}].logs[{i}]", item, tx_hash))
    if not raw_logs:
        return Payload(document.get("webhookId"), document.get("id"), event.get("network"), [])
    number = decoding.quantity(_get(block, "number", path), f"{path}.number")
    stamp = decoding.quantity(_get(block, "timestamp", path), f"{path}.timestamp")
    block_hash = _get(block, "hash", path)
    wanted_address = contract.lower()
    topic = decoding.batch_minted_topic()
    found: list[Delivered] = []
    ignored = 0
    for where, item, tx_hash in raw_logs:
        if not isinstance(item, dict):
            raise FieldValidationError(where, "must be an object", None)
        address = _get(_get(item, "account", where), "address", f"{where}.account")
        topics = _get(item, "topics", where)
        if str(address).lower() != wanted_address or not topics or str(topics[0]).lower() != topic:
            ignored += 1
            continue
        if tx_hash is None:
            tx_hash = _get(_get(item, "transaction", where), "hash", f"{where}.transaction")
        try:
            log = decoding.decode(
                topics=topics,
                data=_get(item, "data", where),
                tx_hash=tx_hash,
                log_index=decoding.quantity(_get(item, "index", where), f"{where}.index"),
                block_number=number,
                block_hash=block_hash,
                block_timestamp=decoding.timestamp(stamp),
            )
        except FieldValidationError as exc:
            raise FieldValidationError(f"{where}.{exc.field}", exc.rule) from None
        removed = item.get("removed", False)
        if not isinstance(removed, bool):
            raise FieldValidationError(f"{where}.removed", "must be true or false", removed)
        found.append(Delivered(log, removed))
    return Payload(
        document.get("webhookId"), document.get("id"), event.get("network"), found, ignored
    )
