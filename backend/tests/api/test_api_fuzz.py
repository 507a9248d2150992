"""Property-based run of schemathesis against the app's own OpenAPI document.

Every operation the app documents (plus the test-only typed route of tests/support/api.py) gets
generated requests, valid and invalid; whatever arrives, the app never answers 5xx, every
response carries the security headers and a request id, and every error is the JSON envelope.
Schemathesis drives the app over ASGI in its own event-loop thread and runs its real lifespan
against the session's database; the fixture ends that lifespan when the test ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.python import asgi

from glisk.app import create_app
from tests.support.api import SECURITY_HEADERS, add_probe_routes, api_settings, logging_restored
from tests.support.database import Database

# A property run of hundreds of requests: in the slow group (.ci/run runs it).
pytestmark = pytest.mark.slow

MAX_EXAMPLES = 100


@pytest.fixture
def api_schema(postgres_container: Database) -> Iterator[Any]:
    with logging_restored():
        # WARNING: the property is about responses; a log line per request is only noise here.
        app = create_app(api_settings(postgres_container.url, log_level="WARNING"))
        add_probe_routes(app)
        try:
            yield schemathesis.openapi.from_asgi("/openapi.json", app)
        finally:
            asgi.shutdown_lifespans()  # the app's lifespan runs in schemathesis's loop thread


def test_generated_requests_never_get_a_5xx_and_always_get_headers_and_envelopes(
    api_schema: Any,
) -> None:
    # Valid and invalid requests for every documented operation. (schemathesis's own
    # `from_fixture(...).parametrize()` needs pytest < 9: it writes Function._nodeid.)
    cases = st.one_of(
        api_schema.as_strategy(generation_mode=GenerationMode.POSITIVE),
        api_schema.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    )
    statuses: set[int] = set()

    @given(case=cases)
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,  # the same examples on every run: a failure is reproducible
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    def check(case: Any) -> None:
        response = case.call()
        statuses.add(response.status_code)

        assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.text}"
        # schemathesis keeps every value of a header, as a list.
        for name, value in SECURITY_HEADERS.items():
            assert response.headers.get(name) == [value]
        assert len(response.headers.get("x-request-id", [])) == 1
        if response.status_code >= 400:
            body = response.json()
            assert body["status"] == "error"
            assert body["error"]["code"]
            assert body["error"]["message"]

    check()
    # The run reached the app with both accepted and rejected requests.
    assert 200 in statuses
    assert any(400 <= status < 500 for status in statuses)


def test_the_fuzzed_schema_covers_the_documented_operations(api_schema: Any) -> None:
    labels = {result.ok().label for result in api_schema.get_all_operations()}
    assert {"GET /health", "GET /probe/items"} <= labels
