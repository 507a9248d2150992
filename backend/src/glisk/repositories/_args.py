"""Argument checks shared by the repositories: nonsense is refused before any SQL runs."""

from typing import Any

from glisk.models import validation as v

MAX_LIMIT = 1000


def limit(value: Any, name: str = "limit", maximum: int = MAX_LIMIT) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise v.FieldValidationError(name, f"must be an integer from 1 to {maximum}", value)
    return value


def offset(value: Any, name: str = "offset") -> int:
    return v.int_at_least(name, value, 0)
