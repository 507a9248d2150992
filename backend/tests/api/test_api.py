"""The HTTP shell (/health, the error envelope, middleware) against a real, migrated PostgreSQL.

One app per module, its lifespan run for real (engine, session factory, SELECT 1 at start-up),
requests over httpx's ASGI transport. The database URL carries a password (the test server
trusts every login, so any password works) so that every response and log line can be checked
for it. Logs are rendered as JSON (APP_ENV=production) into a buffer: what an operator reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from glisk.uow import UnitOfWorkFactory
from tests.support.api import (
    ALLOWED_ORIGIN,
    DUPLICATED_WALLET,
    INTERNAL_MARKER,
    add_probe_routes,
    api_settings,
    assert_security_headers,
    create_logged_app,
    logging_restored,
    serving,
    with_password,
)
from tests.support.database import Database


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


# --- fixtures -------------------------------------------------------------------------------


@dataclass
class Api:
    client: httpx.AsyncClient
    logs: io.StringIO
    secret: str

    def log_lines_since(self, position: int) -> list[dict[str, Any]]:
        return json_lines(self.logs.getvalue()[position:])


@pytest.fixture(scope="module")
async def api(postgres_container: Database) -> AsyncIterator[Api]:
    url, secret = with_password(postgres_container.url)
    with logging_restored():
        app, logs = create_logged_app(api_settings(url, app_env="production"))
        add_probe_routes(app)
        async with serving(app) as client:
            yield Api(client=client, logs=logs, secret=secret)


# --- health ---------------------------------------------------------------------------------


async def test_health_answers_200_healthy_when_the_database_is_up(api: Api) -> None:
    response = await api.client.get("/health")

    assert response.status_code == 200
    assert response.json() == {"status": "healthy"}
    assert response.headers["content-type"] == "application/json"


# --- headers and error envelopes ------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "status"), [("/health", 200), ("/no/such/route", 404), ("/probe/boom", 500)]
)
async def test_security_headers_and_request_id_are_on_every_response(
    api: Api, path: str, status: int
) -> None:
    response = await api.client.get(path)

    assert response.status_code == status
    assert_security_headers(response)


async def test_unknown_route_gives_404_not_found_envelope(api: Api) -> None:
    response = await api.client.get("/no/such/route")

    assert response.status_code == 404
    assert response.json() == {
        "status": "error",
        "error": {"code": "NOT_FOUND", "message": "Not Found"},
    }


async def test_unexpected_exception_gives_500_envelope_without_internals(api: Api) -> None:
    position = len(api.logs.getvalue())

    response = await api.client.get("/probe/boom")

    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "status": "error",
        "error": {"code": "INTERNAL_SERVER_ERROR", "message": "An unexpected error occurred"},
    }
    for leak in (INTERNAL_MARKER, "RuntimeError", "Traceback", "probe_boom"):
        assert leak not in response.text
    # The operator, unlike the client, gets the exception (once) and the request line.
    lines = api.log_lines_since(position)
    errors = [line for line in lines if line["event"] == "request.unhandled_error"]
    assert len(errors) == 1
    assert INTERNAL_MARKER in errors[0]["exception"]
    requests = [line for line in lines if line["event"] == "request"]
    assert [line["status_code"] for line in requests] == [500]
    assert errors[0]["request_id"] == requests[0]["request_id"] == response.headers["x-request-id"]


async def test_a_duplicate_is_a_409_naming_the_constraint_and_the_request_writes_nothing(
    api: Api, uow_factory: UnitOfWorkFactory
) -> None:
    response = await api.client.post("/probe/duplicate-wallet")

    assert response.status_code == 409
    assert response.json()["error"] == {
        "code": "CONSTRAINT_VIOLATION",
        "message": "The change violates the constraint 'uq_authors_wallet_address_lower'",
        "details": [{"constraint": "uq_authors_wallet_address_lower"}],
    }
    assert DUPLICATED_WALLET[2:] not in response.text.lower()
    async with uow_factory() as uow:  # the first author went with the request's transaction
        assert await uow.authors.get_by_wallet(DUPLICATED_WALLET) is None


async def test_a_database_failure_mid_request_is_the_generic_500_and_the_next_is_served(
    api: Api,
) -> None:
    for path in ("/probe/division-by-zero", "/probe/connection-dies"):
        response = await api.client.get(path)

        assert response.status_code == 500
        assert response.json()["error"]["code"] == "INTERNAL_SERVER_ERROR"
        for leak in ("division", "terminat", "pg_backend_pid"):
            assert leak not in response.text
    assert (await api.client.get("/health")).status_code == 200


async def test_request_validation_error_keeps_fastapi_detail_inside_the_envelope(
    api: Api,
) -> None:
    missing = await api.client.get("/probe/items")
    wrong_type = await api.client.get("/probe/items", params={"limit": "many"})
    out_of_range = await api.client.get("/probe/items", params={"limit": "1000"})

    for response in (missing, wrong_type, out_of_range):
        assert response.status_code == 422
        assert_security_headers(response)
        body = response.json()
        assert body["status"] == "error"
        assert body["error"]["code"] == "VALIDATION_ERROR"
        assert body["error"]["message"]
        [detail] = body["error"]["details"]
        assert detail["loc"] == ["query", "limit"]
        assert detail["msg"]
    assert missing.json()["error"]["details"][0]["type"] == "missing"
    assert wrong_type.json()["error"]["details"][0]["type"] == "int_parsing"
    assert out_of_range.json()["error"]["details"][0]["type"] == "less_than_equal"
    # What the client sent is not echoed back.
    assert "many" not in wrong_type.text
    assert (await api.client.get("/probe/items", params={"limit": "7"})).json() == {"limit": 7}


async def test_wrong_method_gives_405_envelope_with_allow_header(api: Api) -> None:
    response = await api.client.post("/health")

    assert response.status_code == 405
    assert response.json() == {
        "status": "error",
        "error": {"code": "METHOD_NOT_ALLOWED", "message": "Method Not Allowed"},
    }
    assert response.headers["allow"] == "GET"
    assert_security_headers(response)


async def test_an_http_error_with_a_status_python_does_not_name_keeps_its_status(
    api: Api,
) -> None:
    response = await api.client.get("/probe/unnamed-status")

    assert response.status_code == 499
    assert response.json() == {
        "status": "error",
        "error": {"code": "HTTP_499", "message": "Client went away"},
    }


# --- request id -----------------------------------------------------------------------------


async def test_each_response_gets_a_fresh_request_id(api: Api) -> None:
    first = await api.client.get("/health")
    second = await api.client.get("/health")

    assert first.headers["x-request-id"] != second.headers["x-request-id"]


async def test_a_well_formed_incoming_request_id_is_echoed_and_a_malformed_one_replaced(
    api: Api,
) -> None:
    kept = await api.client.get("/health", headers={"X-Request-ID": "trace-abc.123_X"})
    replaced = await api.client.get("/health", headers={"X-Request-ID": "a b\tc" + "x" * 200})

    assert kept.headers["x-request-id"] == "trace-abc.123_X"
    assert replaced.headers["x-request-id"] not in ("", "a b\tc" + "x" * 200)
    assert len(replaced.headers["x-request-id"]) == 32


# --- CORS -----------------------------------------------------------------------------------


async def test_cors_preflight_from_an_allowed_origin_is_accepted(api: Api) -> None:
    response = await api.client.options(
        "/health",
        headers={
            "Origin": ALLOWED_ORIGIN,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "content-type",
        },
    )

    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "GET" in response.headers["access-control-allow-methods"]
    assert "content-type" in response.headers["access-control-allow-headers"].lower()
    assert_security_headers(response)


async def test_cors_preflight_from_another_origin_is_refused(api: Api) -> None:
    response = await api.client.options(
        "/health",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
    )

    assert response.status_code == 400
    assert "access-control-allow-origin" not in response.headers
    assert_security_headers(response)


async def test_cors_simple_request_exposes_request_id_only_to_allowed_origins(api: Api) -> None:
    allowed = await api.client.get("/health", headers={"Origin": ALLOWED_ORIGIN})
    other = await api.client.get("/health", headers={"Origin": "https://evil.example"})

    assert allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "x-request-id" in allowed.headers["access-control-expose-headers"].lower()
    assert other.status_code == 200  # CORS is enforced by the browser, not by refusing the GET
    assert "access-control-allow-origin" not in other.headers


async def test_cors_headers_are_on_error_responses_too_so_a_browser_can_read_them(
    api: Api,
) -> None:
    for path, status in (("/no/such/route", 404), ("/probe/items", 422), ("/probe/boom", 500)):
        response = await api.client.get(path, headers={"Origin": ALLOWED_ORIGIN})

        assert response.status_code == status
        assert response.headers.get("access-control-allow-origin") == ALLOWED_ORIGIN, path
        assert response.json()["status"] == "error"


# --- request log line -----------------------------------------------------------------------


async def test_every_request_is_logged_once_at_info_with_its_fields(api: Api) -> None:
    position = len(api.logs.getvalue())

    ok = await api.client.get("/openapi.json", headers={"X-Request-ID": "log-line-check-1"})
    missing = await api.client.get("/no/such/route")
    bad = await api.client.get("/probe/items", params={"limit": "x"})

    requests = [line for line in api.log_lines_since(position) if line["event"] == "request"]
    assert len(requests) == 3
    for line, response, path in zip(
        requests, (ok, missing, bad), ("/openapi.json", "/no/such/route", "/probe/items"),
        strict=True,
    ):  # fmt: skip
        assert line["level"] == "info"
        assert line["logger"] == "glisk.request"
        assert line["method"] == "GET"
        assert line["path"] == path
        assert line["status_code"] == response.status_code
        assert isinstance(line["duration_ms"], int | float)
        assert line["duration_ms"] >= 0
        assert line["request_id"] == response.headers["x-request-id"]
    assert requests[0]["request_id"] == "log-line-check-1"
    assert "limit=x" not in json.dumps(requests[2])  # the query string is not logged


async def test_probes_are_not_logged_at_info_and_a_server_error_always_is(api: Api) -> None:
    position = len(api.logs.getvalue())

    for path in ("/health", "/metrics", "/health"):
        assert (await api.client.get(path)).status_code == 200
    assert (await api.client.get("/probe/boom")).status_code == 500

    requests = [line for line in api.log_lines_since(position) if line["event"] == "request"]
    assert [(line["path"], line["level"]) for line in requests] == [("/probe/boom", "warning")]


@pytest.mark.parametrize(
    ("request_log_level", "logged"),
    [
        ("INFO", [("/openapi.json", "info"), ("/slow", "warning"), ("/no/such/route", "info")]),
        ("DEBUG", [("/slow", "warning")]),  # below LOG_LEVEL=INFO: only what always shows
    ],
)
async def test_the_request_log_level_is_a_setting_and_a_slow_request_is_always_logged(
    postgres_container: Database, request_log_level: str, logged: list[tuple[str, str]]
) -> None:
    settings = api_settings(
        postgres_container.url,
        app_env="production",
        request_log_level=request_log_level,
        request_slow_seconds=0.2,
    )
    with logging_restored():
        app, logs = create_logged_app(settings)
        slow = asyncio.Event()

        @app.get("/slow", include_in_schema=False)
        async def slow_route() -> dict[str, bool]:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(slow.wait(), 0.3)  # nothing sets it: takes 0.3 s
            return {"slow": True}

        async with serving(app) as client:
            for path in ("/openapi.json", "/slow", "/no/such/route", "/health"):
                await client.get(path)
    requests = [line for line in json_lines(logs.getvalue()) if line["event"] == "request"]
    assert [(line["path"], line["level"]) for line in requests] == logged
    slow_line = next(line for line in requests if line["path"] == "/slow")
    assert slow_line["slow"] is True and slow_line["duration_ms"] >= 200


# --- credentials ----------------------------------------------------------------------------


async def test_no_database_credentials_in_any_response_or_log_line(api: Api) -> None:
    responses = [
        await api.client.get(path)
        for path in ("/health", "/openapi.json", "/docs", "/no/such/route", "/probe/boom")
    ]
    responses.append(await api.client.post("/health"))
    responses.append(await api.client.get("/probe/items", params={"limit": "x"}))

    assert len(api.secret) >= 8, "the check needs a distinctive password"
    for response in responses:
        assert api.secret not in response.text
        assert all(api.secret not in value for value in response.headers.values())
    logs = api.logs.getvalue()
    assert "app.started" in logs  # start-up logged the (masked) database URL
    assert api.secret not in logs
