"""``glisk demo``'s verdict on crafted facts: every way a run can go wrong is reported and fails
the demo (a token in two confirmed transactions, a token not revealed, a reveal left pending, a
chain that disagrees with the database), and the facts are read from a real database."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, cast

import pytest
from rich.console import Console

from glisk.ops.demo_verdict import (
    ChainFacts,
    ChainTx,
    DatabaseFacts,
    DemoFacts,
    Verdict,
    database_facts,
    show,
    verdict,
)
from glisk.testing import connect
from glisk.uow import UnitOfWorkFactory
from tests.support.database import Database
from tests.support.factories import make_ready, seed_tokens


def tx(n: int) -> str:
    return "0x" + f"{n:064x}"


def clean_run(tokens: int = 6, per_tx: int = 3) -> DemoFacts:
    """Tokens 1..``tokens`` revealed in batches of ``per_tx``, the database and the chain
    agreeing on every one."""
    transactions = []
    statuses: dict[int, str] = {}
    hashes: dict[int, str] = {}
    for first in range(1, tokens + 1, per_tx):
        batch = tuple(range(first, min(first + per_tx, tokens + 1)))
        transactions.append(ChainTx(tx(first), batch, confirmed=True))
        for token_id in batch:
            statuses[token_id] = "revealed"
            hashes[token_id] = tx(first)
    return DemoFacts(
        minted=tokens,
        finished=True,
        database=DatabaseFacts(statuses, hashes, (), tuple(t.tx_hash for t in transactions)),
        chain=ChainFacts(tuple(transactions), dict(hashes), send_calls=len(transactions)),
    )


def with_database(facts: DemoFacts, **changes: Any) -> DemoFacts:
    return replace(facts, database=replace(facts.database, **changes))


def with_chain(facts: DemoFacts, **changes: Any) -> DemoFacts:
    return replace(facts, chain=replace(facts.chain, **changes))


def row(decided: Verdict, check: str) -> str:
    (value,) = [value for name, value in decided.rows if name == check]
    return value


def failed_saying(facts: DemoFacts, *phrases: str) -> Verdict:
    decided = verdict(facts)
    assert not decided.ok
    text = "\n".join(decided.problems)
    for phrase in phrases:
        assert phrase in text, text
    return decided


def test_a_clean_run_passes_with_every_token_in_exactly_one_confirmed_transaction() -> None:
    decided = verdict(clean_run())
    assert decided.problems == ()
    assert decided.ok
    assert row(decided, "in exactly one confirmed transaction") == "6"
    assert row(decided, "in more than one confirmed transaction") == "0"


def test_transactions_that_were_not_confirmed_do_not_count() -> None:
    facts = clean_run()
    reverted = ChainTx(tx(99), (1, 2, 3), confirmed=False, sends=2)
    decided = verdict(with_chain(facts, transactions=(reverted, *facts.chain.transactions)))
    assert decided.ok, decided.problems
    assert row(decided, "sends per revealed token: mean / max") == "2.00 / 3"


def test_a_token_in_two_confirmed_transactions_fails_the_demo() -> None:
    facts = clean_run()
    again = ChainTx(tx(99), (2,), confirmed=True)
    decided = failed_saying(
        with_chain(facts, transactions=(*facts.chain.transactions, again)),
        "1 tokens in more than one confirmed transaction: 2",
    )
    assert row(decided, "in more than one confirmed transaction") == "1"


def test_a_token_not_revealed_fails_the_demo() -> None:
    facts = clean_run()
    hashes = {t: h for t, h in facts.database.reveal_hashes.items() if t != 5}
    unrevealed = with_database(
        facts, statuses={**facts.database.statuses, 5: "ready"}, reveal_hashes=hashes
    )
    transactions = (
        ChainTx(tx(1), (1, 2, 3), confirmed=True),
        ChainTx(tx(4), (4, 6), confirmed=True),
    )
    decided = failed_saying(
        with_chain(unrevealed, transactions=transactions, revealed=hashes),
        "1 tokens not revealed in the database: 5",
        "1 tokens not revealed on chain: 5",
        "1 tokens in no confirmed transaction: 5",
    )
    assert row(decided, "revealed (database)") == "5"


def test_a_failed_token_fails_the_demo_and_is_counted_by_reason() -> None:
    facts = clean_run()
    failed = with_database(
        facts,
        statuses={**facts.database.statuses, 6: "failed"},
        failed=(("reveal", "max_attempts_exceeded", 1),),
    )
    decided = failed_saying(failed, "1 tokens not revealed in the database: 6")
    assert row(decided, "failed: reveal / max_attempts_exceeded") == "1"


def test_a_pending_reveal_row_fails_the_demo() -> None:
    decided = failed_saying(
        with_database(clean_run(), pending_reveals=(tx(77),)),
        f"1 reveal transactions still pending in the database: {tx(77)}",
    )
    assert row(decided, "reveal transactions pending (database)") == "1"


def test_a_chain_that_reveals_a_token_by_another_transaction_than_the_database_says_fails() -> None:
    facts = clean_run()
    wrong = with_database(facts, reveal_hashes={**facts.database.reveal_hashes, 3: tx(4)})
    decided = failed_saying(
        wrong,
        "1 tokens revealed on chain by another transaction than the database says: 3",
        f"database {tx(4)}, chain {tx(1)}",
    )
    assert row(decided, "chain and database disagree on the transaction") == "1"


def test_a_chain_that_never_revealed_what_the_database_says_is_revealed_fails() -> None:
    facts = clean_run()
    transactions = (ChainTx(tx(1), (1, 2, 3), confirmed=True),)
    forgotten = {t: h for t, h in facts.chain.revealed.items() if t <= 3}
    failed_saying(
        with_chain(facts, transactions=transactions, revealed=forgotten),
        "3 tokens not revealed on chain: 4, 5, 6",
        f"reveal transactions confirmed in the database but not on chain: {tx(4)}",
    )


def test_a_chain_that_reveals_a_token_never_minted_fails() -> None:
    facts = clean_run()
    failed_saying(
        with_chain(facts, revealed={**facts.chain.revealed, 7: tx(4)}),
        "the chain revealed tokens never minted: 7",
    )


def test_a_run_that_gave_up_before_the_end_fails_even_if_the_rest_agrees() -> None:
    failed_saying(replace(clean_run(), finished=False), "the run gave up (--timeout)")


def test_fewer_tokens_in_the_database_than_minted_fails() -> None:
    failed_saying(replace(clean_run(), minted=7), "the database holds 6 tokens, 7 minted")


def test_the_outcome_line_and_every_problem_are_shown() -> None:
    console = Console(record=True, width=140)
    show(console, verdict(with_database(clean_run(), pending_reveals=(tx(77),))))
    shown = console.export_text()
    assert "verification" in shown
    assert "- 1 reveal transactions still pending in the database" in shown
    assert shown.rstrip().endswith("FAILED: not every token was revealed once")
    console = Console(record=True, width=140)
    show(console, verdict(clean_run()))
    assert console.export_text().rstrip().endswith("OK: every token revealed once")


@pytest.mark.parametrize("pending", [False, True])
async def test_the_database_facts_show_tokens_not_revealed_and_reveals_left_pending(
    uow_factory: UnitOfWorkFactory, postgres_container: Database, pending: bool
) -> None:
    ids = await seed_tokens(uow_factory, 3)
    await make_ready(uow_factory, ids)
    with connect(postgres_container.url) as conn:
        rows = conn.execute("SELECT token_id FROM tokens_s0").fetchall()
        first, second, third = sorted(cast(int, r[0]) for r in rows)
        conn.execute(
            "UPDATE tokens_s0 SET status = 'revealed', reveal_tx_hash = %s WHERE token_id < %s",
            (tx(1), third),
        )
        conn.execute(
            "INSERT INTO reveal_transactions (id, token_ids, tx_hash, status, created_at) "
            "SELECT gen_random_uuid(), array_agg(id), %s, 'confirmed', now() FROM tokens_s0 "
            "WHERE token_id < %s",
            (tx(1), third),
        )
        if pending:  # a reveal of the last token recorded, never settled
            conn.execute(
                "INSERT INTO reveal_transactions (id, token_ids, tx_hash, status, created_at) "
                "SELECT gen_random_uuid(), array_agg(id), %s, 'pending', now() FROM tokens_s0 "
                "WHERE token_id = %s",
                (tx(2), third),
            )
        database = database_facts(conn)

    assert database.statuses == {first: "revealed", second: "revealed", third: "ready"}
    assert database.reveal_hashes == {first: tx(1), second: tx(1)}
    assert database.confirmed_reveals == (tx(1),)
    assert database.pending_reveals == ((tx(2),) if pending else ())
    chain = ChainFacts(
        (ChainTx(tx(1), (first, second), confirmed=True),), {first: tx(1), second: tx(1)}
    )
    expected = [f"1 tokens not revealed in the database: {third}"]
    if pending:
        expected.append(f"1 reveal transactions still pending in the database: {tx(2)}")
    failed_saying(DemoFacts(3, True, database, chain), *expected)
