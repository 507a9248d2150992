"""``glisk status``, ``glisk tokens show`` and the API's metrics show the reveal keeper: its next
nonce, what is in flight (age, fees, attempts), what is stuck, and the fee cap."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from rich.console import Console

from glisk.ops.status import collect, render
from glisk.ops.tokens import show_token
from glisk.testing import connect
from glisk.uow import UnitOfWorkFactory
from tests.support.api import api_settings, create_logged_app, logging_restored, serving
from tests.support.database import Database
from tests.support.seeding import sql

SENDER = "0x" + "70" * 20
GWEI = 10**9

KEEPER_ROWS = """
INSERT INTO authors (id, wallet_address, prompt_text, created_at)
VALUES ('00000000-0000-0000-0000-0000000000a1', '0x' || repeat('ab', 20), 'a prompt long enough for the rules', now());
INSERT INTO tokens_s0 (id, token_id, author_id, minter_address, status, mint_timestamp,
                       image_path, metadata_cid, created_at)
SELECT ('00000000-0000-0000-0000-00000000000' || g)::uuid, g,
       '00000000-0000-0000-0000-0000000000a1', '0x' || repeat('cd', 20), 'ready', now(),
       '/img.png', 'bafy' || g, now()
FROM generate_series(1, 3) AS g;
INSERT INTO keeper_nonces VALUES (31337, '{sender}', 8, now());
INSERT INTO reveal_transactions (id, token_ids, tx_hash, status, created_at, chain_id, sender,
                                 nonce, idempotency_key)
VALUES
  ('00000000-0000-0000-0000-0000000000f5', ARRAY['00000000-0000-0000-0000-000000000001'::uuid],
   '0x' || repeat('05', 32), 'confirmed', now(), 31337, '{sender}', 5, 'k5'),
  ('00000000-0000-0000-0000-0000000000f6', ARRAY['00000000-0000-0000-0000-000000000002'::uuid],
   '0x' || repeat('06', 32), 'pending', now() - interval '10 minutes', 31337, '{sender}', 6, 'k6'),
  ('00000000-0000-0000-0000-0000000000f7', ARRAY['00000000-0000-0000-0000-000000000003'::uuid],
   '0x' || repeat('07', 32), 'pending', now(), 31337, '{sender}', 7, 'k7');
INSERT INTO reveal_attempts (id, reveal_id, tx_hash, kind, sender, nonce, raw, gas_limit,
                             max_fee_per_gas, max_priority_fee_per_gas, broadcasts, created_at)
VALUES
  (gen_random_uuid(), '00000000-0000-0000-0000-0000000000f6', '0x' || repeat('06', 32), 'reveal',
   '{sender}', 6, '\\x00', 100000, 2 * {gwei}::numeric, {gwei}, 1, timezone('utc', now()) - interval '10 minutes'),
  (gen_random_uuid(), '00000000-0000-0000-0000-0000000000f6', '0x' || repeat('16', 32), 'reveal',
   '{sender}', 6, '\\x00', 100000, 3 * {gwei}::numeric, 2 * {gwei}::numeric, 2, timezone('utc', now()) - interval '5 minutes'),
  (gen_random_uuid(), '00000000-0000-0000-0000-0000000000f7', '0x' || repeat('07', 32), 'reveal',
   '{sender}', 7, '\\x00', 100000, 4 * {gwei}::numeric, {gwei}, 1, timezone('utc', now()));
UPDATE tokens_s0 SET checkpoint = jsonb_build_object('reveal', jsonb_build_object(
    'id', '00000000-0000-0000-0000-0000000000f6', 'tx_hash', '0x' || repeat('06', 32)))
WHERE token_id = 2;
"""


@pytest.fixture
def keeper_rows(postgres_container: Database, uow_factory: UnitOfWorkFactory) -> str:
    with connect(postgres_container.url) as conn:
        conn.execute(KEEPER_ROWS.format(sender=SENDER, gwei=GWEI).encode())
    return postgres_container.url


@pytest.fixture
def restored_logging() -> Iterator[None]:
    with logging_restored():
        yield


def test_status_shows_the_next_nonce_what_is_in_flight_what_is_stuck_and_the_cap(
    keeper_rows: str,
) -> None:
    with connect(keeper_rows) as conn:
        status = collect(conn, stuck_after=60.0, fee_cap_gwei=50.0)
    assert status.keeper is not None
    (keeper,) = status.keeper.keepers
    assert (keeper.chain_id, keeper.address, keeper.next_nonce) == (31337, SENDER, 8)
    assert (keeper.confirmed_up_to, keeper.in_flight, keeper.stuck) == (6, 2, 1)
    assert keeper.oldest_in_flight_seconds is not None and keeper.oldest_in_flight_seconds >= 590
    oldest, newest = status.keeper.in_flight
    assert (oldest.nonce, oldest.attempts, oldest.broadcasts, oldest.stuck) == (6, 2, 3, True)
    assert (oldest.tx_hash, oldest.max_fee_gwei, oldest.tip_gwei) == ("0x" + "16" * 32, 3.0, 2.0)
    assert (newest.nonce, newest.stuck) == (7, False)
    console = Console(width=200, record=True)
    console.print(render(status))
    text = console.export_text()
    assert "reveal keeper (fee cap 50 gwei, stuck after 60 s)" in text and "STUCK" in text
    as_json = json.loads(json.dumps(status.as_json(), default=str))
    assert as_json["keeper"]["keepers"][0]["next_nonce"] == 8


def test_tokens_show_names_the_reveal_and_every_signed_attempt(keeper_rows: str) -> None:
    with connect(keeper_rows) as conn:
        shown = show_token(conn, 2)
    assert shown is not None
    (reveal,) = shown["reveals"]
    assert (reveal["status"], reveal["nonce"], reveal["idempotency_key"]) == ("pending", 6, "k6")
    assert [a["tx_hash"] for a in reveal["attempts"]] == ["0x" + "06" * 32, "0x" + "16" * 32]
    assert [float(a["max_fee_gwei"]) for a in reveal["attempts"]] == [2.0, 3.0]
    assert shown["checkpoint"]["reveal"]["id"] == "00000000-0000-0000-0000-0000000000f6"


async def test_the_api_metrics_carry_the_keeper_gauges_by_chain_only(
    keeper_rows: str, restored_logging: None
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    app, _ = create_logged_app(api_settings(keeper_rows))
    async with serving(app) as client:
        body = (await client.get("/metrics")).text
    found: dict[str, Any] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name.startswith("glisk_keeper"):
                found[sample.name] = (sample.labels, sample.value)
    assert found["glisk_keeper_next_nonce"] == ({"chain_id": "31337"}, 8.0)
    assert found["glisk_keeper_reveals_in_flight"][1] == 2.0
    assert found["glisk_keeper_in_flight_max_fee_gwei"][1] == 4.0
    assert found["glisk_keeper_fee_cap_gwei"][1] == 50.0
    assert SENDER not in body, "a wallet became a label"
    assert sql(keeper_rows, "SELECT count(*) FROM keeper_nonces") == [(1,)]
