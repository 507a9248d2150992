"""POST /webhooks/alchemy: signed Alchemy custom-webhook payloads recorded log by log; anything
unsigned refused with nothing written; redelivery, reordering and removed logs handled."""

from __future__ import annotations

import itertools
import json
import random
import secrets
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from glisk.ingest import state
from glisk.ingest.state import Cursor
from glisk.models import MintLog
from glisk.uow import UnitOfWorkFactory
from tests.support import factories
from tests.support.api import api_settings, create_logged_app, logging_restored, serving
from tests.support.database import Database
from tests.support.ingest import alchemy_payload, block_of, signed

KEY = "whsec_" + secrets.token_hex(16)
CONTRACT = "0x" + "5f" * 20
_blocks = itertools.count(2_000)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    with logging_restored():
        yield


def mint_log(start: int, quantity: int = 1, **overrides: Any) -> MintLog:
    block = next(_blocks)
    fields: dict[str, Any] = {
        "tx_hash": factories.tx_hash(),
        "log_index": 3 * quantity,
        "block_number": block,
        "block_hash": "0x" + secrets.token_hex(32),
        "block_timestamp": datetime(2026, 1, 1) + timedelta(seconds=2 * block),
        "minter": factories.wallet(),
        "author": factories.wallet(),
        "start_token_id": start,
        "quantity": quantity,
    }
    fields.update(overrides)
    return MintLog(**fields)


def payload(logs: list[MintLog], **kwargs: Any) -> bytes:
    return alchemy_payload(CONTRACT, block_of(logs[0]), logs, **kwargs)


async def post(client: httpx.AsyncClient, body: bytes, key: str | None = KEY) -> httpx.Response:
    headers = signed(key, body) if key else {"Content-Type": "application/json"}
    return await client.post("/webhooks/alchemy", content=body, headers=headers)


async def counts(uow_factory: UnitOfWorkFactory) -> tuple[int, int, int]:
    async with uow_factory() as uow:
        row = (
            await uow.session.execute(
                text(
                    "SELECT (SELECT count(*) FROM authors), (SELECT count(*) FROM mint_events), "
                    "(SELECT count(*) FROM tokens_s0)"
                )
            )
        ).one()
    return (row[0], row[1], row[2])


def app_for(database: Database, **overrides: Any) -> Any:
    values = {"alchemy_webhook_signing_key": KEY, "glisk_contract_address": CONTRACT}
    return create_logged_app(api_settings(database.url, **(values | overrides)))


async def test_every_log_of_a_payload_is_answered_and_a_duplicate_in_the_middle_stops_nothing(
    postgres_container: Database, uow_factory: UnitOfWorkFactory
) -> None:
    first, second, third = mint_log(1, 2), mint_log(3), mint_log(4, 5)
    second = MintLog(**{**second.to_json(), "block_number": first.block_number,
                        "block_hash": first.block_hash,
                        "block_timestamp": first.block_timestamp})  # fmt: skip
    third = MintLog(**{**third.to_json(), "block_number": first.block_number,
                       "block_hash": first.block_hash,
                       "block_timestamp": first.block_timestamp})  # fmt: skip
    other_contract = {
        "data": "0x",
        "topics": ["0x" + "ab" * 32],
        "index": 99,
        "account": {"address": "0x" + "99" * 20},
        "transaction": {"hash": factories.tx_hash()},
    }
    app, logs = app_for(postgres_container)
    async with serving(app) as client:
        first_answer = await post(client, payload([second]))
        assert first_answer.json()["new"] == 1
        response = await post(client, payload([first, second, third], extra_logs=[other_contract]))
        metrics = (await client.get("/metrics")).text

    assert response.status_code == 200
    body = response.json()
    assert [e["answer"] for e in body["logs"]] == ["new", "duplicate", "new"]
    assert (body["new"], body["duplicate"], body["ignored"]) == (2, 1, 1)
    assert await counts(uow_factory) == (3, 3, 8)
    async with uow_factory() as uow:
        events = await uow.mint_events.get_by_block_range(first.block_number, first.block_number)
    assert {(e.tx_hash, e.block_hash, e.block_timestamp) for e in events} == {
        (log.tx_hash, first.block_hash, first.block_timestamp) for log in (first, second, third)
    }
    assert 'glisk_webhook_logs_total{answer="new"} 3.0' in metrics
    assert KEY not in logs.getvalue()


@pytest.mark.parametrize(
    "headers",
    [
        {},  # no signature
        {"X-Alchemy-Signature": "00" * 32},  # a wrong one
        {"X-Alchemy-Signature": b"not hex at all \xe9"},  # latin-1, as HTTP allows
        "another key",
        "another body",
    ],
)
async def test_a_missing_or_invalid_signature_is_a_401_and_writes_nothing(
    postgres_container: Database, uow_factory: UnitOfWorkFactory, headers: Any
) -> None:
    body = payload([mint_log(1, 3)])
    if headers == "another key":
        headers = signed("whsec_other", body)
    elif headers == "another body":
        headers = signed(KEY, body + b" ")
    app, logs = app_for(postgres_container)
    async with serving(app) as client:
        response = await client.post("/webhooks/alchemy", content=body, headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "UNAUTHORIZED"
    assert await counts(uow_factory) == (0, 0, 0)
    assert KEY not in logs.getvalue() and body.decode() not in logs.getvalue()


async def test_with_no_signing_key_configured_the_route_exists_and_refuses_everything(
    postgres_container: Database, uow_factory: UnitOfWorkFactory
) -> None:
    body = payload([mint_log(1)])
    app, _ = app_for(postgres_container, alchemy_webhook_signing_key=None)
    async with serving(app) as client:
        for key in (KEY, "", None):
            response = await post(client, body, key=key)
            assert response.status_code == 401
        schema = (await client.get("/openapi.json")).json()
    assert "/webhooks/alchemy" in schema["paths"]
    assert await counts(uow_factory) == (0, 0, 0)


async def test_redelivered_and_reordered_payloads_record_each_log_once(
    postgres_container: Database, uow_factory: UnitOfWorkFactory
) -> None:
    logs = [mint_log(1 + 5 * i, 1 + i % 5) for i in range(12)]
    payloads = [payload(logs[i : i + 3]) for i in range(0, 12, 3)]
    deliveries = payloads * 3
    random.Random(7).shuffle(deliveries)
    app, _ = app_for(postgres_container)
    async with serving(app) as client:
        answers = [(await post(client, body)).json() for body in deliveries]
    assert sum(a["new"] for a in answers) == len(logs)
    assert sum(a["duplicate"] for a in answers) == 2 * len(logs)
    assert await counts(uow_factory) == (12, 12, sum(log.quantity for log in logs))


async def test_a_removed_log_is_rolled_back_once_and_never_recorded_again_below_the_cursor(
    postgres_container: Database, uow_factory: UnitOfWorkFactory
) -> None:
    orphan, kept = mint_log(1, 2), mint_log(3)
    app, _ = app_for(postgres_container)
    async with serving(app) as client:
        await post(client, payload([orphan]))
        await post(client, payload([kept]))
        removed = (await post(client, payload([orphan], removed=True))).json()
        again = (await post(client, payload([orphan], removed=True))).json()
        # The follower has since consumed the orphan's block and found no such log there: a
        # late redelivery of the orphan is not written again.
        async with uow_factory() as uow:
            await uow.system_state.set_state(
                state.CURSOR, Cursor(orphan.block_number + 10, "0x" + "77" * 32).to_json()
            )
        late = (await post(client, payload([orphan]))).json()
        known = (await post(client, payload([kept]))).json()
    assert [removed["logs"][0]["answer"], again["logs"][0]["answer"]] == ["rolled_back", "removed"]
    assert late["logs"][0]["answer"] == "orphaned" and late["new"] == 0
    assert known["logs"][0]["answer"] == "duplicate"
    assert await counts(uow_factory) == (2, 1, 1)


async def test_a_signed_body_that_is_not_a_custom_webhook_payload_is_a_400_naming_the_field(
    postgres_container: Database, uow_factory: UnitOfWorkFactory
) -> None:
    good = json.loads(payload([mint_log(1)]))
    good["event"]["data"]["block"]["logs"][0]["data"] = "0x12"
    app, _ = app_for(postgres_container, chain_id=8453)  # Base; the payload says ETH_MAINNET
    async with serving(app) as client:
        wrong_type = await post(client, json.dumps({**good, "type": "ADDRESS_ACTIVITY"}).encode())
        bad_data = await post(client, json.dumps(good).encode())
        not_json = await post(client, b"{nope")
        other_chain = await post(client, payload([mint_log(1)]))
    assert wrong_type.status_code == bad_data.status_code == not_json.status_code == 400
    assert wrong_type.json()["error"]["message"].startswith("type: must be GRAPHQL")
    assert bad_data.json()["error"]["message"].startswith("event.data.block.logs[0].data: ")
    assert other_chain.status_code == 400
    assert other_chain.json()["error"]["message"].startswith(
        "event.network: must be the network of CHAIN_ID 8453"
    )
    assert await counts(uow_factory) == (0, 0, 0)
