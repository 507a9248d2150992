import json
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from glisk.core.timezone import utcnow
from glisk.models import SystemState
from glisk.models import validation as v


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

    async def set_state(self, key: str, value: Any) -> None:
        """Insert or overwrite in one statement (INSERT ... ON CONFLICT (key) DO UPDATE), which
        also refreshes updated_at; safe when two writers race on a new key."""
        v.state_key("key", key)
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise v.FieldValidationError(
                "value", f"must be JSON-serialisable ({exc})", value
            ) from None
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
