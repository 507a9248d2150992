"""A fixed mix of tokens in every state, lease and backoff (``seed``), what ``glisk status``
must count in it (``EXPECTED_STAGES``), and plain SQL against a database URL (``sql``)."""

from __future__ import annotations

from typing import Any

from psycopg.types.json import Jsonb

from glisk.testing import connect
from tests.support.factories import wallet

# Each seeded group: (how many, status, image_path set, metadata_cid set, lease, backoff, holder,
# error_data). lease: None (unclaimed), "live" or "expired"; backoff: not_before in the future.
GROUPS: list[tuple[int, str, bool, bool, str | None, bool, str | None, dict[str, Any] | None]] = [
    # image stage
    (3, "detected", False, False, None, False, None, None),
    (1, "detected", False, False, None, True, None, None),
    (2, "generating", False, False, "live", False, "w1", None),
    (1, "generating", False, False, "live", False, "w2", None),
    (2, "generating", False, False, "expired", False, "w3", None),
    (1, "generating", False, False, None, True, "w1", {"last_error": {"type": "E"}}),
    # upload stage
    (2, "generating", True, False, None, False, "w1", None),
    (1, "uploading", True, False, "live", False, "w4", None),
    (2, "uploading", True, False, None, True, "w4", None),
    (1, "uploading", True, False, "expired", False, "w4", None),
    # reveal stage
    (4, "ready", True, True, None, False, None, None),
    (1, "ready", True, True, "live", False, "w5", None),
    (1, "ready", True, True, "expired", False, "w5", None),
    (1, "ready", True, True, None, True, "w5", None),
    # finished
    (5, "revealed", True, True, None, False, "w5", None),
    (
        2,
        "failed",
        False,
        False,
        None,
        False,
        "w1",
        {"reason": "max_attempts_exceeded", "stage": "image"},
    ),
    (1, "failed", True, False, None, False, "w4", {"reason": "permanent_error", "stage": "upload"}),
    (
        1,
        "failed",
        True,
        True,
        None,
        False,
        "w5",
        {"reason": "max_attempts_exceeded", "stage": "reveal"},
    ),
    (1, "failed", False, False, None, False, None, {"reason": "gave_up"}),
]

EXPECTED_STAGES = {
    "image": {
        "waiting": 3,
        "in_flight": 3,
        "expired": 2,
        "backoff": 2,
        "holders": {"w1": 2, "w2": 1},
    },
    "upload": {"waiting": 2, "in_flight": 1, "expired": 1, "backoff": 2, "holders": {"w4": 1}},
    "reveal": {"waiting": 4, "in_flight": 1, "expired": 1, "backoff": 1, "holders": {"w5": 1}},
}


def seed(url: str) -> None:
    """Insert GROUPS with minted times one minute apart, the oldest first (token_id order)."""
    with connect(url) as conn:
        author = conn.execute(
            "INSERT INTO authors (id, wallet_address, prompt_text, created_at) "
            "VALUES (gen_random_uuid(), %s, 'a prompt for tests', now()) RETURNING id",
            (wallet(),),
        ).fetchone()
        assert author is not None
        token_id = 0
        for count, status, image, cid, lease, backoff, holder, error in GROUPS:
            for _ in range(count):
                token_id += 1
                conn.execute(
                    """
                    INSERT INTO tokens_s0 (id, token_id, author_id, minter_address, status,
                        mint_timestamp, image_path, metadata_cid, claimed_by, claim_id,
                        lease_expires_at, not_before, attempts, error_data, created_at)
                    VALUES (gen_random_uuid(), %(token_id)s, %(author)s, %(wallet)s,
                        %(status)s, timezone('utc', now()) - make_interval(mins => 100 - %(token_id)s),
                        %(image)s, %(cid)s, %(holder)s,
                        CASE WHEN %(lease)s::text IS NULL THEN NULL ELSE gen_random_uuid() END,
                        CASE %(lease)s::text
                            WHEN 'live' THEN timezone('utc', now()) + interval '5 minutes'
                            WHEN 'expired' THEN timezone('utc', now()) - interval '5 minutes'
                        END,
                        CASE WHEN %(backoff)s THEN timezone('utc', now()) + interval '10 minutes'
                        END,
                        %(attempts)s, %(error)s, now())
                    """,
                    {
                        "token_id": token_id,
                        "author": author[0],
                        "wallet": wallet(),
                        "status": status,
                        "image": f"/images/{token_id}.png" if image else None,
                        "cid": "bafy-meta" if cid else None,
                        "holder": holder,
                        "lease": lease,
                        "backoff": backoff,
                        "attempts": 2 if holder else 0,
                        "error": Jsonb(error) if error is not None else None,
                    },
                )


def sql(url: str, statement: str, *params: Any) -> list[tuple[Any, ...]]:
    with connect(url) as conn:
        cursor = conn.execute(statement.encode(), params or None)
        return cursor.fetchall() if cursor.description is not None else []
