"""Driver errors translated once, where SQLAlchemy meets the driver.

``install(engine)`` (``create_db_engine`` calls it for every engine it makes) hooks the engine's
``handle_error`` event: a statement, flush or commit that breaks a constraint raises glisk's
``ConstraintViolation`` (``UniqueViolation``, ``ForeignKeyViolation``, ``CheckViolation``,
``NotNullViolation``) naming the constraint, table and column, with the driver's first line as its
message (no statement, no parameters). Repositories, the unit of work, workers and HTTP then catch
the named error instead of reading SQLAlchemy's ``IntegrityError``.

The errors raised here are also ``sqlalchemy.exc.IntegrityError``s, so code written against
SQLAlchemy keeps working; catch them by their ``glisk.errors`` names.
"""

from __future__ import annotations

from sqlalchemy import event
from sqlalchemy.engine import Engine, ExceptionContext
from sqlalchemy.exc import IntegrityError

from glisk import errors


class _FromSqlAlchemy:
    """Builds a ``glisk.errors`` violation that is also SQLAlchemy's IntegrityError. Listed
    first in the bases: its __init__ sets SQLAlchemy's attributes, then glisk's."""

    def __init__(self, context: ExceptionContext) -> None:
        driver_error = context.original_exception
        IntegrityError.__init__(  # statement, parameters, orig: what SQLAlchemy code reads
            self,  # type: ignore[arg-type]
            context.statement,
            context.parameters,
            driver_error,  # type: ignore[arg-type]
            hide_parameters=True,
        )
        errors.ConstraintViolation.__init__(
            self,  # type: ignore[arg-type]
            errors.first_line(driver_error),
            **errors.violation_fields(driver_error),
        )


class ConstraintViolation(_FromSqlAlchemy, errors.ConstraintViolation, IntegrityError):
    """glisk.errors.ConstraintViolation from a SQLAlchemy engine (also an IntegrityError)."""


class UniqueViolation(_FromSqlAlchemy, errors.UniqueViolation, IntegrityError):
    """glisk.errors.UniqueViolation from a SQLAlchemy engine (also an IntegrityError)."""


class ForeignKeyViolation(_FromSqlAlchemy, errors.ForeignKeyViolation, IntegrityError):
    """glisk.errors.ForeignKeyViolation from a SQLAlchemy engine (also an IntegrityError)."""


class CheckViolation(_FromSqlAlchemy, errors.CheckViolation, IntegrityError):
    """glisk.errors.CheckViolation from a SQLAlchemy engine (also an IntegrityError)."""


class NotNullViolation(_FromSqlAlchemy, errors.NotNullViolation, IntegrityError):
    """glisk.errors.NotNullViolation from a SQLAlchemy engine (also an IntegrityError)."""


_RAISED: dict[type[errors.ConstraintViolation], type[_FromSqlAlchemy]] = {
    errors.ConstraintViolation: ConstraintViolation,
    errors.UniqueViolation: UniqueViolation,
    errors.ForeignKeyViolation: ForeignKeyViolation,
    errors.CheckViolation: CheckViolation,
    errors.NotNullViolation: NotNullViolation,
}


def translate(context: ExceptionContext) -> BaseException | None:
    """The ``handle_error`` listener: a named violation in place of SQLAlchemy's error, or None
    (SQLAlchemy raises its own) for anything that is not a constraint violation."""
    kind = errors.violation_kind(context.original_exception)
    if kind is None:
        return None
    return _RAISED[kind](context)  # type: ignore[return-value]


def install(engine: Engine) -> None:
    """Translate ``engine``'s constraint violations (for an AsyncEngine, pass ``.sync_engine``)."""
    if not event.contains(engine, "handle_error", translate):
        event.listen(engine, "handle_error", translate)
