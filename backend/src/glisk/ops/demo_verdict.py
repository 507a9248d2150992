"""``glisk demo``'s verdict: a pure function of facts gathered once the workers stopped.

``DemoFacts`` holds what the database, the chain and the stand-ins say, and how the run went;
``verdict(facts)`` decides and ``show`` prints. The gathering lives apart (``database_facts``
here, the chain's side in ``glisk.ops.demo_chain``, the stages' in ``glisk.ops.demo_stages``), so
the verdict is tested on crafted facts and stays the same whatever node the facts come from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from glisk.ops.demo_stages import StageFacts, stage_verdict
from glisk.ops.queries import DEMO_REVEALS, DEMO_TOKENS, FAILED_BY_REASON


@dataclass(frozen=True)
class ChainTx:
    """A reveal transaction as the chain saw it."""

    tx_hash: str
    token_ids: tuple[int, ...]
    confirmed: bool  # mined, and it succeeded
    sends: int = 1  # how often it reached the node, rebroadcasts of the same one included


@dataclass(frozen=True)
class ChainFacts:
    transactions: tuple[ChainTx, ...]  # every reveal transaction the node saw
    revealed: dict[int, str]  # token id -> the transaction that revealed it, per the chain
    send_calls: int = 0  # eth_sendRawTransaction calls, repeats and refusals included
    # What a real node adds (None or empty: not known, not checked).
    minted: int | None = None  # nextTokenId - 1
    uri_mismatch: tuple[int, ...] = ()  # tokens whose tokenURI is not ipfs://<metadata CID>
    keeper_nonce: int | None = None  # the keeper's transaction count on chain
    allocator_nonce: int | None = None  # the next nonce the database would allocate
    reverted: int = 0  # keeper transactions mined with status 0
    gas_used: int = 0  # by the reveal transactions mined successfully


@dataclass(frozen=True)
class DatabaseFacts:
    statuses: dict[int, str]  # token id -> status
    reveal_hashes: dict[int, str]  # token id -> reveal_tx_hash, for tokens that have one
    pending_reveals: tuple[str, ...]  # tx hashes of reveal_transactions rows still pending
    confirmed_reveals: tuple[str, ...]  # tx hashes of reveal_transactions rows confirmed
    failed: tuple[tuple[str | None, str | None, int], ...] = ()  # (stage, reason, tokens)


@dataclass(frozen=True)
class DemoFacts:
    minted: int  # tokens the demo minted
    finished: bool  # every token was revealed or failed before --timeout
    database: DatabaseFacts
    chain: ChainFacts
    kills: int = 0
    workers_started: int = 0
    elapsed: float = 0.0
    # The image and upload stages against the Replicate and Pinata stand-ins (None: not run).
    stages: StageFacts | None = None


@dataclass(frozen=True)
class Verdict:
    ok: bool
    rows: tuple[tuple[str, str], ...]  # the verification table: (check, value)
    problems: tuple[str, ...]  # why it is not ok, one line each


def database_facts(conn: Any) -> DatabaseFacts:
    """What the database says (``conn``: a psycopg connection to the demo's database)."""
    statuses: dict[int, str] = {}
    hashes: dict[int, str] = {}
    for token_id, status, tx_hash in conn.execute(DEMO_TOKENS):
        statuses[token_id] = status
        if tx_hash is not None:
            hashes[token_id] = tx_hash
    reveals: dict[str, list[str]] = {"pending": [], "confirmed": []}
    for status, tx_hash in conn.execute(DEMO_REVEALS):
        reveals.setdefault(status, []).append(tx_hash or "")
    failed = tuple(
        (stage, reason, int(count)) for stage, reason, count in conn.execute(FAILED_BY_REASON)
    )
    return DatabaseFacts(
        statuses, hashes, tuple(reveals["pending"]), tuple(reveals["confirmed"]), failed
    )


def _some(token_ids: Any, limit: int = 5) -> str:
    ordered = sorted(token_ids)
    shown = ", ".join(str(t) for t in ordered[:limit])
    return shown + (f" and {len(ordered) - limit} more" if len(ordered) > limit else "")


def verdict(facts: DemoFacts) -> Verdict:
    """Whether every minted token is revealed, in exactly one confirmed transaction, with the
    database and the chain agreeing on which, and nothing left pending; the table to show and
    every problem found (ok exactly when there is none)."""
    db, chain = facts.database, facts.chain
    minted = set(db.statuses)  # the token ids the demo minted, as the database holds them
    confirmed = [tx for tx in chain.transactions if tx.confirmed]
    carriers: dict[int, list[str]] = {}
    for tx in confirmed:
        for token_id in tx.token_ids:
            carriers.setdefault(token_id, []).append(tx.tx_hash)
    revealed_db = {t for t, status in db.statuses.items() if status == "revealed"}
    once = {t for t, hashes in carriers.items() if len(hashes) == 1}
    twice = {t for t, hashes in carriers.items() if len(hashes) > 1}
    disagree = {
        t for t in revealed_db & set(chain.revealed) if db.reveal_hashes.get(t) != chain.revealed[t]
    }
    confirmed_hashes = {tx.tx_hash for tx in confirmed}

    problems: list[str] = []
    if not facts.finished:
        problems.append("the run gave up (--timeout) before every token was revealed or failed")
    if len(minted) != facts.minted:
        problems.append(f"the database holds {len(minted):,} tokens, {facts.minted:,} minted")
    if minted - revealed_db:
        problems.append(
            f"{len(minted - revealed_db):,} tokens not revealed in the database: "
            + _some(minted - revealed_db)
        )
    if minted - set(chain.revealed):
        problems.append(
            f"{len(minted - set(chain.revealed)):,} tokens not revealed on chain: "
            + _some(minted - set(chain.revealed))
        )
    if set(chain.revealed) - minted:
        problems.append(
            "the chain revealed tokens never minted: " + _some(set(chain.revealed) - minted)
        )
    if twice:
        problems.append(
            f"{len(twice):,} tokens in more than one confirmed transaction: " + _some(twice)
        )
    if minted - once - twice:
        problems.append(
            f"{len(minted - once - twice):,} tokens in no confirmed transaction: "
            + _some(minted - once - twice)
        )
    if disagree:
        first = min(disagree)
        problems.append(
            f"{len(disagree):,} tokens revealed on chain by another transaction than the "
            "database says: "
            f"{_some(disagree)} (token {first}: database {db.reveal_hashes.get(first)}, "
            f"chain {chain.revealed[first]})"
        )
    if db.pending_reveals:
        problems.append(
            f"{len(db.pending_reveals):,} reveal transactions still pending in the database: "
            + ", ".join(db.pending_reveals[:3])
        )
    if set(db.confirmed_reveals) - confirmed_hashes:
        problems.append(
            "reveal transactions confirmed in the database but not on chain: "
            + ", ".join(sorted(set(db.confirmed_reveals) - confirmed_hashes)[:3])
        )

    if chain.minted is not None and chain.minted != facts.minted:
        problems.append(f"the contract minted {chain.minted:,} tokens, {facts.minted:,} asked for")
    if chain.uri_mismatch:
        problems.append(
            f"{len(chain.uri_mismatch):,} tokens whose tokenURI is not ipfs://<their metadata "
            "CID>: " + _some(chain.uri_mismatch)
        )
    if chain.keeper_nonce != chain.allocator_nonce:
        problems.append(
            f"the keeper's nonce on chain ({chain.keeper_nonce}) is not the database's next "
            f"({chain.allocator_nonce}): a gap or a nonce never used"
        )

    stage_rows: list[tuple[str, str]] = []
    for check, value, holds in stage_verdict(facts.stages) if facts.stages is not None else []:
        stage_rows.append((check, value))
        if not holds:
            problems.append(f"{check}: {value}")

    # How often each revealed token went out in a transaction (rebroadcasts included).
    sent: dict[int, int] = {}
    for tx in chain.transactions:
        for token_id in tx.token_ids:
            sent[token_id] = sent.get(token_id, 0) + tx.sends
    sends = [sent.get(token_id, 0) for token_id in chain.revealed]
    mean = sum(sends) / len(sends) if sends else 0.0
    rate = len(revealed_db) / facts.elapsed if facts.elapsed else 0.0
    rows = [
        ("tokens minted", f"{facts.minted:,}"),
        ("revealed (database)", f"{len(revealed_db):,}"),
        ("revealed on chain", f"{len(chain.revealed):,}"),
        ("in exactly one confirmed transaction", f"{len(once):,}"),
        ("in more than one confirmed transaction", f"{len(twice):,}"),
        ("chain and database disagree on the transaction", f"{len(disagree):,}"),
        ("reveal transactions pending (database)", f"{len(db.pending_reveals):,}"),
        *(
            (f"failed: {stage or '-'} / {reason or '-'}", f"{n:,}")
            for stage, reason, n in db.failed
        ),
        *stage_rows,
        ("reveal transactions confirmed", f"{len(confirmed):,}"),
        *(
            ()
            if chain.minted is None
            else (
                ("tokens minted on chain (real mint transactions)", f"{chain.minted:,}"),
                ("tokenURI is not ipfs://<metadata CID>", f"{len(chain.uri_mismatch):,}"),
                ("reveal transactions reverted", f"{chain.reverted:,}"),
                (
                    "gas per revealed token",
                    f"{chain.gas_used / len(revealed_db):,.0f}" if revealed_db else "-",
                ),
                (
                    "keeper nonce: chain / database allocator",
                    f"{chain.keeper_nonce} / {chain.allocator_nonce}",
                ),
            )
        ),
        ("sends per revealed token: mean / max", f"{mean:.2f} / {max(sends, default=0)}"),
        ("eth_sendRawTransaction calls", f"{chain.send_calls:,}"),
        ("workers killed (chaos)", f"{facts.kills:,}"),
        ("worker processes started", f"{facts.workers_started:,}"),
        ("time", f"{facts.elapsed:.1f} s ({rate:.0f} tokens/s)"),
    ]
    return Verdict(not problems, tuple(rows), tuple(problems))


def show(console: Any, decided: Verdict) -> None:
    """The verification table, every problem, and the one-line outcome."""
    from rich.table import Table

    console.print()
    table = Table(title="verification (read from the chain)", title_justify="left")
    table.add_column("check")
    table.add_column("value", justify="right")
    for check, value in decided.rows:
        table.add_row(check, value)
    console.print(table)
    for problem in decided.problems:
        console.print(f"- {problem}", markup=False, highlight=False)
    console.print(
        "OK: every token revealed once"
        if decided.ok
        else "FAILED: not every token was revealed once"
    )
