"""``glisk demo``'s chain: anvil, the GLISK contract deployed, tokens minted by real ``mint``
transactions and recorded as the mint follower would, the keeper's settings for the reveal
workers, and the facts the verification reads back from the chain.

The facts are gathered first (``gather``: the chain's own answers and the database's records);
``verdict(facts)`` is pure: it decides and lays out the table, nothing else.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from glisk.chain.anvil import Anvil

# anvil's dev accounts: 0 deploys and administers, 1 is the keeper, 2 and up mint.
ADMIN, KEEPER, FIRST_MINTER = 0, 1, 2
AUTHOR = "0x" + "d" * 40
PROMPT = "a lighthouse drawn by a demo"
MINT_PRICE = 10**15  # 0.001 ETH a token


@dataclass(frozen=True)
class DemoChain:
    node: Anvil
    contract: str
    keeper_address: str
    key_file: Path
    mint_transactions: int

    def worker_env(self) -> dict[str, str]:
        """The reveal workers' keeper settings: the key in a 0600 file, never in argv."""
        return {
            "CHAIN_RPC_URL": self.node.url,
            "CHAIN_ID": str(self.node.chain_id),
            "GLISK_CONTRACT_ADDRESS": self.contract,
            "KEEPER_PRIVATE_KEY_FILE": str(self.key_file),
            "REVEAL_CONFIRMATIONS": "1",
            "REVEAL_POLL_SECONDS": "0.05",
            "REVEAL_STUCK_SECONDS": "5",
        }


async def set_up(node: Anvil, database_url: str, tokens: int, work: Path) -> DemoChain:
    """Deploy, mint ``tokens`` in real ``mint`` transactions (50 at most each, spread over the
    minter accounts) and record each BatchMinted log with ``uow.mint_events.record_mint``."""
    from eth_account import Account

    from glisk.chain import client
    from glisk.chain import contract as glisk_contract
    from glisk.core.database import engine_of, setup_db_session
    from glisk.models import MintLog
    from glisk.uow import create_uow_factory

    w3 = client.connect(node.url)
    keys = node.private_keys
    admin, keeper = Account.from_key(keys[ADMIN]), Account.from_key(keys[KEEPER])
    minters = [Account.from_key(key) for key in keys[FIRST_MINTER:]]
    deployment = await glisk_contract.deploy(
        w3, admin, keeper=keeper.address, mint_price=MINT_PRICE
    )
    sessions = setup_db_session(database_url, pool_size=2)
    uow_factory = create_uow_factory(sessions)
    left, sent = tokens, 0
    try:
        while left > 0:
            quantity = min(left, glisk_contract.MAX_BATCH_SIZE)
            minted = await glisk_contract.mint(
                w3,
                minters[sent % len(minters)],
                deployment.address,
                prompt_author=AUTHOR,
                quantity=quantity,
            )
            log = MintLog(
                tx_hash=minted.tx_hash,
                log_index=minted.log_index,
                block_number=minted.block_number,
                block_timestamp=datetime.fromtimestamp(minted.block_timestamp, UTC),
                minter=minted.minter,
                author=minted.prompt_author,
                start_token_id=minted.start_token_id,
                quantity=minted.quantity,
            )
            async with uow_factory() as uow:
                await uow.mint_events.record_mint(log, new_author_prompt=PROMPT)
            left -= quantity
            sent += 1
    finally:
        await engine_of(sessions).dispose()
        await w3.provider.disconnect()
    key_file = work / "keeper.key"
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("0x" + bytes(keeper.key).hex())
    return DemoChain(node, deployment.address, keeper.address, key_file, sent)


@dataclass(frozen=True)
class Facts:
    """What the verification looks at, gathered once the workers stopped."""

    tokens: int  # asked for
    finished: bool  # every token revealed or failed before the timeout
    elapsed: float
    kills: int
    started: int
    statuses: dict[str, int]
    failed: list[tuple[str | None, str | None, int]]  # stage, reason, tokens
    # The database's side
    stored_hash: dict[int, str | None]  # token id -> reveal_tx_hash
    stored_uri: dict[int, str]  # token id -> ipfs://metadata_cid
    sends: dict[int, int]  # token id -> broadcasts of every transaction carrying it
    send_calls: int  # eth_sendRawTransaction calls by the keepers
    pending_reveals: int
    allocator: int | None  # the keeper's next nonce, as the database allocates it
    # The chain's side
    minted_on_chain: int
    revealed_on_chain: dict[int, bool]
    uri_on_chain: dict[int, str]
    reveal_events: dict[int, list[str]]  # token id -> TokensRevealed transactions naming it
    confirmed_nonce: int  # the keeper's transaction count on chain
    reverted: int  # keeper transactions mined with status 0
    gas_used: int  # by the reveal transactions mined successfully
    reveals_mined: int


_DB_FACTS = """
SELECT t.token_id, t.reveal_tx_hash, 'ipfs://' || coalesce(t.metadata_cid, ''),
       (SELECT coalesce(sum(a.broadcasts), 0) FROM reveal_transactions AS r
        JOIN reveal_attempts AS a ON a.reveal_id = r.id WHERE t.id = ANY(r.token_ids))
FROM tokens_s0 AS t
"""


async def gather(chain: DemoChain, conn: psycopg.Connection[Any], **run: Any) -> Facts:
    """Read the database's records and the chain's answers (each token's isRevealed and
    tokenURI, every TokensRevealed log, the keeper's receipts and nonce)."""
    from glisk.chain import client
    from glisk.chain import contract as glisk_contract

    stored_hash: dict[int, str | None] = {}
    stored_uri: dict[int, str] = {}
    sends: dict[int, int] = {}
    for token_id, tx_hash, uri, broadcasts in conn.execute(_DB_FACTS.encode()).fetchall():
        stored_hash[int(token_id)] = tx_hash
        stored_uri[int(token_id)] = uri
        sends[int(token_id)] = int(broadcasts)
    ((send_calls, pending, allocator),) = conn.execute(
        b"SELECT (SELECT coalesce(sum(broadcasts), 0) FROM reveal_attempts), "
        b"(SELECT count(*) FROM reveal_transactions WHERE status = 'pending'), "
        b"(SELECT max(next_nonce) FROM keeper_nonces)"
    ).fetchall()
    attempts = [row[0] for row in conn.execute(b"SELECT tx_hash FROM reveal_attempts").fetchall()]

    w3 = client.connect(chain.node.url)
    try:
        contract = glisk_contract.glisk(w3, chain.contract)
        minted = int(await contract.functions.nextTokenId().call()) - 1
        ids = list(range(1, minted + 1))
        limit = asyncio.Semaphore(16)

        async def token(token_id: int) -> tuple[bool, str]:
            async with limit:
                revealed = await contract.functions.isRevealed(token_id).call()
                uri = await contract.functions.tokenURI(token_id).call()
                return bool(revealed), str(uri)

        answers = await asyncio.gather(*(token(t) for t in ids))
        event = contract.events.TokensRevealed()
        logs = await w3.eth.get_logs(
            {
                "address": contract.address,
                "fromBlock": 0,
                "toBlock": "latest",
                "topics": [event.topic],
            }
        )
        events: dict[int, list[str]] = {}
        for entry in logs:
            for token_id in event.process_log(entry)["args"]["tokenIds"]:
                events.setdefault(int(token_id), []).append(entry["transactionHash"].to_0x_hex())

        async def receipt(tx_hash: str) -> Any:
            async with limit:
                try:
                    return await w3.eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]
                except Exception:  # never mined (replaced, dropped): no receipt
                    return None

        receipts = [r for r in await asyncio.gather(*(receipt(h) for h in attempts)) if r]
        keeper = w3.to_checksum_address(chain.keeper_address)
        confirmed_nonce = int(await w3.eth.get_transaction_count(keeper, "latest"))
    finally:
        await w3.provider.disconnect()
    ok = [r for r in receipts if r["status"] == 1]
    return Facts(
        stored_hash=stored_hash,
        stored_uri=stored_uri,
        sends=sends,
        send_calls=int(send_calls),
        pending_reveals=int(pending),
        allocator=None if allocator is None else int(allocator),
        minted_on_chain=minted,
        revealed_on_chain={t: a[0] for t, a in zip(ids, answers, strict=True)},
        uri_on_chain={t: a[1] for t, a in zip(ids, answers, strict=True)},
        reveal_events=events,
        confirmed_nonce=confirmed_nonce,
        reverted=sum(1 for r in receipts if r["status"] != 1),
        gas_used=sum(int(r["gasUsed"]) for r in ok),
        reveals_mined=len(ok),
        **run,
    )


@dataclass(frozen=True)
class Verdict:
    ok: bool
    rows: list[tuple[str, str]]


def verdict(facts: Facts) -> Verdict:
    """Every token revealed, in exactly one transaction on chain, the one the database names,
    with the URI the pipeline made; the keeper's nonces without a gap and nothing pending."""
    n = facts.tokens
    revealed_db = facts.statuses.get("revealed", 0)
    on_chain = sum(1 for t in range(1, n + 1) if facts.revealed_on_chain.get(t))
    once = [t for t in range(1, n + 1) if len(facts.reveal_events.get(t, [])) == 1]
    more = [t for t, hashes in facts.reveal_events.items() if len(hashes) > 1]
    same_hash = sum(1 for t in once if facts.reveal_events[t][0] == facts.stored_hash.get(t))
    right_uri = sum(
        1 for t in range(1, n + 1) if facts.uri_on_chain.get(t) == facts.stored_uri.get(t)
    )
    sends = [facts.sends.get(t, 0) for t in range(1, n + 1) if facts.stored_hash.get(t)]
    mean = sum(sends) / len(sends) if sends else 0.0
    gas = facts.gas_used / revealed_db if revealed_db else 0
    ok = (
        facts.finished
        and facts.minted_on_chain == n
        and revealed_db == n
        and on_chain == n
        and len(once) == n
        and not more
        and same_hash == n
        and right_uri == n
        and facts.pending_reveals == 0
        and facts.allocator == facts.confirmed_nonce
    )
    rate = revealed_db / facts.elapsed if facts.elapsed else 0.0
    rows = [
        ("tokens minted on chain (real mint transactions)", f"{facts.minted_on_chain:,}"),
        ("revealed (database)", f"{revealed_db:,}"),
        ("revealed on chain (isRevealed)", f"{on_chain:,}"),
        ("in exactly one TokensRevealed transaction", f"{len(once):,}"),
        ("in more than one", f"{len(more):,}"),
        ("database hash = the chain's reveal transaction", f"{same_hash:,}"),
        ("tokenURI = ipfs://<metadata CID>", f"{right_uri:,}"),
        *(
            (f"failed: {stage or '-'} / {reason or '-'}", f"{count:,}")
            for stage, reason, count in facts.failed
        ),
        ("reveal transactions mined (reverted)", f"{facts.reveals_mined:,} ({facts.reverted})"),
        ("sends per revealed token: mean / max", f"{mean:.2f} / {max(sends, default=0)}"),
        ("eth_sendRawTransaction calls", f"{facts.send_calls:,}"),
        ("gas per revealed token", f"{gas:,.0f}"),
        (
            "keeper nonce: chain / database allocator",
            f"{facts.confirmed_nonce} / {facts.allocator}",
        ),
        ("reveals still pending", f"{facts.pending_reveals:,}"),
        ("workers killed (chaos)", f"{facts.kills:,}"),
        ("worker processes started", f"{facts.started:,}"),
        ("time", f"{facts.elapsed:.1f} s ({rate:.0f} tokens/s)"),
    ]
    return Verdict(ok, rows)
