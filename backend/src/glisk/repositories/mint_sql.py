"""The statements that record mint logs and find a token's log, written whole (the comment above
each says what it decides and what it locks). ``MintEventRepository`` and ``mint_batch`` send
them.
"""

from __future__ import annotations

from sqlalchemy import text

from glisk.models.mint_event import MAX_MINT_QUANTITY

# Records one mint log in one statement, so a failure anywhere leaves nothing behind.
# Every write is conditioned on `proceed`: the log is not recorded yet and none of its token ids
# exists (both as of the statement's snapshot). The writes then lean on the unique indexes for
# what the snapshot cannot see, i.e. writers in flight:
# - the same log in flight: the mint_events insert waits on the (tx_hash, log_index) key and,
#   once the other writer commits, does nothing; no token is inserted (minted reads `event`).
# - the same new author in flight: the authors insert waits on lower(wallet_address) and does
#   nothing; `author` is then empty and so is everything after it. The caller runs the statement
#   again, and the new snapshot sees the other writer's rows.
# - another log with one of our token ids in flight: the tokens insert has no ON CONFLICT, so the
#   unique token_id index makes it wait and then fail, and the whole statement is undone.
# Row order: event key, then author, then tokens in ascending token_id, in every writer; one log
# per transaction can therefore not deadlock with another.
RECORD = text(
    """
    WITH existing AS (
        SELECT id, token_id, quantity FROM mint_events
        WHERE tx_hash = :tx_hash AND log_index = :log_index
    ),
    taken AS (
        SELECT token_id FROM tokens_s0 WHERE token_id BETWEEN :first AND :last
    ),
    proceed AS (
        SELECT 1 AS go WHERE NOT EXISTS (SELECT FROM existing) AND NOT EXISTS (SELECT FROM taken)
    ),
    found AS (
        SELECT id FROM authors WHERE lower(wallet_address) = lower(:author)
    ),
    created AS (
        INSERT INTO authors (id, wallet_address, prompt_text, created_at)
        SELECT :author_id, :author, :prompt, :now FROM proceed
        WHERE NOT EXISTS (SELECT FROM found)
        ON CONFLICT ((lower(wallet_address))) DO NOTHING
        RETURNING id
    ),
    author AS (
        SELECT id, false AS created FROM found
        UNION ALL
        SELECT id, true FROM created
    ),
    event AS (
        INSERT INTO mint_events (id, tx_hash, log_index, block_number, block_timestamp,
                                 token_id, quantity, detected_at)
        SELECT :event_id, :tx_hash, :log_index, :block_number, :block_timestamp,
               :first, :quantity, :now
        FROM proceed, author
        ON CONFLICT (tx_hash, log_index) DO NOTHING
        RETURNING id
    ),
    minted AS (
        INSERT INTO tokens_s0 (id, token_id, author_id, minter_address, status,
                               mint_timestamp, created_at)
        SELECT t.id, t.token_id, author.id, :minter, 'detected', :block_timestamp, :now
        FROM event, author,
             unnest(CAST(:token_uuids AS uuid[]), CAST(:token_numbers AS integer[]))
                 AS t(id, token_id)
        ORDER BY t.token_id
        RETURNING token_id
    )
    SELECT (SELECT id FROM author) AS author_id,
           (SELECT created FROM author) AS author_created,
           (SELECT id FROM event) AS event_id,
           (SELECT count(*) FROM minted) AS minted,
           (SELECT id FROM existing) AS existing_id,
           (SELECT token_id FROM existing) AS existing_first,
           (SELECT quantity FROM existing) AS existing_quantity,
           (SELECT array_agg(token_id ORDER BY token_id) FROM taken) AS taken
    """
)

# The logs holding the given token ids. A log holds at most MAX_MINT_QUANTITY tokens from its
# token_id on, which bounds the range scan on ix_mint_events_token_id.
HOLDERS = text(
    f"""
    SELECT e.tx_hash, e.log_index
    FROM mint_events e
    WHERE e.token_id BETWEEN :first - {MAX_MINT_QUANTITY - 1} AND :last
      AND e.token_id + e.quantity > :first
      AND EXISTS (
          SELECT FROM unnest(CAST(:ids AS integer[])) AS x(id)
          WHERE x.id >= e.token_id AND x.id < e.token_id + e.quantity
      )
      AND (e.tx_hash, e.log_index) <> (:tx_hash, :log_index)
    ORDER BY e.token_id
    LIMIT 1
    """
)

# Records many mint logs in one statement: the same rules as RECORD, per log. The caller
# (record_mints) sends distinct logs whose token id ranges do not overlap; each input row `n` is
# decided on its own:
# - `existing`: the log is recorded already (duplicate, or the same key with other token ids);
# - `taken`: a token id of the log exists (a conflict);
# - otherwise it proceeds: its author is found (any letter case) or created, its event and its
#   tokens (detected, minted at the block's time) inserted.
# Decisions read the statement's snapshot; the inserts lean on the unique indexes for writers in
# flight, as RECORD does: the same log or the same new author in flight is waited for and then
# skipped (no event row comes back: the caller runs those logs again, and the next snapshot sees
# the other writer's rows); another log with one of our token ids in flight makes the token
# INSERT wait and then fail, undoing the whole statement (the caller runs it again inside a
# savepoint). Write order, in every writer: authors by lower(wallet), events by (tx_hash,
# log_index), tokens by token_id; each INSERT sorts its rows before writing any, so a statement
# finishes one table before the next and two of them cannot deadlock.
# Locks: the rows written, until the caller's transaction ends.
RECORD_MANY = text(
    """
    WITH input AS (
        SELECT * FROM unnest(
            CAST(:tx_hashes AS varchar[]), CAST(:log_indexes AS integer[]),
            CAST(:block_numbers AS integer[]), CAST(:block_hashes AS varchar[]),
            CAST(:block_timestamps AS timestamp[]), CAST(:minters AS varchar[]),
            CAST(:authors AS varchar[]), CAST(:firsts AS integer[]), CAST(:quantities AS integer[])
        ) WITH ORDINALITY AS i(tx_hash, log_index, block_number, block_hash, block_timestamp,
                               minter, author, first, quantity, n)
    ),
    existing AS (
        -- One probe of the (tx_hash, log_index) key per input log, whatever the table's size:
        -- LIMIT keeps the planner from turning this into a hash join over the whole table.
        SELECT i.n, e.id, e.token_id, e.quantity
        FROM input i CROSS JOIN LATERAL (
            SELECT id, token_id, quantity FROM mint_events
            WHERE tx_hash = i.tx_hash AND log_index = i.log_index
            LIMIT 1
        ) AS e
    ),
    taken AS (
        SELECT i.n, array_agg(t.token_id ORDER BY t.token_id) AS ids
        FROM input i JOIN tokens_s0 t
          ON t.token_id BETWEEN i.first AND i.first + i.quantity - 1
        WHERE NOT EXISTS (SELECT FROM existing x WHERE x.n = i.n)
        GROUP BY i.n
    ),
    proceed AS (
        SELECT i.* FROM input i
        WHERE NOT EXISTS (SELECT FROM existing x WHERE x.n = i.n)
          AND NOT EXISTS (SELECT FROM taken t WHERE t.n = i.n)
    ),
    found AS (
        -- One probe of the lower(wallet_address) key per distinct author (as above).
        SELECT w.wallet, a.id
        FROM (SELECT DISTINCT lower(author) AS wallet FROM proceed) AS w
        CROSS JOIN LATERAL (
            SELECT id FROM authors WHERE lower(wallet_address) = w.wallet LIMIT 1
        ) AS a
    ),
    created AS (
        INSERT INTO authors (id, wallet_address, prompt_text, created_at)
        SELECT gen_random_uuid(), w.author, :prompt, :now
        FROM (SELECT DISTINCT ON (lower(author)) author FROM proceed
              ORDER BY lower(author), n) AS w
        WHERE lower(w.author) NOT IN (SELECT wallet FROM found)
        ORDER BY lower(w.author)
        ON CONFLICT ((lower(wallet_address))) DO NOTHING
        RETURNING lower(wallet_address) AS wallet, id
    ),
    author AS (
        SELECT wallet, id, false AS created FROM found
        UNION ALL
        SELECT wallet, id, true FROM created
    ),
    event AS (
        INSERT INTO mint_events (id, tx_hash, log_index, block_number, block_hash,
                                 block_timestamp, token_id, quantity, detected_at)
        SELECT gen_random_uuid(), p.tx_hash, p.log_index, p.block_number, p.block_hash,
               p.block_timestamp, p.first, p.quantity, :now
        FROM proceed p JOIN author a ON a.wallet = lower(p.author)
        ORDER BY p.tx_hash, p.log_index
        ON CONFLICT (tx_hash, log_index) DO NOTHING
        RETURNING id, tx_hash, log_index
    ),
    minted AS (
        INSERT INTO tokens_s0 (id, token_id, author_id, minter_address, status,
                               mint_timestamp, created_at)
        SELECT gen_random_uuid(), g.token_id, a.id, p.minter, 'detected', p.block_timestamp, :now
        FROM event e
        JOIN proceed p ON p.tx_hash = e.tx_hash AND p.log_index = e.log_index
        JOIN author a ON a.wallet = lower(p.author)
        CROSS JOIN LATERAL generate_series(p.first, p.first + p.quantity - 1) AS g(token_id)
        ORDER BY g.token_id
        RETURNING token_id
    )
    SELECT i.n, x.id AS existing_id, x.token_id AS existing_first,
           x.quantity AS existing_quantity, t.ids AS taken, e.id AS event_id,
           a.id AS author_id, a.created AS author_created,
           (SELECT count(*) FROM minted) AS minted
    FROM input i
    LEFT JOIN existing x ON x.n = i.n
    LEFT JOIN taken t ON t.n = i.n
    LEFT JOIN event e ON e.tx_hash = i.tx_hash AND e.log_index = i.log_index
    LEFT JOIN author a ON a.wallet = lower(i.author) AND e.id IS NOT NULL
    ORDER BY i.n
    """
)

# The block of the recorded log holding a token id (a log holds at most MAX_MINT_QUANTITY ids
# from its token_id on: a short range scan on ix_mint_events_token_id). No locking.
BLOCK_OF_TOKEN = text(
    f"""
    SELECT block_number FROM mint_events
    WHERE token_id BETWEEN :id - {MAX_MINT_QUANTITY - 1} AND :id AND token_id + quantity > :id
    LIMIT 1
    """
)

# A delivery runs the statement again at most twice: after waiting on a writer in flight with the
# same new author, then on one with the same log; each wait ends in a commit that the next
# snapshot sees. A third "look again" would mean rows vanishing under us.
ATTEMPTS = 3
