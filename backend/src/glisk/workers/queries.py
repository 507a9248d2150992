"""Every statement the leased-claim runtime sends, each written out whole, named and commented.

Parameters use psycopg's ``%(name)s`` style: the worker sends these through psycopg directly and
``TokenLeaseRepository`` through SQLAlchemy's ``exec_driver_sql``, so both run the same text. The
few parts that differ per stage (its index predicate, statuses, result column, channel, and the
claim's LIMIT) are identifiers and literals fixed by ``glisk.pipeline``, never user input;
each statement is built once per stage and cached.

Fencing: every write after a claim names the claim's fencing id (``claim_id``, reachable through
the partial index ``ix_tokens_s0_claim_id``) and, except a release, requires a live lease. A late
holder's write matches no row and changes nothing.

Lock order: every statement that writes several claimed rows first locks them ``ORDER BY id``, so
two of them (a heartbeat and a completion, or a late holder and a rescuer) never deadlock. Claims
take ``FOR UPDATE SKIP LOCKED`` and never wait at all.

All times come from the database clock: ``now()`` in UTC, as the naive timestamp columns hold.
"""

from __future__ import annotations

from functools import cache

from glisk.core.timezone import DB_NOW as NOW
from glisk.pipeline import Stage


def reveal_pending(checkpoint: str) -> str:
    """SQL: true when ``checkpoint`` (a column expression) points at a reveal transaction that is
    still pending, i.e. one that may yet be mined. Such a token is never failed by a claim nor
    stripped of its checkpoint by a failure: only a reconcile may settle it (see reveal.py).
    One primary-key probe of reveal_transactions; a checkpoint without a well-formed reveal id
    (another stage's progress) is never pending."""
    reveal_id = f"{checkpoint} #>> '{{reveal,id}}'"
    return (
        "EXISTS (SELECT 1 FROM reveal_transactions AS r WHERE r.status = 'pending' AND r.id = "
        f"CASE WHEN {reveal_id} ~ '^[0-9a-f]{{8}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-"
        f"[0-9a-f]{{12}}$' THEN CAST({reveal_id} AS uuid) END)"
    )


_CLAIM = """
-- claim_{stage}: take up to {limit} of the oldest tokens the stage may work on now (fresh,
-- released, past their backoff, or abandoned by a holder whose lease ran out), fail those that
-- used max_attempts, and claim the rest for %(holder)s with a new fencing id and a lease.
-- A token whose checkpoint points at a pending reveal transaction is claimed even past
-- max_attempts: that transaction may still be mined, and only the reconcile the claimer runs
-- first may settle it (confirmed: completed with it; can never be mined: failed then).
-- Locks: FOR UPDATE SKIP LOCKED on the candidates, so concurrent claimers get disjoint sets and
-- never wait; held until this statement's transaction ends (commit at once).
-- The MATERIALIZED CTE applies the LIMIT and the locks once; both UPDATEs see its snapshot.
-- The status conditions live in the index predicate only (repeating them made the planner
-- misjudge the row count and sort the whole backlog: 12 ms at 1M tokens instead of 1.4 ms), and
-- the LIMIT is a literal (a generic plan that does not know it did the same: 6 ms).
WITH candidates AS MATERIALIZED (
    SELECT id,
           CASE WHEN attempts < %(max_attempts)s THEN false
                ELSE NOT {reveal_pending} END AS out_of_attempts,
           CASE WHEN claim_id IS NOT NULL THEN claimed_by END AS rescued_from
    FROM tokens_s0
    WHERE {predicate}
      AND (claim_id IS NULL OR lease_expires_at <= {now})
      AND (not_before IS NULL OR not_before <= {now})
    ORDER BY mint_timestamp, id
    LIMIT {limit}
    FOR UPDATE SKIP LOCKED
),
exhausted AS (
    UPDATE tokens_s0 AS t
    SET status = 'failed', claim_id = NULL, lease_expires_at = NULL, not_before = NULL,
        checkpoint = NULL,
        error_data = jsonb_build_object(
            'reason', 'max_attempts_exceeded',
            'stage', '{stage}',
            'attempts', t.attempts,
            'last_holder', t.claimed_by,
            'last_error', t.error_data -> 'last_error')
            || CASE WHEN t.error_data -> 'history' IS NULL THEN CAST('{{}}' AS jsonb)
                    ELSE jsonb_build_object('history', t.error_data -> 'history') END
    FROM candidates AS c
    WHERE t.id = c.id AND c.out_of_attempts
    RETURNING t.id, t.token_id, t.author_id, t.claim_id, t.claimed_by, t.attempts, t.deferrals,
              t.lease_expires_at, t.mint_timestamp, t.image_path, t.metadata_cid,
              c.rescued_from, t.checkpoint, false AS claimed
),
claimed AS (
    UPDATE tokens_s0 AS t
    SET status = '{working}', claimed_by = %(holder)s, claim_id = gen_random_uuid(),
        lease_expires_at = {now} + make_interval(secs => %(lease_seconds)s),
        attempts = t.attempts + 1, not_before = NULL
    FROM candidates AS c
    WHERE t.id = c.id AND NOT c.out_of_attempts
    RETURNING t.id, t.token_id, t.author_id, t.claim_id, t.claimed_by, t.attempts, t.deferrals,
              t.lease_expires_at, t.mint_timestamp, t.image_path, t.metadata_cid,
              c.rescued_from, t.checkpoint, true AS claimed
)
SELECT * FROM claimed UNION ALL SELECT * FROM exhausted
"""

_COMPLETE = """
-- complete_{stage}: apply handlers' results, one row per claim, and end those claims: the token
-- moves {working} -> {done} with the result in {column}; attempts, deferrals, backoff and the
-- checkpoint reset (they belong to the stage). A claim that is no longer live (expired, taken
-- over) or whose token is not in '{working}' matches nothing and is left out of the result:
-- refused alone, its neighbours complete. Locks the held rows in id order until commit.
WITH results AS (
    SELECT * FROM unnest(CAST(%(claim_ids)s AS uuid[]), CAST(%(results)s AS text[]))
        AS r(claim_id, result)
),
held AS MATERIALIZED (
    SELECT t.id, r.claim_id, r.result
    FROM tokens_s0 AS t JOIN results AS r ON t.claim_id = r.claim_id
    -- status compared as text: with statistics that saw few tokens in '{working}' (right after a
    -- burst of mints), "status = ..." led the planner to read the whole backlog through the
    -- status index (40 ms per completion at 200k finished tokens) instead of the claim_id index.
    WHERE t.lease_expires_at > {now} AND t.status::text = '{working}'
    ORDER BY t.id
    FOR UPDATE OF t
),
completed AS (
    UPDATE tokens_s0 AS t
    SET status = '{done}', {column} = h.result, claim_id = NULL, lease_expires_at = NULL,
        attempts = 0, deferrals = 0, not_before = NULL, checkpoint = NULL
    FROM held AS h
    WHERE t.id = h.id
    RETURNING h.claim_id
){confirm}{notify}
"""

# Appended to the reveal stage's completion: the pending reveal transaction whose hash a token was
# revealed with is confirmed in the same statement (data-modifying CTEs always run). The hash may
# be any of the reveal's signed attempts (a replacement mined instead of the first): the row then
# takes that hash.
_CONFIRM_REVEALS = """,
mined AS MATERIALIZED (
    SELECT DISTINCT r.id, h.result
    FROM held AS h
    JOIN reveal_transactions AS r ON r.tx_hash = h.result AND r.status = 'pending'
    UNION
    SELECT DISTINCT a.reveal_id, h.result
    FROM held AS h
    JOIN reveal_attempts AS a ON a.tx_hash = h.result AND a.reveal_id IS NOT NULL
),
confirmed AS (
    UPDATE reveal_transactions AS r
    SET status = 'confirmed', confirmed_at = {now}, tx_hash = m.result
    FROM mined AS m
    WHERE r.id = m.id AND r.status = 'pending'
    RETURNING r.id
)"""

# Appended to a completion that makes tokens claimable for the next stage: one NOTIFY per
# statement (delivered at commit), only when something completed.
_NOTIFY_FED = """,
notified AS MATERIALIZED (
    SELECT pg_notify('{channel}', '') WHERE EXISTS (SELECT 1 FROM completed)
)
SELECT claim_id FROM completed CROSS JOIN (SELECT count(*) FROM notified) AS n"""
_NO_NOTIFY = "\nSELECT claim_id FROM completed"

_FAIL = """
-- fail_{stage}: record failed attempts, one row per claim, and end those claims. Kinds:
--   'retry'     the attempt counts; the token waits out its delay (backoff), or goes to 'failed'
--               when it has used max_attempts;
--   'permanent' the token goes to 'failed' at once;
--   'defer'     the handler asked to be called again later (RetryLater): the attempt is given
--               back and the token waits exactly its delay.
-- error_data keeps the last error while retrying, and the reason, stage, attempts and last holder
-- once failed, next to the history of failures an operator retried (glisk tokens retry); the
-- checkpoint is kept for the next attempt, and cleared once failed unless it points at a
-- pending reveal transaction (that one may still be mined: the operator's retry hands it to a
-- reconcile instead of a new transaction). A claim no longer live matches nothing. Locks the
-- held rows in id order.
WITH failures AS (
    SELECT * FROM unnest(CAST(%(claim_ids)s AS uuid[]), CAST(%(errors)s AS text[]),
                         CAST(%(kinds)s AS text[]), CAST(%(delays)s AS float8[]))
        AS f(claim_id, error, kind, delay)
),
held AS MATERIALIZED (
    SELECT t.id, f.claim_id, CAST(f.error AS jsonb) AS error, f.kind, f.delay,
           f.kind = 'permanent' OR (f.kind = 'retry' AND t.attempts >= %(max_attempts)s) AS final,
           CASE WHEN f.kind = 'defer' THEN greatest(t.attempts - 1, 0) ELSE t.attempts END
               AS attempts,
           {reveal_pending} AS reveal_pending
    FROM tokens_s0 AS t JOIN failures AS f ON t.claim_id = f.claim_id
    WHERE t.lease_expires_at > {now}
    ORDER BY t.id
    FOR UPDATE OF t
)
UPDATE tokens_s0 AS t
SET status = CASE WHEN h.final THEN CAST('failed' AS token_status_enum) ELSE t.status END,
    claim_id = NULL, lease_expires_at = NULL, attempts = h.attempts,
    deferrals = t.deferrals + CASE WHEN h.kind = 'defer' THEN 1 ELSE 0 END,
    not_before = CASE WHEN h.final THEN NULL ELSE {now} + make_interval(secs => h.delay) END,
    checkpoint = CASE WHEN h.final AND NOT h.reveal_pending THEN NULL ELSE t.checkpoint END,
    error_data = CASE WHEN h.final
        THEN jsonb_build_object(
            'reason', CASE WHEN h.kind = 'permanent' THEN 'permanent_error'
                           ELSE 'max_attempts_exceeded' END,
            'stage', '{stage}',
            'attempts', h.attempts,
            'last_holder', t.claimed_by,
            'last_error', h.error)
        ELSE jsonb_build_object('last_error', h.error, 'attempts', h.attempts)
    END
    || CASE WHEN t.error_data -> 'history' IS NULL THEN CAST('{{}}' AS jsonb)
            ELSE jsonb_build_object('history', t.error_data -> 'history') END
FROM held AS h
WHERE t.id = h.id
RETURNING h.claim_id, h.final
"""

HEARTBEAT = f"""
-- heartbeat: extend every live claim of a worker in one statement; returns the claims kept. A
-- claim missing from the result has expired (and may already belong to someone else).
-- Locks the rows in id order, like every multi-row write here.
WITH live AS MATERIALIZED (
    SELECT id, claim_id FROM tokens_s0
    WHERE claim_id = ANY(CAST(%(claim_ids)s AS uuid[])) AND lease_expires_at > {NOW}
    ORDER BY id
    FOR UPDATE
)
UPDATE tokens_s0 AS t
SET lease_expires_at = {NOW} + make_interval(secs => %(lease_seconds)s)
FROM live
WHERE t.id = live.id
RETURNING live.claim_id
"""

_RELEASE = """
-- release: give back claims whose work never started (shutdown): the attempt is returned and
-- the tokens are claimable at once. No lease check: a claim still carrying its fencing id has
-- not been taken over, even if its lease ran out meanwhile. Locks the rows in id order.
WITH held AS MATERIALIZED (
    SELECT id, claim_id FROM tokens_s0
    WHERE claim_id = ANY(CAST(%(claim_ids)s AS uuid[]))
    ORDER BY id
    FOR UPDATE
),
released AS (
    UPDATE tokens_s0 AS t
    SET claim_id = NULL, lease_expires_at = NULL, attempts = greatest(t.attempts - 1, 0)
    FROM held
    WHERE t.id = held.id
    RETURNING held.claim_id
){notify}
"""
_NOTIFY_RELEASED = """,
notified AS MATERIALIZED (
    SELECT pg_notify('{channel}', '') WHERE EXISTS (SELECT 1 FROM released)
)
SELECT claim_id FROM released CROSS JOIN (SELECT count(*) FROM notified) AS n"""

CHECKPOINT = f"""
-- checkpoint: record a handler's progress for every claim given, or for none: the write happens
-- only if all of them are still live (the handler must not go on to its external effect
-- otherwise). Returns the claims written. Locks the rows in id order.
WITH held AS MATERIALIZED (
    SELECT id, claim_id FROM tokens_s0
    WHERE claim_id = ANY(CAST(%(claim_ids)s AS uuid[])) AND lease_expires_at > {NOW}
    ORDER BY id
    FOR UPDATE
),
everyone AS (
    SELECT count(*) = cardinality(CAST(%(claim_ids)s AS uuid[])) AS live FROM held
)
UPDATE tokens_s0 AS t
SET checkpoint = CAST(%(checkpoint)s AS jsonb)
FROM held, everyone
WHERE t.id = held.id AND everyone.live
RETURNING held.claim_id
"""

RECORD_REVEAL = f"""
-- record_reveal: before a reveal transaction is sent, record it as a pending reveal_transactions
-- row for the batch and point every token's checkpoint at it, in one statement, only if every
-- claim of the batch is still live. A rescuer then finds the pending reveal and reconciles it
-- instead of sending a second transaction. Returns the new row's id (no row: refused).
WITH held AS MATERIALIZED (
    SELECT id, claim_id FROM tokens_s0
    WHERE claim_id = ANY(CAST(%(claim_ids)s AS uuid[])) AND lease_expires_at > {NOW}
    ORDER BY id
    FOR UPDATE
),
everyone AS (
    SELECT count(*) = cardinality(CAST(%(claim_ids)s AS uuid[])) AS live,
           array_agg(id ORDER BY id) AS token_ids
    FROM held
),
reveal AS (
    INSERT INTO reveal_transactions (id, token_ids, tx_hash, status, created_at)
    SELECT gen_random_uuid(), everyone.token_ids, %(tx_hash)s, 'pending', {NOW}
    FROM everyone WHERE everyone.live
    RETURNING id
),
marked AS (
    UPDATE tokens_s0 AS t
    SET checkpoint = jsonb_build_object('reveal', jsonb_build_object(
        'id', reveal.id, 'tx_hash', CAST(%(tx_hash)s AS text),
        'data', CAST(%(data)s AS jsonb)))
    FROM held, reveal
    WHERE t.id = held.id
    RETURNING t.id
)
SELECT reveal.id, (SELECT count(*) FROM marked) FROM reveal
"""

REVEALS = """
-- reveals: the reveal transactions a rescued batch's checkpoints point at.
SELECT id, tx_hash, status FROM reveal_transactions WHERE id = ANY(CAST(%(ids)s AS uuid[]))
"""

FAIL_REVEAL = """
-- fail_reveal: a pending reveal transaction that can never be mined (reverted, or its nonce
-- taken by another transaction): its tokens may be sent anew.
UPDATE reveal_transactions SET status = 'failed'
WHERE id = %(id)s AND status = 'pending'
RETURNING id
"""

_NEXT_BACKOFF = """
-- next_backoff_{stage}: seconds until the first of the stage's unclaimed tokens that wait out a
-- backoff becomes claimable (zero or less: now; NULL when none waits). A claim clears
-- not_before, so one still set means the backoff is pending or just passed. Walks the stage's
-- partial index.
SELECT extract(epoch FROM min(not_before) - {now})
FROM tokens_s0
WHERE {predicate} AND not_before IS NOT NULL AND claim_id IS NULL
"""

_RECORDED = """
-- recorded_{stage}: of these tokens, those whose {column} holds exactly the result given. Asked
-- about completions the database refused after an earlier try of the same completion lost its
-- answer (the connection died, or the time limit passed, after the commit): those were written.
-- Reads the rows by primary key; no locks.
SELECT t.id
FROM tokens_s0 AS t
JOIN unnest(CAST(%(token_ids)s AS uuid[]), CAST(%(results)s AS text[])) AS r(id, result)
    ON t.id = r.id
WHERE t.{column} = r.result
"""

COUNT_CLAIMED = """
-- count_claimed: tokens under a claim, live or expired (monitoring and tests).
SELECT count(*) FROM tokens_s0
WHERE claim_id IS NOT NULL AND (CAST(%(status)s AS text) IS NULL OR status::text = %(status)s)
"""

MIGRATED = """
-- migrated: whether the database has the worker runtime's columns (tokens_s0.not_before, added
-- by migration 0004); glisk worker asks once before it claims anything. A catalog read, no locks.
SELECT 1 FROM information_schema.columns
WHERE table_name = 'tokens_s0' AND column_name = 'not_before'
"""


@cache
def claim(stage: Stage, limit: int) -> str:
    """The claim statement for ``stage`` taking at most ``limit`` tokens (a literal; see above)."""
    return _CLAIM.format(
        stage=stage.name,
        predicate=stage.index_predicate,
        working=stage.working.value,
        limit=int(limit),
        now=NOW,
        reveal_pending=reveal_pending("tokens_s0.checkpoint"),
    )


@cache
def complete(stage: Stage) -> str:
    notify = (
        _NOTIFY_FED.format(channel=f"glisk_stage_{stage.feeds}")
        if stage.feeds is not None
        else _NO_NOTIFY
    )
    confirm = _CONFIRM_REVEALS.format(now=NOW) if stage.whole_batch else ""
    return _COMPLETE.format(
        stage=stage.name,
        working=stage.working.value,
        done=stage.done.value,
        column=stage.result_column,
        confirm=confirm,
        notify=notify,
        now=NOW,
    )


@cache
def recorded(stage: Stage) -> str:
    return _RECORDED.format(stage=stage.name, column=stage.result_column)


@cache
def fail(stage: Stage) -> str:
    return _FAIL.format(stage=stage.name, now=NOW, reveal_pending=reveal_pending("t.checkpoint"))


@cache
def release(stage: Stage | None) -> str:
    """Release claims; with a stage, its idle workers are woken to take the tokens back."""
    notify = (
        _NOTIFY_RELEASED.format(channel=stage.channel)
        if stage is not None
        else "\nSELECT claim_id FROM released"
    )
    return _RELEASE.format(notify=notify)


@cache
def next_backoff(stage: Stage) -> str:
    return _NEXT_BACKOFF.format(stage=stage.name, predicate=stage.index_predicate, now=NOW)
