"""Write-time rules shared by the models; the migration states the same rules as CHECKs.

Every rule raises ``FieldValidationError`` (a ValueError) naming the field and the rule, so a
caller (or an HTTP handler) can report it without parsing text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from enum import StrEnum
from typing import Any, TypeVar

from glisk.errors import FieldValidationError

WALLET_PATTERN = r"^0x[a-fA-F0-9]{40}$"
TX_HASH_PATTERN = r"^0x[a-fA-F0-9]{64}$"
# Stored form: transaction hashes carry no checksum, so they are kept lowercase and the unique
# (tx_hash, log_index) key cannot be dodged by changing letter case.
TX_HASH_STORED_PATTERN = r"^0x[a-f0-9]{64}$"
STATE_KEY_PATTERN = r"^[A-Za-z0-9_]+$"

_WALLET = re.compile(WALLET_PATTERN)
_TX_HASH = re.compile(TX_HASH_PATTERN)
_STATE_KEY = re.compile(STATE_KEY_PATTERN)

E = TypeVar("E", bound=StrEnum)


def wallet(field: str, value: Any) -> str:
    if not isinstance(value, str) or not _WALLET.fullmatch(value):
        raise FieldValidationError(field, "must be 0x followed by 40 hex digits", value)
    return value


def tx_hash(field: str, value: Any) -> str:
    """Validate and normalise to lowercase."""
    if not isinstance(value, str) or not _TX_HASH.fullmatch(value):
        raise FieldValidationError(field, "must be 0x followed by 64 hex digits", value)
    return value.lower()


def optional_tx_hash(field: str, value: Any) -> str | None:
    return None if value is None else tx_hash(field, value)


def text_length(field: str, value: Any, minimum: int, maximum: int) -> str:
    if not isinstance(value, str) or not minimum <= len(value) <= maximum:
        raise FieldValidationError(field, f"must be {minimum} to {maximum} characters", value)
    return value


def optional_text(field: str, value: Any, maximum: int) -> str | None:
    if value is None:
        return None
    return text_length(field, value, 1, maximum)


def int_at_least(field: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise FieldValidationError(field, f"must be an integer >= {minimum}", value)
    return value


def optional_int_at_least(field: str, value: Any, minimum: int) -> int | None:
    return None if value is None else int_at_least(field, value, minimum)


def one_of(field: str, value: Any, allowed: type[E]) -> E:
    try:
        return allowed(value)
    except ValueError:
        choices = ", ".join(m.value for m in allowed)
        raise FieldValidationError(field, f"must be one of: {choices}", value) from None


def state_key(field: str, value: Any) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= 255 or not _STATE_KEY.fullmatch(value):
        raise FieldValidationError(field, "must be 1 to 255 letters, digits or underscores", value)
    return value


def item_count(field: str, value: Iterable[Any], minimum: int, maximum: int) -> list[Any]:
    items = list(value)
    if not minimum <= len(items) <= maximum:
        raise FieldValidationError(
            field,
            f"must hold {minimum} to {maximum} elements",
            f"{len(items)} elements",
        )
    return items


def required_when(field: str, value: Any, condition: str) -> None:
    if value is None or value == "":
        raise FieldValidationError(field, f"is required when {condition}", value)
