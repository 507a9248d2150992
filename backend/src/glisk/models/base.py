"""Shared model plumbing: constraint naming, and cross-field checks run before every write."""

from typing import Any

from sqlalchemy import MetaData, event, inspect
from sqlalchemy.orm import Mapper, registry
from sqlmodel import SQLModel

# Stable, readable names for every index and constraint, so migrations and error translation can
# refer to them (e.g. uq_authors_wallet_address_lower).
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Entity(SQLModel, registry=registry(metadata=MetaData(naming_convention=NAMING_CONVENTION))):
    """Base of the table models, with a registry (and metadata) of their own: the naming
    convention applies to GLISK's tables only, never to SQLModel's shared default metadata.

    It also makes SQLAlchemy ``@validates`` normalisation stick.

    SQLModel's ``__setattr__`` hands the value to SQLAlchemy (which runs the validator) and then
    writes the *raw* value into ``__dict__`` for pydantic, undoing any normalisation (e.g. a tx hash
    lowercased). Running the validator first and passing its result on keeps both sides agreed.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        validator = _validators(type(self)).get(name)
        if validator is not None:
            value = validator(self, name, value)
        super().__setattr__(name, value)


def _validators(cls: type) -> dict[str, Any]:
    cached = cls.__dict__.get("_glisk_validators")
    if cached is None:
        mapper = inspect(cls, raiseerr=False)
        found = {name: fn for name, (fn, _opts) in mapper.validators.items()} if mapper else {}
        type.__setattr__(cls, "_glisk_validators", found)
        cached = found
    return cached


def _check_row(_mapper: Mapper[Any], _connection: Any, target: Any) -> None:
    check = getattr(target, "check_row", None)
    if check is not None:
        check()


# Field validators see one attribute at a time; rules that tie fields together ("cid required when
# completed") are checked here, at flush, once the whole row is known. Only GLISK's entities.
event.listen(Entity, "before_insert", _check_row, propagate=True)
event.listen(Entity, "before_update", _check_row, propagate=True)


metadata = Entity.metadata
