import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from glisk.core.timezone import utcnow
from glisk.models import SystemState
from glisk.models import validation as v

# Moves a numeric checkpoint forward only. The DO UPDATE's WHERE is evaluated against the newest
# committed version of the row (a concurrent writer is waited for first), so under READ COMMITTED
# two pollers cannot move it backwards whatever the interleaving.
_ADVANCE = text(
    """
    INSERT INTO system_state AS s (key, state_value, updated_at)
    VALUES (:key, CAST(:value AS jsonb), :now)
    ON CONFLICT (key) DO UPDATE
    SET state_value = excluded.state_value, updated_at = excluded.updated_at
    WHERE CASE WHEN jsonb_typeof(s.state_value) = 'number'
               THEN CAST(s.state_value AS numeric) < CAST(excluded.state_value AS numeric)
          END
    RETURNING s.state_value
    """
)
# Adds to a counter in one statement: a concurrent writer of the key is waited for and its value
# added to, so no increment is lost.
_INCREMENT = text(
    """
    INSERT INTO system_state AS s (key, state_value, updated_at)
    VALUES (:key, to_jsonb(CAST(:by AS bigint)), :now)
    ON CONFLICT (key) DO UPDATE
    SET state_value = to_jsonb(CAST(s.state_value AS bigint) + CAST(:by AS bigint)),
        updated_at = excluded.updated_at
    WHERE jsonb_typeof(s.state_value) = 'number'
    RETURNING s.state_value
    """
)
# Compare-and-set: the UPDATE re-checks its WHERE on the newest row version after waiting for a
# concurrent writer, so exactly one of several writers expecting the same old value succeeds.
_SWAP = text(
    """
    UPDATE system_state SET state_value = CAST(:value AS jsonb), updated_at = :now
    WHERE key = :key AND state_value = CAST(:expected AS jsonb)
    RETURNING state_value
    """
)
# expected None: the key is absent (or holds JSON null).
_SWAP_ABSENT = text(
    """
    INSERT INTO system_state AS s (key, state_value, updated_at)
    VALUES (:key, CAST(:value AS jsonb), :now)
    ON CONFLICT (key) DO UPDATE
    SET state_value = excluded.state_value, updated_at = excluded.updated_at
    WHERE s.state_value = 'null'::jsonb
    RETURNING s.state_value
    """
)


# The key's value, its row locked until the transaction ends: FOR UPDATE against every other
# locker, FOR SHARE against FOR UPDATE only (sharers do not wait for one another). An absent key
# locks nothing.
_LOCK = {
    True: text("SELECT state_value FROM system_state WHERE key = :key FOR SHARE"),
    False: text("SELECT state_value FROM system_state WHERE key = :key FOR UPDATE"),
}


@dataclass(frozen=True)
class StateChange:
    """The outcome of a conditional write: ``changed`` says whether this call wrote; ``value`` is
    the value stored once it returned (the caller's when changed, the one that refused it when
    not; None if the key is absent)."""

    changed: bool
    value: Any


class SystemStateRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get_state(self, key: str) -> Any:
        """The stored JSON value, or None when the key is absent (or holds JSON null)."""
        v.state_key("key", key)
        result = await self.session.execute(
            select(col(SystemState.state_value)).where(col(SystemState.key) == key)
        )
        return result.scalar_one_or_none()

    async def lock_state(self, key: str, *, share: bool = False) -> Any:
        """``get_state``, with the key's row locked until the caller's transaction ends:
        exclusively, or with ``share`` against exclusive lockers only. Waits for a transaction
        holding a conflicting lock, then returns the value it committed. An absent key is
        returned as None and locks nothing."""
        v.state_key("key", key)
        return (await self.session.execute(_LOCK[share], {"key": key})).scalar_one_or_none()

    async def set_state(self, key: str, value: Any) -> None:
        """Insert or overwrite in one statement (INSERT ... ON CONFLICT (key) DO UPDATE), which
        also refreshes updated_at; safe when two writers race on a new key."""
        v.state_key("key", key)
        _json("value", value)
        statement = insert(SystemState).values(key=key, state_value=value, updated_at=utcnow())
        statement = statement.on_conflict_do_update(
            index_elements=[col(SystemState.key)],
            set_={
                "state_value": statement.excluded.state_value,
                "updated_at": statement.excluded.updated_at,
            },
        )
        await self.session.execute(statement)

    async def delete_state(self, key: str) -> bool:
        """Idempotent; returns whether a row was deleted."""
        v.state_key("key", key)
        result = await self.session.execute(delete(SystemState).where(col(SystemState.key) == key))
        return bool(getattr(result, "rowcount", 0))

    async def list_all_keys(self) -> list[str]:
        """Sorted."""
        result = await self.session.execute(
            select(col(SystemState.key)).order_by(col(SystemState.key))
        )
        return list(result.scalars())

    async def advance(self, key: str, value: int) -> StateChange:
        """Store ``value`` only if it is greater than the stored number, or the key is absent: a
        checkpoint such as ``last_processed_block`` never moves backwards, however many pollers
        write it at once. Equal or smaller values are refused (``changed=False``, ``value`` the
        stored one). One statement; a concurrent writer of the key is waited for.

        Raises FieldValidationError for a value that is not an integer, or when the key holds
        something other than a number (nothing is written then)."""
        v.state_key("key", key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise v.FieldValidationError("value", "must be an integer", value)
        row = (
            await self.session.execute(
                _ADVANCE, {"key": key, "value": json.dumps(value), "now": utcnow()}
            )
        ).first()
        if row is not None:
            return StateChange(True, row[0])
        current = await self.get_state(key)
        if isinstance(current, bool) or not isinstance(current, int | float):
            raise v.FieldValidationError(
                "key", f"must hold a number to be advanced (holds {current!r})", key
            )
        return StateChange(False, current)

    async def increment(self, key: str, by: int = 1) -> int:
        """Add ``by`` to the integer the key holds (absent: 0) and return the result; one
        statement, safe from any number of writers at once. Raises FieldValidationError for a
        ``by`` that is not an integer, or when the key holds something other than a number."""
        v.state_key("key", key)
        if isinstance(by, bool) or not isinstance(by, int):
            raise v.FieldValidationError("by", "must be an integer", by)
        row = (
            await self.session.execute(_INCREMENT, {"key": key, "by": by, "now": utcnow()})
        ).first()
        if row is None:
            raise v.FieldValidationError(
                "key",
                f"must hold a number to be incremented (holds {await self.get_state(key)!r})",
                key,
            )
        return int(row[0])

    async def compare_and_set(self, key: str, expected: Any, value: Any) -> StateChange:
        """Store ``value`` only if the key holds ``expected`` now (JSON equality: 1 == 1.0, object
        key order ignored); ``expected=None`` means the key is absent or holds JSON null. Of
        several writers expecting the same old value exactly one succeeds; the others get
        ``changed=False`` and the value that beat them. A concurrent writer is waited for.
        Raises FieldValidationError when either value is not JSON-serialisable."""
        v.state_key("key", key)
        params = {"key": key, "value": _json("value", value), "now": utcnow()}
        if expected is None:
            statement = _SWAP_ABSENT
        else:
            statement = _SWAP
            params["expected"] = _json("expected", expected)
        row = (await self.session.execute(statement, params)).first()
        if row is not None:
            return StateChange(True, row[0])
        return StateChange(False, await self.get_state(key))


def _json(field: str, value: Any) -> str:
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise v.FieldValidationError(field, f"must be JSON-serialisable ({exc})", value) from None
