"""Driver errors translated once, where SQLAlchemy meets the driver.

``install(engine)`` (``create_db_engine`` calls it for every engine it makes) hooks the engine's
``handle_error`` event, so a statement, flush or commit that fails raises a ``glisk.errors``
error with the driver's first line as its message (no statement, no parameters):

- a broken constraint: ``UniqueViolation``, ``ForeignKeyViolation``, ``CheckViolation``,
  ``NotNullViolation`` (else ``ConstraintViolation``), naming the constraint, table and column;
- anything else the driver raised (a lost connection, a cancelled statement, a deadlock):
  ``DatabaseError`` with its ``sqlstate``.

Repositories, the unit of work, workers and HTTP then catch the named error instead of reading
SQLAlchemy's ``IntegrityError``. Each error raised here is also the SQLAlchemy class it replaces
(``IntegrityError``, ``OperationalError``, ...), with ``orig`` and ``connection_invalidated``
kept, so SQLAlchemy's own disconnect handling and code written against SQLAlchemy work as before.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy import exc as sa
from sqlalchemy.engine import Engine, ExceptionContext

from glisk import errors


class _Translated:
    """Mixed in first: takes SQLAlchemy's DBAPIError arguments (so the error pickles and
    SQLAlchemy can rebuild it), then sets the glisk error's fields from the driver error."""

    glisk_kind: type[errors.DatabaseError] = errors.DatabaseError

    def __init_subclass__(cls) -> None:
        cls.glisk_kind = next(b for b in cls.__mro__[1:] if issubclass(b, errors.DatabaseError))

    def __init__(
        self,
        statement: str | None,
        params: Any,
        orig: BaseException,
        hide_parameters: bool = True,
        connection_invalidated: bool = False,
        code: str | None = None,
        ismulti: bool | None = None,
    ) -> None:
        sa.DBAPIError.__init__(
            self,  # type: ignore[arg-type]
            statement,
            params,
            orig,
            hide_parameters=hide_parameters,
            connection_invalidated=connection_invalidated,
            code=code,
            ismulti=ismulti,
        )
        self.glisk_kind.__init__(
            self,  # type: ignore[arg-type]
            errors.first_line(orig),
            **errors.error_fields(orig),
        )


class ConstraintViolation(_Translated, errors.ConstraintViolation, sa.IntegrityError):
    """glisk.errors.ConstraintViolation, also SQLAlchemy's IntegrityError."""


class UniqueViolation(_Translated, errors.UniqueViolation, sa.IntegrityError):
    """glisk.errors.UniqueViolation, also SQLAlchemy's IntegrityError."""


class ForeignKeyViolation(_Translated, errors.ForeignKeyViolation, sa.IntegrityError):
    """glisk.errors.ForeignKeyViolation, also SQLAlchemy's IntegrityError."""


class CheckViolation(_Translated, errors.CheckViolation, sa.IntegrityError):
    """glisk.errors.CheckViolation, also SQLAlchemy's IntegrityError."""


class NotNullViolation(_Translated, errors.NotNullViolation, sa.IntegrityError):
    """glisk.errors.NotNullViolation, also SQLAlchemy's IntegrityError."""


class OperationalError(_Translated, errors.DatabaseError, sa.OperationalError):
    """glisk.errors.DatabaseError, also SQLAlchemy's OperationalError (a lost connection, a
    cancelled statement, a deadlock, a serialization failure)."""


class ProgrammingError(_Translated, errors.DatabaseError, sa.ProgrammingError):
    """glisk.errors.DatabaseError, also SQLAlchemy's ProgrammingError (a missing table: the
    database is not migrated)."""


class DataError(_Translated, errors.DatabaseError, sa.DataError):
    """glisk.errors.DatabaseError, also SQLAlchemy's DataError (a value out of range)."""


class OtherDatabaseError(_Translated, errors.DatabaseError, sa.DatabaseError):
    """glisk.errors.DatabaseError, also SQLAlchemy's DatabaseError (any other server error)."""


_CONSTRAINTS: dict[type[errors.DatabaseError], type[sa.DBAPIError]] = {
    errors.ConstraintViolation: ConstraintViolation,
    errors.UniqueViolation: UniqueViolation,
    errors.ForeignKeyViolation: ForeignKeyViolation,
    errors.CheckViolation: CheckViolation,
    errors.NotNullViolation: NotNullViolation,
}
# Most specific first: SQLAlchemy's OperationalError (and the others) are DatabaseErrors.
_OTHERS: tuple[tuple[type[sa.DBAPIError], type[sa.DBAPIError]], ...] = (
    (sa.OperationalError, OperationalError),
    (sa.ProgrammingError, ProgrammingError),
    (sa.DataError, DataError),
    (sa.DatabaseError, OtherDatabaseError),
)


def translate(context: ExceptionContext) -> BaseException | None:
    """The ``handle_error`` listener: the glisk error in place of SQLAlchemy's, or None (SQLAlchemy
    raises its own) for what is not a driver error (an InterfaceError, a Python error in a type
    processor) and for a pre-ping, whose failure SQLAlchemy handles itself."""
    wrapped = context.sqlalchemy_exception
    if context.is_pre_ping or not isinstance(wrapped, sa.DBAPIError):
        return None
    kind = errors.error_kind(context.original_exception)
    raised = _CONSTRAINTS.get(kind)
    if raised is None:
        raised = next((ours for theirs, ours in _OTHERS if isinstance(wrapped, theirs)), None)
    if raised is None:
        return None
    return raised(
        context.statement,
        context.parameters,
        context.original_exception,
        connection_invalidated=context.is_disconnect,
        ismulti=wrapped.ismulti,
    )


def install(engine: Engine) -> None:
    """Translate ``engine``'s driver errors (for an AsyncEngine, pass ``.sync_engine``)."""
    if not event.contains(engine, "handle_error", translate):
        event.listen(engine, "handle_error", translate)
