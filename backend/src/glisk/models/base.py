"""Shared model plumbing: constraint naming, and cross-field checks run before every write."""

from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Mapper
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
SQLModel.metadata.naming_convention = NAMING_CONVENTION
metadata = SQLModel.metadata


def _check_row(_mapper: Mapper[Any], _connection: Any, target: Any) -> None:
    check = getattr(target, "check_row", None)
    if check is not None:
        check()


# Field validators see one attribute at a time; rules that tie fields together ("cid required when
# completed") are checked here, at flush, once the whole row is known.
event.listen(Mapper, "before_insert", _check_row)
event.listen(Mapper, "before_update", _check_row)
