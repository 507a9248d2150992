"""Small builders for valid entities, so each test states only what it is about."""

from __future__ import annotations

import itertools
import secrets
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from glisk.models import Author, Token, TokenStatus

_token_ids = itertools.count(1)
BASE_TIME = datetime(2025, 1, 1, 12, 0, 0)


def wallet() -> str:
    return "0x" + secrets.token_hex(20)


def tx_hash() -> str:
    return "0x" + secrets.token_hex(32)


def author(**overrides: Any) -> Author:
    fields: dict[str, Any] = {"wallet_address": wallet(), "prompt_text": "a cat in a spacesuit"}
    fields.update(overrides)
    return Author(**fields)


def token(author_id: UUID, status: TokenStatus = TokenStatus.DETECTED, **overrides: Any) -> Token:
    number = next(_token_ids)
    fields: dict[str, Any] = {
        "token_id": number,
        "author_id": author_id,
        "minter_address": wallet(),
        "status": status,
        "mint_timestamp": BASE_TIME + timedelta(seconds=number),
    }
    if status in (TokenStatus.READY, TokenStatus.REVEALED):
        fields["metadata_cid"] = "bafy-metadata"
    fields.update(overrides)
    return Token(**fields)
