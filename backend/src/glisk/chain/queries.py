"""Every statement the reveal keeper sends, each written out whole, named, with its locking.

The keeper runs inside a reveal worker's handler and sends these through the worker's write
connection (``glisk.workers.checkpoints.handler_write``), psycopg ``%(name)s`` parameters.

Fencing: a statement that records something the keeper is about to broadcast (a reveal, a
replacement) names the batch's claims and writes only while every one of them is live, like
``record_reveal``; a late holder records nothing and so sends nothing. Statements that record
what the chain did (a broadcast, a mined block) are not fenced: they state facts.

Lock order: token rows (id order), then the allocator row, then reveal rows: every keeper
statement that takes more than one of these takes them in that order, and the worker's own
statements never lock an allocator, so none of them deadlock.

Senders are stored lowercase; times come from the database clock (naive UTC).
"""

from __future__ import annotations

NOW = "(now() AT TIME ZONE 'utc')"

# The batch's claims, locked in id order, and whether all of them are live (the fence).
_HELD = f"""held AS MATERIALIZED (
    SELECT id, claim_id FROM tokens_s0
    WHERE claim_id = ANY(CAST(%(claim_ids)s AS uuid[])) AND lease_expires_at > {NOW}
    ORDER BY id
    FOR UPDATE
),
everyone AS (
    SELECT count(*) = cardinality(CAST(%(claim_ids)s AS uuid[])) AS live,
           array_agg(id ORDER BY id) AS token_ids
    FROM held
)"""

START = f"""
-- keeper_start: at start-up, the allocator of (chain_id, address) reconciled with the chain:
-- created at the chain's confirmed transaction count, or moved up to it when the chain is ahead
-- (someone else used the key, or the database was restored), never down. Returns the allocator
-- before (NULL: new) and after, and the keeper's pending reveals (count, lowest nonce).
-- Locks: the allocator row, until commit.
WITH before AS (
    SELECT next_nonce FROM keeper_nonces WHERE chain_id = %(chain_id)s AND address = %(address)s
),
after AS (
    INSERT INTO keeper_nonces (chain_id, address, next_nonce, updated_at)
    VALUES (%(chain_id)s, %(address)s, %(confirmed)s, {NOW})
    ON CONFLICT (chain_id, address) DO UPDATE
    SET next_nonce = greatest(keeper_nonces.next_nonce, EXCLUDED.next_nonce),
        updated_at = EXCLUDED.updated_at
    RETURNING next_nonce
)
SELECT (SELECT next_nonce FROM before), (SELECT next_nonce FROM after),
       count(*), min(r.nonce)
FROM reveal_transactions AS r
WHERE r.status = 'pending' AND r.chain_id = %(chain_id)s AND r.sender = %(address)s
"""

HELD_NONCES = """
-- keeper_held_nonces: the nonces from %(from)s up that a pending reveal holds, or that a filler
-- recorded without a reveal holds (a gap filled earlier); what is left in [from, allocator) is a
-- gap. No locks.
SELECT nonce FROM reveal_transactions
WHERE status = 'pending' AND chain_id = %(chain_id)s AND sender = %(address)s
  AND nonce >= %(from)s
UNION
SELECT nonce FROM reveal_attempts
WHERE reveal_id IS NULL AND sender = %(address)s AND nonce >= %(from)s
"""

NEXT_NONCE = """
-- keeper_next_nonce: the nonce the next reveal of (chain_id, address) will take, if no other
-- worker takes it first (keeper_record checks). No locks.
SELECT next_nonce FROM keeper_nonces WHERE chain_id = %(chain_id)s AND address = %(address)s
"""

RECORD = f"""
-- keeper_record: before a reveal is broadcast, take its nonce and record it, in one statement,
-- all or nothing, and only if:
--   (1) every claim of the batch is live (the fence);
--   (2) the allocator of (chain_id, sender) still stands at %(nonce)s, the nonce the transaction
--       was signed with (else another worker took it: sign again with the next one);
--   (3) no token of the batch is in another pending reveal (a transaction in flight: each such
--       token's checkpoint is pointed back at it instead, for the next claim to reconcile);
--   (4) no reveal has this idempotency key yet (else the tokens are pointed at that one, which
--       the next claim reconciles too: confirmed, they complete with it; failed, the next key
--       names it and differs).
-- Writes: the allocator moves to nonce + 1; a pending reveal_transactions row; its first attempt
-- (signed bytes, hash, fees); each token's checkpoint pointing at the row.
-- Returns one row: live, allocator's next nonce (before), reveal id (NULL: nothing recorded),
-- tokens in flight elsewhere, whether the key was taken.
-- Locks: the batch's token rows in id order, then the allocator row, until commit.
WITH {_HELD},
in_flight AS MATERIALIZED (
    SELECT r.id, r.tx_hash, r.token_ids, r.nonce, r.sender
    FROM reveal_transactions AS r, everyone
    WHERE r.status = 'pending' AND r.token_ids && everyone.token_ids
    UNION  -- a reveal of this very batch (same key: same tokens), whatever became of it
    SELECT r.id, r.tx_hash, r.token_ids, r.nonce, r.sender
    FROM reveal_transactions AS r
    WHERE r.idempotency_key = %(key)s
),
key_taken AS MATERIALIZED (
    SELECT EXISTS (SELECT 1 FROM reveal_transactions WHERE idempotency_key = %(key)s) AS taken
),
allocator AS MATERIALIZED (
    -- Joined with everyone so the token rows are locked first (the lock order above).
    SELECT k.next_nonce FROM keeper_nonces AS k, everyone
    WHERE k.chain_id = %(chain_id)s AND k.address = %(sender)s
    FOR UPDATE OF k
),
allocated AS (
    UPDATE keeper_nonces AS k
    SET next_nonce = k.next_nonce + 1, updated_at = {NOW}
    FROM everyone
    WHERE k.chain_id = %(chain_id)s AND k.address = %(sender)s AND k.next_nonce = %(nonce)s
      AND everyone.live AND NOT EXISTS (SELECT 1 FROM in_flight)
    RETURNING k.next_nonce
),
reveal AS (
    INSERT INTO reveal_transactions (id, token_ids, tx_hash, status, created_at, chain_id,
                                     sender, nonce, idempotency_key)
    SELECT gen_random_uuid(), everyone.token_ids, %(tx_hash)s, 'pending', {NOW}, %(chain_id)s,
           %(sender)s, %(nonce)s, %(key)s
    FROM everyone, allocated
    RETURNING id
),
attempt AS (
    INSERT INTO reveal_attempts (id, reveal_id, tx_hash, kind, sender, nonce, raw, gas_limit,
                                 max_fee_per_gas, max_priority_fee_per_gas, created_at)
    SELECT gen_random_uuid(), reveal.id, %(tx_hash)s, 'reveal', %(sender)s, %(nonce)s, %(raw)s,
           %(gas_limit)s, %(max_fee)s, %(priority_fee)s, {NOW}
    FROM reveal
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
),
restored AS (
    UPDATE tokens_s0 AS t
    SET checkpoint = jsonb_build_object('reveal', jsonb_build_object(
        'id', f.id, 'tx_hash', f.tx_hash,
        'data', jsonb_build_object('nonce', f.nonce, 'sender', f.sender)))
    FROM held, in_flight AS f, everyone
    WHERE everyone.live AND t.id = held.id AND held.id = ANY(f.token_ids)
    RETURNING t.id
)
SELECT everyone.live, (SELECT next_nonce FROM allocator), (SELECT id FROM reveal),
       (SELECT count(*) FROM restored), key_taken.taken,
       (SELECT count(*) FROM attempt) + (SELECT count(*) FROM marked)
FROM everyone, key_taken
"""

ATTEMPT = f"""
-- keeper_attempt: before broadcasting another signed transaction for a pending reveal's nonce (a
-- replacement paying more, or a filler spending the nonce), record it; only while every claim
-- named is live and the reveal is still pending. Returns the new attempt's id (no row: refused).
-- Locks: the claims' token rows in id order, then the reveal row, until commit.
WITH {_HELD},
reveal AS MATERIALIZED (
    SELECT r.id FROM reveal_transactions AS r, everyone
    WHERE r.id = %(reveal_id)s AND r.status = 'pending' AND everyone.live
    FOR UPDATE OF r
)
INSERT INTO reveal_attempts (id, reveal_id, tx_hash, kind, sender, nonce, raw, gas_limit,
                             max_fee_per_gas, max_priority_fee_per_gas, created_at)
SELECT gen_random_uuid(), reveal.id, %(tx_hash)s, %(kind)s, %(sender)s, %(nonce)s, %(raw)s,
       %(gas_limit)s, %(max_fee)s, %(priority_fee)s, {NOW}
FROM reveal
RETURNING id
"""

GAP_FILLER = f"""
-- keeper_gap_filler: before broadcasting a filler for a nonce no reveal holds (a gap found at
-- start-up), record it without a reveal; only while that nonce is still below the allocator and
-- no pending reveal holds it. Returns the attempt's id (no row: not a gap any more).
-- Locks: the allocator row, until commit.
WITH allocator AS MATERIALIZED (
    SELECT next_nonce FROM keeper_nonces
    WHERE chain_id = %(chain_id)s AND address = %(sender)s
    FOR UPDATE
)
INSERT INTO reveal_attempts (id, reveal_id, tx_hash, kind, sender, nonce, raw, gas_limit,
                             max_fee_per_gas, max_priority_fee_per_gas, created_at)
SELECT gen_random_uuid(), NULL, %(tx_hash)s, 'filler', %(sender)s, %(nonce)s, %(raw)s,
       %(gas_limit)s, %(max_fee)s, %(priority_fee)s, {NOW}
FROM allocator
WHERE %(nonce)s < allocator.next_nonce AND NOT EXISTS (
    SELECT 1 FROM reveal_transactions
    WHERE status = 'pending' AND chain_id = %(chain_id)s AND sender = %(sender)s
      AND nonce = %(nonce)s)
RETURNING id
"""

BROADCAST = f"""
-- keeper_broadcast: a signed transaction reached the node once more (accepted, or known to it).
-- Not fenced: it happened. Locks the attempt's row until commit.
UPDATE reveal_attempts SET broadcasts = broadcasts + 1, last_broadcast_at = {NOW}
WHERE tx_hash = %(tx_hash)s
RETURNING broadcasts
"""

MINED = """
-- keeper_mined: a pending reveal's transaction is mined in a canonical block with enough
-- confirmations: the row names that transaction (a replacement's hash, maybe) and its block;
-- the completion then confirms the row. Not fenced: it happened. Locks the reveal's row.
UPDATE reveal_transactions
SET tx_hash = %(tx_hash)s, block_number = %(block_number)s, block_hash = %(block_hash)s,
    gas_price_gwei = %(gas_price_gwei)s
WHERE id = %(reveal_id)s AND status = 'pending'
RETURNING id
"""

REVEAL = f"""
-- keeper_reveal: one reveal and every attempt for its nonce, oldest first (ages by the database
-- clock, in seconds). No locks.
SELECT r.status, r.chain_id, r.sender, r.nonce, r.tx_hash, a.tx_hash, a.kind, a.raw,
       a.gas_limit, a.max_fee_per_gas, a.max_priority_fee_per_gas,
       extract(epoch FROM {NOW} - a.created_at),
       extract(epoch FROM {NOW} - coalesce(a.last_broadcast_at, a.created_at))
FROM reveal_transactions AS r LEFT JOIN reveal_attempts AS a ON a.reveal_id = r.id
WHERE r.id = %(reveal_id)s
ORDER BY a.created_at, a.id
"""

BLOCKING = """
-- keeper_blocking: the newest attempt of each pending reveal (and gap filler) of a sender whose
-- nonce is in [%(from)s, %(below)s): the transactions a later one waits behind. Any worker may
-- rebroadcast them (the same signed bytes can be mined only once). No locks.
SELECT DISTINCT ON (a.nonce) a.tx_hash, a.raw, a.nonce
FROM reveal_attempts AS a LEFT JOIN reveal_transactions AS r ON r.id = a.reveal_id
WHERE a.sender = %(sender)s AND a.nonce >= %(from)s AND a.nonce < %(below)s
  AND (r.id IS NULL OR r.status = 'pending')
ORDER BY a.nonce, a.created_at DESC, a.id
"""
