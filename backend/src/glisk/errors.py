"""Every error glisk raises on purpose, under one root. Catch ``GliskError`` for all of them.

    GliskError
    ├── OperatorError            one line for the operator, no traceback; carries an exit code
    │   ├── ConfigError          a setting breaks its rule (also a ValueError); exit 2
    │   │   └── HandlerError     `glisk worker --handler` names nothing usable
    │   ├── DatabaseUnavailableError   the database cannot be reached at start-up
    │   ├── EmbeddedPostgresError      the embedded server cannot be found or started
    │   └── AnvilError           the anvil node cannot be found, started or reached
    ├── FieldValidationError     a value breaks a model rule; names the field and the rule
    ├── InvalidStateTransition   the token state machine refused a status change
    ├── MintConflict             a mint log claims token ids another log already minted
    ├── DatabaseError            the database refused or failed; the driver's first line, sqlstate
    │   ├── ConstraintViolation  names the constraint (and table, column)
    │   │   ├── UniqueViolation, ForeignKeyViolation, CheckViolation, NotNullViolation
    │   └── DatabaseTimeout      a worker's statement did not answer within its bound
    ├── PermanentError, RetryLater   what a stage handler raises to steer its token
    │   ├── CIDMismatch          (a PermanentError) a pin came back under another CID
    │   └── (RetryLater) FeeAboveCap, RevealInFlight, NodeUnavailable   the reveal keeper waits
    ├── ServiceError             a paid service failed a request (glisk.services)
    │   ├── ServiceRateLimited, ServiceUnavailable, ServiceRefused
    ├── LeaseLost                a checkpoint was refused: the claim is no longer held
    └── ChainError               the reveal keeper's dealings with the chain (glisk.chain)
        └── RevealFailed         a reveal reverted or its nonce went to another transaction

Driver errors are translated once, where glisk meets the driver: SQLAlchemy engines made by
``glisk.core.database`` (``glisk.core.db_errors``) and the worker runtime's connections
(``glisk.workers.connection``) raise these instead of SQLAlchemy's or psycopg's errors, so a
worker or an event handler catches ``UniqueViolation`` and reads ``.constraint``; HTTP maps a
ConstraintViolation to 409. At start-up, commands report an unreachable database as a
DatabaseUnavailableError (an OperatorError: one line, exit 1).

Arguments that break a rule raise FieldValidationError, which is also a ValueError; misuse of
an API (a unit of work outside ``async with``) raises RuntimeError, as Python code does.

This module imports nothing heavier than the standard library, so the worker runtime can use it
without loading SQLAlchemy.
"""

from __future__ import annotations

from typing import Any

EXIT_FAILURE = 1  # the database (or another service) is unusable
EXIT_CONFIG = 2  # a bad setting, option or handler


def first_line(exc: BaseException) -> str:
    """The first line of an error's message; for a SQLAlchemy error, of the driver's message it
    wraps (the statement and parameters SQLAlchemy appends may hold user data). The class name
    when there is no message."""
    source = getattr(exc, "orig", None) or exc
    lines = str(source).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class GliskError(Exception):
    """The root of every error glisk raises on purpose."""


# --- for the operator --------------------------------------------------------------------------


class OperatorError(GliskError):
    """A failure whose message is complete for the operator: one line, naming the problem, with
    secrets masked. Commands print it and exit with ``exit_code``; the API's start-up reports it
    as that line, without a traceback."""

    exit_code: int = EXIT_FAILURE

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(OperatorError, ValueError):
    """Invalid configuration. ``str(error)`` names the variable (or option) and its rule."""

    exit_code = EXIT_CONFIG


class HandlerError(ConfigError):
    """The handler path given to ``glisk worker`` cannot be used; the message says why."""


class DatabaseUnavailableError(OperatorError):
    """The database could not be reached at start-up; names the cause and the masked URL."""


class AnvilError(OperatorError, RuntimeError):
    """The anvil node (glisk.chain.anvil) cannot be found, started, or answered an error."""


class EmbeddedPostgresError(OperatorError, RuntimeError):
    """The embedded server could not be found, initialised or started; the message says why."""


# --- the model's rules -------------------------------------------------------------------------


class FieldValidationError(GliskError, ValueError):
    """A value breaks a rule of the model (or a repository argument does). ``field`` and
    ``rule`` name them, so a caller (or an HTTP handler) reports it without parsing text."""

    def __init__(self, field: str, rule: str, value: Any = None) -> None:
        self.field = field
        self.rule = rule
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"{field}: {rule} (got {shown})")


class InvalidStateTransition(GliskError):
    """A token status change that the state machine does not allow.

    ``current`` is the token's status, ``target`` the status asked for, ``required`` the states it
    could have been in for that change (``glisk.models.enums.TokenStatus`` values; typed as their
    strings so this module imports nothing of glisk).
    """

    def __init__(
        self,
        current: str,
        target: str,
        required: tuple[str, ...],
        message: str | None = None,
    ) -> None:
        self.current = current
        self.target = target
        self.required = required
        if message is None:
            if len(required) == 1:
                need = f"'{required[0]}' state"
            else:
                need = "one of " + ", ".join(f"'{s}'" for s in required) + " states"
            message = f"Cannot transition from '{current}' to '{target}'. Token must be in {need}."
        super().__init__(message)


class MintConflict(GliskError):
    """A mint log claims token ids that another log (or another writer) already minted.

    Nothing of the refused log was written. ``token_ids`` are the contested ids of the refused log
    ``log`` (tx_hash, log_index); ``other`` is the recorded log that holds them, or None when the
    tokens exist without a recorded mint log (a backfill) or when the other writer's transaction
    committed in the same instant (then this transaction is aborted: leave the unit of work).
    """

    def __init__(
        self,
        log: tuple[str, int],
        token_ids: list[int],
        other: tuple[str, int] | None,
        detail: str = "",
    ) -> None:
        self.log = log
        self.token_ids = token_ids
        self.other = other
        held_by = f"the log {other[0]}#{other[1]}" if other else "tokens without a mint log"
        message = (
            f"mint log {log[0]}#{log[1]} claims token ids {_shorten(token_ids)} already minted "
            f"by {held_by}"
        )
        super().__init__(f"{message}; {detail}" if detail else message)


def _shorten(ids: list[int]) -> str:
    return str(ids) if len(ids) <= 10 else f"[{ids[0]}, {ids[1]}, ..., {ids[-1]}] ({len(ids)})"


# --- the database ------------------------------------------------------------------------------


# SQLSTATE classes and codes that a retry may cure: 08 connection exception, 53 insufficient
# resources (too many connections, out of memory or disk), 57 operator intervention (shutdown,
# cancel, statement timeout), 40001 serialization failure, 40P01 deadlock.
_TRANSIENT_CLASSES = ("08", "53", "57")
_TRANSIENT_STATES = frozenset({"40001", "40P01"})


class DatabaseError(GliskError):
    """The database refused a statement or did not answer. The message is the driver's first
    line: it names the problem (and constraint) without the statement or its parameters.
    ``sqlstate`` is the server's SQLSTATE code, None when no server answered (a lost connection,
    a refused connect)."""

    sqlstate: str | None = None

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        # Exception.__init__, not super(): the SQLAlchemy-compatible subclasses have
        # SQLAlchemy's DBAPIError later in their MRO, whose __init__ takes other arguments.
        Exception.__init__(self, message)
        if sqlstate is not None:
            self.sqlstate = sqlstate

    @property
    def transient(self) -> bool:
        """Whether the same call may succeed later unchanged: the connection was lost or refused,
        the server is shutting down or full, the statement was cancelled or timed out, or it lost
        a deadlock or a serialization conflict. False for a statement the database will refuse
        again (a constraint, bad data, a missing table)."""
        state = self.sqlstate
        return state is None or state.startswith(_TRANSIENT_CLASSES) or state in _TRANSIENT_STATES

    def __str__(self) -> str:
        # Set explicitly: subclasses that are also SQLAlchemy errors (glisk.core.db_errors)
        # would otherwise print SQLAlchemy's message, statement and parameters included.
        return self.args[0] if self.args else type(self).__name__


class ConstraintViolation(DatabaseError):
    """A write broke a constraint; nothing of the statement was written. ``constraint`` is the
    constraint's stable name (glisk.models.base.NAMING_CONVENTION), ``table`` and ``column``
    where the server names them."""

    sqlstate: str | None = "23000"

    def __init__(
        self,
        message: str,
        *,
        constraint: str | None = None,
        table: str | None = None,
        column: str | None = None,
        sqlstate: str | None = None,
    ) -> None:
        DatabaseError.__init__(self, message, sqlstate=sqlstate)
        self.constraint = constraint
        self.table = table
        self.column = column


class UniqueViolation(ConstraintViolation):
    """A duplicate: the row's key is taken (SQLSTATE 23505)."""

    sqlstate = "23505"


class ForeignKeyViolation(ConstraintViolation):
    """A reference to a row that does not exist, or a delete of a referenced row (23503)."""

    sqlstate = "23503"


class CheckViolation(ConstraintViolation):
    """A CHECK constraint refused the row (23514)."""

    sqlstate = "23514"


class NotNullViolation(ConstraintViolation):
    """A required column was left empty (23502)."""

    sqlstate = "23502"


VIOLATIONS: dict[str, type[ConstraintViolation]] = {
    kind.sqlstate: kind
    for kind in (UniqueViolation, ForeignKeyViolation, CheckViolation, NotNullViolation)
    if kind.sqlstate is not None
}


def error_kind(driver_error: BaseException) -> type[DatabaseError]:
    """The glisk class for a driver (psycopg) error: a ConstraintViolation for SQLSTATE class 23
    (the named one where there is one), DatabaseError for anything else."""
    sqlstate = getattr(driver_error, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate.startswith("23"):
        return VIOLATIONS.get(sqlstate, ConstraintViolation)
    return DatabaseError


def error_fields(driver_error: BaseException) -> dict[str, Any]:
    """The keyword arguments of ``error_kind(driver_error)``, read from the driver's
    diagnostics: the SQLSTATE, and for a constraint violation the constraint, table, column."""
    fields: dict[str, Any] = {"sqlstate": getattr(driver_error, "sqlstate", None)}
    if issubclass(error_kind(driver_error), ConstraintViolation):
        diag = getattr(driver_error, "diag", None)
        fields["constraint"] = getattr(diag, "constraint_name", None)
        fields["table"] = getattr(diag, "table_name", None)
        fields["column"] = getattr(diag, "column_name", None)
    return fields


def translate(driver_error: BaseException) -> DatabaseError:
    """The named glisk error for a driver (psycopg) error. Raise it ``from`` the driver error,
    which stays reachable as ``__cause__``."""
    return error_kind(driver_error)(first_line(driver_error), **error_fields(driver_error))


class DatabaseTimeout(DatabaseError):
    """A worker's database call did not answer within its time limit; the connection that made
    it was closed (it is in an unknown state) and the next call opens a new one."""


# --- stage handlers and the worker runtime -----------------------------------------------------


class PermanentError(GliskError):
    """Raised by a handler when retrying cannot help (e.g. a prompt the service refuses): the
    token goes to 'failed' at once instead of being retried."""


class RetryLater(GliskError):
    """Raised by a handler when the service asks to be called again later (HTTP 429 with
    ``Retry-After``): the token comes back after exactly ``seconds`` without spending an attempt.

    A worker allows ``max_deferrals`` of these per token and stage; past that a RetryLater counts
    as an ordinary failed attempt (waiting at least ``seconds``).
    """

    def __init__(self, seconds: float, reason: str = "") -> None:
        if not seconds >= 0:
            raise FieldValidationError("seconds", "must be >= 0", seconds)
        super().__init__(reason or f"retry in {seconds:g} s")
        self.seconds = float(seconds)


class ChainError(GliskError):
    """The chain refused what the reveal keeper asked, in a way waiting cannot cure (a call that
    would revert for another reason than a token already revealed)."""


class RevealFailed(ChainError):
    """A reveal transaction can never reveal its tokens: it reverted, or its nonce went to
    another transaction (a filler). The batch's tokens are free to go into a new transaction."""


class FeeAboveCap(RetryLater):
    """The next block's base fee plus the tip exceeds REVEAL_MAX_GAS_PRICE_GWEI: the batch waits
    rather than overpays."""


class RevealInFlight(RetryLater):
    """A token of the batch is in a reveal transaction still pending (its checkpoint had lost the
    pointer, now restored): the next claim reconciles that transaction, nothing new is sent."""


class NodeUnavailable(RetryLater):
    """The chain node did not answer (or not in time): the batch comes back later, no attempt
    spent."""


class LeaseLost(GliskError):
    """A checkpoint was refused: this worker no longer holds every claim it named (the lease ran
    out, another worker may hold the token now). A handler that gets it must stop before any
    external effect; raised out of a handler, the worker drops the result as refused."""


# --- the paid services the stages call (glisk.services) ----------------------------------------


class ServiceError(GliskError):
    """A request to an external service (the image model, the pinning service) failed. Messages
    name the service and the HTTP status or transport error; never a credential or a prompt."""

    def __init__(self, service: str, message: str, *, status: int | None = None) -> None:
        super().__init__(f"{service}: {message}")
        self.service = service
        self.status = status


class ServiceRateLimited(ServiceError):
    """HTTP 429: call again after ``retry_after`` seconds (the ``Retry-After`` header)."""

    def __init__(self, service: str, retry_after: float) -> None:
        super().__init__(service, f"rate limited, retry after {retry_after:g} s", status=429)
        self.retry_after = retry_after


class ServiceUnavailable(ServiceError):
    """No usable answer: a refused or dropped connection, a timeout, a reply cut off, an HTTP 5xx.
    For a request that creates something (a prediction, a pin) the outcome is unknown: it may
    have been done."""


class ServiceRefused(ServiceError):
    """The service answered that this request cannot succeed as sent (a 4xx such as an input
    that fails validation, or a prompt the model refuses): sending it again will not help."""


class CIDMismatch(PermanentError):
    """A pinning service pinned the bytes under another CID than the one computed for them
    before pinning: the record is refused and the token does not move on."""

    def __init__(self, expected: str, pinned: str) -> None:
        super().__init__(f"pinned as {pinned}, but the bytes' CID is {expected}")
        self.expected = expected
        self.pinned = pinned
