"""Response shapes shared by every route (they also document the API in OpenAPI)."""

from typing import Any, Literal

from pydantic import BaseModel


class ErrorBody(BaseModel):
    code: str
    message: str
    details: list[dict[str, Any]] | None = None


class ErrorEnvelope(BaseModel):
    status: Literal["error", "unhealthy"] = "error"
    error: ErrorBody


class HealthOk(BaseModel):
    status: Literal["healthy"] = "healthy"


class HealthDown(BaseModel):
    status: Literal["unhealthy"] = "unhealthy"
    error: ErrorBody


def envelope(
    code: str,
    message: str,
    details: list[dict[str, Any]] | None = None,
    status: Literal["error", "unhealthy"] = "error",
) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        body["details"] = details
    return {"status": status, "error": body}
