"""``BatchMinted(minter, promptAuthor, startTokenId, quantity, totalPaid)`` logs decoded into
``MintLog``s, from a node's ``eth_getLogs`` answer or from a webhook's fields.

minter, promptAuthor and startTokenId are indexed (topics 1 to 3); quantity and totalPaid are the
data, two 32-byte words. Addresses come out checksummed. Anything malformed raises
FieldValidationError naming the field and the rule.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import cache, lru_cache
from typing import Any

from glisk.errors import FieldValidationError
from glisk.models import MintLog
from glisk.models.mint_event import MAX_MINT_QUANTITY

BATCH_MINTED = "BatchMinted(address,address,uint256,uint256,uint256)"


@cache
def batch_minted_topic() -> str:
    """topic0 of BatchMinted: keccak256 of its signature, 0x-hex lowercase."""
    from eth_utils.crypto import keccak

    return "0x" + keccak(text=BATCH_MINTED).hex()


def _word(field: str, value: Any) -> int:
    if not isinstance(value, str) or not value.startswith("0x") or len(value) != 66:
        raise FieldValidationError(field, "must be a 32-byte 0x-hex word", value)
    try:
        return int(value, 16)
    except ValueError:
        raise FieldValidationError(field, "must be a 32-byte 0x-hex word", value) from None


def _address(field: str, word: str) -> str:
    number = _word(field, word)
    if number >> 160:
        raise FieldValidationError(field, "must hold a 20-byte address", word)
    return _checksummed(f"{number:040x}")


@lru_cache(maxsize=100_000)
def _checksummed(hex40: str) -> str:
    """EIP-55 checksummed; cached: minters and authors come back again and again, and hashing
    for the checksum was most of the time spent decoding a range."""
    from eth_utils.address import to_checksum_address

    return to_checksum_address("0x" + hex40)


def quantity(value: Any, field: str = "quantity") -> int:
    """A JSON-RPC quantity: an int, or 0x-hex."""
    if isinstance(value, bool):
        raise FieldValidationError(field, "must be an integer or 0x-hex", value)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.startswith(("0x", "0X")):
        try:
            return int(value, 16)
        except ValueError:
            pass
    raise FieldValidationError(field, "must be an integer or 0x-hex", value)


def timestamp(seconds: int) -> datetime:
    """A block's Unix time as the naive UTC datetime the tables hold."""
    return datetime.fromtimestamp(seconds, UTC).replace(tzinfo=None)


def decode(
    *,
    topics: Any,
    data: Any,
    tx_hash: Any,
    log_index: int,
    block_number: int,
    block_hash: str | None,
    block_timestamp: datetime,
) -> MintLog:
    """One BatchMinted log. Raises FieldValidationError (topics, data, or a MintLog field)."""
    if not isinstance(topics, list) or len(topics) != 4:
        raise FieldValidationError("topics", "must be 4 topics (BatchMinted)", topics)
    if str(topics[0]).lower() != batch_minted_topic():
        raise FieldValidationError("topics", "topic0 must be BatchMinted's", topics[0])
    if not isinstance(data, str) or not data.startswith("0x") or len(data) != 2 + 128:
        raise FieldValidationError("data", "must be two 32-byte words (quantity, totalPaid)", data)
    count = int(data[2:66], 16)
    if not 1 <= count <= MAX_MINT_QUANTITY:
        raise FieldValidationError("data", f"quantity must be 1 to {MAX_MINT_QUANTITY}", count)
    return MintLog(
        tx_hash=tx_hash,
        log_index=log_index,
        block_number=block_number,
        block_hash=block_hash,
        block_timestamp=block_timestamp,
        minter=_address("topics", topics[1]),
        author=_address("topics", topics[2]),
        start_token_id=_word("topics", topics[3]),
        quantity=count,
    )


def from_rpc(log: dict[str, Any], block_timestamp: datetime) -> MintLog:
    """A log as ``eth_getLogs`` answers it (hex quantities), minted at ``block_timestamp`` (its
    block's time)."""
    return decode(
        topics=log.get("topics"),
        data=log.get("data"),
        tx_hash=log.get("transactionHash"),
        log_index=quantity(log.get("logIndex"), "logIndex"),
        block_number=quantity(log.get("blockNumber"), "blockNumber"),
        block_hash=log.get("blockHash"),
        block_timestamp=block_timestamp,
    )
