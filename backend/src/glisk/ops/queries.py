"""The operator's statements, each written out whole, named and commented: ``glisk status``
(``ops/status.py``), the API's ``/metrics`` gauges (``glisk.api.metrics``, the same reads),
``glisk tokens retry|show`` (``ops/tokens.py``), and what ``glisk demo`` watches and its verdict
reads of the database (the demo's checks of its own stand-ins stay in ``demo_chain.py`` and
``demo_stages.py``).

Parameters use psycopg's ``%(name)s`` style; ``glisk status`` sends them through psycopg and the
gauges through SQLAlchemy's ``exec_driver_sql``, so both run the same text. The parts that differ
per stage (its index predicate) come from ``glisk.pipeline``, never user input; each such
statement is built once per stage and cached.

Locking: plain reads, no row locks, except the retry's selection (FOR UPDATE) and its write. All
times come from the database clock: ``NOW``, UTC, as the naive timestamp columns hold.
"""

from __future__ import annotations

from functools import cache

from glisk.core.timezone import DB_NOW as NOW
from glisk.pipeline import STAGES

# --- glisk status and the /metrics gauges -------------------------------------------------------

# Above this many rows (planner statistics) the revealed total is an estimate unless asked exactly.
ESTIMATE_ABOVE = 100_000
# The pending reveals IN_FLIGHT reads (the oldest): what glisk status lists, and the gauges' fees.
IN_FLIGHT_SHOWN = 20

STATUS_AT = f"SELECT {NOW}"  # status_at: the database clock the whole status is read at

_STAGE_COUNTS = """
-- status_{stage}: the stage's tokens by lease state. Walks ix_tokens_s0_claim_{stage} (the same
-- predicate), so it reads only the stage's backlog. 'waiting' is unclaimed and past any backoff;
-- an expired lease is claimable too but counted apart (its holder died or stalled).
SELECT
    count(*) FILTER (WHERE claim_id IS NULL AND (not_before IS NULL OR not_before <= {now})),
    count(*) FILTER (WHERE claim_id IS NOT NULL AND lease_expires_at > {now}),
    count(*) FILTER (WHERE claim_id IS NOT NULL AND lease_expires_at <= {now}),
    count(*) FILTER (WHERE claim_id IS NULL AND not_before > {now}),
    extract(epoch FROM {now} - min(mint_timestamp) FILTER (
        WHERE claim_id IS NULL AND (not_before IS NULL OR not_before <= {now})))
FROM tokens_s0
WHERE {predicate}
"""

_HOLDERS = """
-- status_holders_{stage}: live leases of the stage by holder (the stage's partial index).
SELECT claimed_by, count(*) FROM tokens_s0
WHERE {predicate} AND claim_id IS NOT NULL AND lease_expires_at > {now}
GROUP BY claimed_by ORDER BY count(*) DESC, claimed_by
"""

STATUS_COUNTS = """
-- status_counts: every status but 'revealed', exactly, from ix_tokens_s0_status_mint_timestamp
-- (one index range per status: the work is the number of unfinished and failed tokens).
SELECT s.status, (SELECT count(*) FROM tokens_s0 AS t WHERE t.status = s.status)
FROM unnest(CAST(ARRAY['detected', 'generating', 'uploading', 'ready', 'failed']
                 AS token_status_enum[])) AS s(status)
"""

REVEALED_EXACT = "SELECT count(*) FROM tokens_s0 WHERE status = 'revealed'"

TABLE_ROWS = """
-- the planner's row count of tokens_s0 (updated by VACUUM, ANALYZE and autovacuum); -1 or 0
-- before the table was first analyzed.
SELECT reltuples::bigint FROM pg_class WHERE oid = 'tokens_s0'::regclass
"""

KEEPER = f"""
-- status_keeper: each reveal keeper (chain, sender): the allocator's next nonce, the nonce after
-- its newest confirmed reveal, and its pending reveals: how many, the oldest's age, how many are
-- stuck (their newest signed attempt older than %(stuck)s seconds). keeper_nonces holds a row
-- per key; the pending reveals come through ix_reveal_transactions_status, the newest confirmed
-- nonce through uq_reveal_transactions_chain_id_sender_nonce read backwards.
SELECT k.chain_id, k.address, k.next_nonce,
       (SELECT c.nonce + 1 FROM reveal_transactions AS c
        WHERE c.chain_id = k.chain_id AND c.sender = k.address AND c.status = 'confirmed'
        ORDER BY c.nonce DESC LIMIT 1),
       count(p.id),
       extract(epoch FROM {NOW} - min(p.created_at)),
       count(p.id) FILTER (WHERE p.newest_age > %(stuck)s)
FROM keeper_nonces AS k
LEFT JOIN LATERAL (
    SELECT r.id, r.created_at,
           (SELECT extract(epoch FROM {NOW} - max(a.created_at)) FROM reveal_attempts AS a
            WHERE a.reveal_id = r.id) AS newest_age
    FROM reveal_transactions AS r
    WHERE r.status = 'pending' AND r.chain_id = k.chain_id AND r.sender = k.address
) AS p ON true
GROUP BY k.chain_id, k.address, k.next_nonce
ORDER BY k.chain_id, k.address
"""

IN_FLIGHT = f"""
-- status_in_flight: the oldest pending reveals (at most %(limit)s), each with its newest signed
-- attempt (hash, fees, age) and how many it has had (replacements). Pending reveals come through
-- ix_reveal_transactions_status, their attempts through ix_reveal_attempts_reveal_id.
SELECT r.nonce, r.sender, cardinality(r.token_ids), extract(epoch FROM {NOW} - r.created_at),
       a.tx_hash, a.max_fee_per_gas, a.max_priority_fee_per_gas,
       extract(epoch FROM {NOW} - a.created_at), n.attempts, n.broadcasts
FROM reveal_transactions AS r
JOIN LATERAL (
    SELECT tx_hash, max_fee_per_gas, max_priority_fee_per_gas, created_at
    FROM reveal_attempts WHERE reveal_id = r.id ORDER BY created_at DESC, id DESC LIMIT 1
) AS a ON true
JOIN LATERAL (
    SELECT count(*) AS attempts, sum(broadcasts) AS broadcasts
    FROM reveal_attempts WHERE reveal_id = r.id
) AS n ON true
WHERE r.status = 'pending'
ORDER BY r.created_at, r.id
LIMIT %(limit)s
"""

FAILED_BY_REASON = """
-- status_failed: failed tokens by stage and reason (ix_tokens_s0_status_mint_timestamp).
SELECT error_data ->> 'stage', error_data ->> 'reason', count(*)
FROM tokens_s0 WHERE status = 'failed'
GROUP BY 1, 2 ORDER BY count(*) DESC, 1, 2
"""

INGEST_STATE = """
-- status_ingest: the log follower's state, four system_state rows by primary key.
SELECT key, state_value FROM system_state
WHERE key IN ('ingest_cursor', 'ingest_head', 'ingest_last_reorg', 'ingest_halted')
"""


@cache
def stage_counts(stage: str) -> str:
    return _STAGE_COUNTS.format(stage=stage, predicate=STAGES[stage].predicate, now=NOW)


@cache
def stage_holders(stage: str) -> str:
    return _HOLDERS.format(stage=stage, predicate=STAGES[stage].predicate, now=NOW)


# --- glisk tokens show and retry ----------------------------------------------------------------

# tokens_s0 whole: the fields of Token, which the retry rebuilds from the row.
_COLUMNS = (
    "id, token_id, author_id, minter_address, status, mint_timestamp, image_path, image_cid, "
    "metadata_cid, reveal_tx_hash, error_data, created_at, claimed_by, claim_id, "
    "lease_expires_at, attempts, not_before, deferrals, checkpoint"
)

SHOW_TOKEN = f"""
-- show_token: one token, whole, with the database clock to judge its lease by (unique index on
-- token_id; no locks).
SELECT {_COLUMNS}, {NOW} AS now FROM tokens_s0 WHERE token_id = %s
"""

TOKEN_REVEALS = f"""
-- show_reveals: the reveal transactions that carried a token (newest first), each with its
-- signed attempts. Reads reveal_transactions whole (no index on token_ids but the partial one for
-- pending reveals): fine for one token at the operator's request.
SELECT r.id::text, r.status, r.nonce, r.sender, r.tx_hash, r.block_number, r.block_hash,
       r.idempotency_key, r.created_at,
       coalesce(jsonb_agg(jsonb_build_object(
           'tx_hash', a.tx_hash, 'kind', a.kind,
           'max_fee_gwei', round(a.max_fee_per_gas / 1e9, 9),
           'tip_gwei', round(a.max_priority_fee_per_gas / 1e9, 9),
           'broadcasts', a.broadcasts,
           'age_seconds', round(CAST(extract(epoch FROM {NOW} - a.created_at) AS numeric), 1))
           ORDER BY a.created_at) FILTER (WHERE a.id IS NOT NULL), '[]')
FROM reveal_transactions AS r LEFT JOIN reveal_attempts AS a ON a.reveal_id = r.id
WHERE %(id)s = ANY(r.token_ids)
GROUP BY r.id
ORDER BY r.created_at DESC
"""

_RETRY_SELECT = """
-- retry_select: the tokens a retry selects, whole, with the database clock. Locks them FOR
-- UPDATE in token_id order until the retry's transaction ends, so a concurrent retry waits;
-- workers never claim a failed token. {where}: the filters given, ANDed (RETRY_FILTERS).
SELECT {columns}, {now} AS now FROM tokens_s0 WHERE {where} ORDER BY token_id FOR UPDATE
"""

# Each retry filter's condition. Without --ids only failed tokens are read; with --ids every named
# token is, whatever its status, so one that is not failed is refused by the state machine (and
# reported) instead of silently skipped.
RETRY_FAILED = "status = 'failed'"
RETRY_FILTERS = {
    "ids": "token_id = ANY(%(ids)s)",
    "reason": "error_data ->> 'reason' = %(reason)s",
    "stage": "error_data ->> 'stage' = %(stage)s",
    "since": "mint_timestamp >= %(since)s",
}


@cache
def retry_select(filters: tuple[str, ...]) -> str:
    """The selection for the given RETRY_FILTERS names (in that dict's order)."""
    where = [RETRY_FILTERS["ids"] if "ids" in filters else RETRY_FAILED]
    where += [RETRY_FILTERS[name] for name in RETRY_FILTERS if name != "ids" and name in filters]
    return _RETRY_SELECT.format(columns=_COLUMNS, now=NOW, where=" AND ".join(where))


RETRY_WRITE = """
-- retry: what Token.retry_from_failed changed, for a token still failed (locked above).
UPDATE tokens_s0
SET status = CAST(%(status)s AS token_status_enum), image_path = %(image_path)s,
    metadata_cid = %(metadata_cid)s, reveal_tx_hash = %(reveal_tx_hash)s, attempts = 0,
    deferrals = 0, not_before = NULL, checkpoint = %(checkpoint)s, error_data = %(error_data)s
WHERE id = %(id)s AND status = 'failed'
"""

RETRY_REVEALS = """
-- retry_reveals: the reveal transactions retried tokens' checkpoints point at (no locks).
SELECT id::text, tx_hash, status FROM reveal_transactions WHERE id = ANY(CAST(%(ids)s AS uuid[]))
"""

# retry_wake: a stage's channel, so its idle workers take the tokens sent back (at commit).
WAKE_STAGE = "SELECT pg_notify(%s, '')"

# --- glisk demo ---------------------------------------------------------------------------------

LIVE_HOLDER_PIDS = f"""
-- demo_holders: the pids of the workers holding live claims (the holder name is host:pid:random).
SELECT DISTINCT split_part(claimed_by, ':', 2) FROM tokens_s0
WHERE claim_id IS NOT NULL AND lease_expires_at > {NOW}
"""

# What the demo's verdict reads of the database once the workers stopped (no locks).
DEMO_TOKENS = "SELECT token_id, status::text, reveal_tx_hash FROM tokens_s0"
DEMO_REVEALS = "SELECT status::text, tx_hash FROM reveal_transactions ORDER BY created_at"
