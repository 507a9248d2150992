"""Every error leaves the API in one envelope: {"status": "error", "error": {code, message}}.

glisk's errors map to statuses here: a constraint violation (translated from the driver once, by
the engine: glisk.core.db_errors) is a 409 naming its constraint (names are stable, see
glisk.models.base.NAMING_CONVENTION) without echoing the statement or values; a field that
breaks its rule is a 422 naming both. Any other database failure is the generic 500 (the operator
reads the error in the log; the client never sees the driver's words).
"""

from http import HTTPStatus
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from glisk.api.schemas import envelope
from glisk.errors import (
    ConstraintViolation,
    FieldValidationError,
    InvalidStateTransition,
    MintConflict,
    OperatorError,
)

__all__ = ["OperatorError", "install_error_handlers", "internal_error_response"]

log = structlog.get_logger("glisk.api")

_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    409: "CONFLICT",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    422: "VALIDATION_ERROR",
    429: "TOO_MANY_REQUESTS",
}


def internal_error_response() -> JSONResponse:
    return JSONResponse(
        status_code=500,
        content=envelope("INTERNAL_SERVER_ERROR", "An unexpected error occurred"),
    )


def _code_and_phrase(status_code: int) -> tuple[str, str]:
    try:
        status = HTTPStatus(status_code)
    except ValueError:  # a status the standard library does not name, e.g. 499
        return _CODES.get(status_code, f"HTTP_{status_code}"), f"HTTP {status_code}"
    return _CODES.get(status_code, status.name), status.phrase


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code, phrase = _code_and_phrase(exc.status_code)
    detail = exc.detail if isinstance(exc.detail, str) else phrase
    return JSONResponse(
        status_code=exc.status_code,
        content=envelope(code, detail),
        headers=getattr(exc, "headers", None),
    )


async def _request_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details: list[dict[str, Any]] = jsonable_encoder(exc.errors())
    for item in details:
        item.pop("input", None)  # do not echo request bodies back
        item.pop("ctx", None)
    return JSONResponse(
        status_code=422,
        content=envelope("VALIDATION_ERROR", "The request is invalid", details),
    )


async def _field_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FieldValidationError)
    return JSONResponse(
        status_code=422,
        content=envelope("VALIDATION_ERROR", str(exc), [{"field": exc.field, "rule": exc.rule}]),
    )


async def _invalid_transition(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(status_code=409, content=envelope("INVALID_STATE_TRANSITION", str(exc)))


async def _mint_conflict(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(status_code=409, content=envelope("MINT_CONFLICT", str(exc)))


async def _constraint_violation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ConstraintViolation)
    name = exc.constraint
    log.info("api.constraint_violation", constraint=name)
    return JSONResponse(
        status_code=409,
        content=envelope(
            "CONSTRAINT_VIOLATION",
            f"The change violates the constraint '{name}'" if name else "The change conflicts",
            [{"constraint": name}] if name else None,
        ),
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _request_validation_error)
    app.add_exception_handler(FieldValidationError, _field_validation_error)
    app.add_exception_handler(InvalidStateTransition, _invalid_transition)
    app.add_exception_handler(MintConflict, _mint_conflict)
    app.add_exception_handler(ConstraintViolation, _constraint_violation)
