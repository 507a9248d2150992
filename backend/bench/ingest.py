"""Mint logs into the database: ``record_mints`` in one process against a raw multi-row INSERT and
the one-log-per-transaction ``record_mint``; and ``glisk ingest``'s follower end to end on anvil,
against reading the same logs alone and inserting them raw (``ingest``)."""

from __future__ import annotations

import asyncio
import time
from argparse import Namespace
from typing import TYPE_CHECKING, Any

import psycopg
from eth_account import Account

from bench.harness import database, query, run_processes, say, table, until
from glisk.chain import client
from glisk.chain import contract as glisk_contract
from glisk.chain.anvil import Anvil
from glisk.core.database import engine_of, setup_db_session
from glisk.core.logs import configure_logging
from glisk.ingest.follower import Follower, FollowerOptions
from glisk.ingest.node import Node
from glisk.models import MintLog
from glisk.standins.mint_feed import MintFeed
from glisk.uow import UnitOfWork, create_uow_factory
from glisk.workers.connection import libpq_url

if TYPE_CHECKING:
    from bench.harness import Ready

# The ceiling: a batch of logs and their tokens in two multi-row INSERTs, nothing checked.
RAW_EVENTS = """INSERT INTO mint_events (id, tx_hash, log_index, block_number, block_hash,
    block_timestamp, token_id, quantity, detected_at)
SELECT gen_random_uuid(), t, i, b, h, s, f, q, now()
FROM unnest(%(tx)s::text[], %(idx)s::int[], %(block)s::int[], %(hash)s::text[],
            %(stamp)s::timestamp[], %(first)s::int[], %(qty)s::int[]) AS x(t, i, b, h, s, f, q)"""
RAW_TOKENS = """INSERT INTO tokens_s0 (id, token_id, author_id, minter_address, mint_timestamp,
    created_at)
SELECT gen_random_uuid(), g, a.id, x.m, x.s, now()
FROM unnest(%(first)s::int[], %(qty)s::int[], %(author)s::text[], %(minter)s::text[],
            %(stamp)s::timestamp[]) AS x(f, q, w, m, s)
JOIN authors a ON lower(a.wallet_address) = lower(x.w)
CROSS JOIN LATERAL generate_series(x.f, x.f + x.q - 1) AS g"""
AUTHORS = """INSERT INTO authors (id, wallet_address, prompt_text, created_at)
SELECT gen_random_uuid(), w, 'a bench prompt', now() FROM unnest(%s::text[]) AS w
ON CONFLICT DO NOTHING"""
EMPTY = "TRUNCATE mint_events, tokens_s0, chain_blocks CASCADE; DELETE FROM system_state"
PATHS = ("raw", "record_mints", "again", "record_mint")


def raw_insert(url: str, logs: list[MintLog], batch: int, ready: Ready | None = None) -> float:
    """Insert ``logs`` with the raw statements, ``batch`` per transaction, on a connection opened
    beforehand; the seconds taken."""
    with psycopg.connect(libpq_url(url)) as conn:
        conn.execute("SELECT 1")
        if ready is not None:
            ready()
        started = time.perf_counter()
        for i in range(0, len(logs), batch):
            chunk = logs[i : i + batch]
            with conn.transaction():
                conn.execute(RAW_EVENTS, _columns(chunk))
                conn.execute(RAW_TOKENS, _columns(chunk))
        return time.perf_counter() - started


def _columns(logs: list[MintLog]) -> dict[str, list[Any]]:
    return {
        "tx": [g.tx_hash for g in logs],
        "idx": [g.log_index for g in logs],
        "block": [g.block_number for g in logs],
        "hash": [g.block_hash for g in logs],
        "stamp": [g.block_timestamp for g in logs],
        "first": [g.start_token_id for g in logs],
        "qty": [g.quantity for g in logs],
        "author": [g.author for g in logs],
        "minter": [g.minter for g in logs],
    }


def record(
    path: str, url: str, logs: list[MintLog], batch: int, seconds: float, ready: Ready
) -> tuple[int, float] | int:
    """One process of a ``record`` cell: what it recorded (logs), and when it ended."""
    configure_logging("production", "WARNING")
    if path == "raw":
        raw_insert(url, logs, batch, ready)
        return len(logs), time.monotonic()

    async def many(uow: UnitOfWork, done: int) -> int:
        chunk = logs[done : done + batch]
        if chunk:
            await uow.mint_events.record_mints(chunk)
        return len(chunk)

    async def one(uow: UnitOfWork, done: int) -> int:
        if done == len(logs):
            return 0
        await uow.mint_events.record_mint(logs[done])
        return 1

    if path == "record_mint":  # one log per transaction: bounded by time
        return asyncio.run(until(url, seconds, ready, one))
    return asyncio.run(until(url, 3600.0, ready, many))


def record_cells(url: str, logs: list[MintLog], batch: int, seconds: float) -> dict[str, float]:
    rates: dict[str, float] = {}
    for path in PATHS:
        if path != "again":  # again: the logs record_mints recorded, delivered once more
            query(url, EMPTY)
        cell = run_processes(record, [(path, url, logs, batch, seconds)])
        rates[path] = cell.rate
        say(f"  {path}: {cell.rate:,.0f} logs/s ({sum(cell.moved):,} logs)")
    return rates


# --- the follower end to end on anvil ---------------------------------------------------------


async def mint_on_anvil(node: Anvil, logs: int, per_block: int) -> tuple[str, int]:
    """Deploy the contract and send ``logs`` mints (1 to 5 tokens, 8 accounts, 20 authors),
    ``per_block`` to a block; the address and the number of tokens minted."""
    w3 = client.connect(node.url)
    keys = node.private_keys
    admin = Account.from_key(keys[0])
    address = (await glisk_contract.deploy(w3, admin, keeper=admin.address)).address
    contract = glisk_contract.glisk(w3, address)
    accounts = [Account.from_key(k) for k in keys[1:9]]
    nonces = [int(await w3.eth.get_transaction_count(a.address)) for a in accounts]
    chain_id = await w3.eth.chain_id
    fee = 2 * int((await w3.eth.get_block("latest")).get("baseFeePerGas", 0)) + 10**9
    await client.rpc(w3, "evm_setAutomine", [False])
    tokens = 0
    for i in range(logs):
        account, quantity = i % len(accounts), 1 + (i * 7) % 5
        author = w3.to_checksum_address(f"0x{(i % 20) + 1:040x}")
        tx: dict[str, Any] = {
            "chainId": chain_id,
            "nonce": nonces[account],
            "to": address,
            "data": contract.encode_abi("mint", args=[author, quantity]),
            "value": 0,
            "gas": 400_000,
            "maxFeePerGas": fee,
            "maxPriorityFeePerGas": 10**9,
        }
        nonces[account] += 1
        signed = accounts[account].sign_transaction(tx)
        await w3.eth.send_raw_transaction(signed.raw_transaction)
        tokens += quantity
        if (i + 1) % per_block == 0:
            await client.rpc(w3, "evm_mine")
    await client.rpc(w3, "evm_mine")
    await client.rpc(w3, "evm_setAutomine", [True])
    minted = int(await contract.functions.nextTokenId().call()) - 1
    if minted != tokens:
        raise RuntimeError(f"{minted} tokens minted on anvil, {tokens} expected")
    await w3.provider.disconnect()
    return address, tokens


async def follow(url: str, rpc: str, address: str, max_range: int) -> tuple[float, int, int]:
    """A follower from an empty database to the head: seconds, steps, RPC calls."""
    factory = setup_db_session(url, pool_size=2, max_overflow=0)
    w3 = client.connect(rpc)
    options = FollowerOptions(confirmations=0, gap_interval=0)
    follower = Follower(
        Node(w3, address, max_range=max_range), create_uow_factory(factory), options
    )
    started = time.perf_counter()
    while await follower.step() is not None:
        pass
    elapsed = time.perf_counter() - started
    calls = sum(client.rpc_calls(w3).values())
    await w3.provider.disconnect()
    await engine_of(factory).dispose()
    return elapsed, follower.stats.steps, calls


async def read_only(rpc: str, address: str) -> tuple[float, list[MintLog]]:
    w3 = client.connect(rpc)
    node = Node(w3, address)
    started = time.perf_counter()
    logs = await node.mint_logs(0, await node.head())
    elapsed = time.perf_counter() - started
    await w3.provider.disconnect()
    return elapsed, logs


def ingest(args: Namespace) -> None:
    configure_logging("production", "WARNING")
    feed = MintFeed.generate(tokens=args.logs * 3, seed=3, authors=50)
    logs = list(feed.logs[: args.logs])
    rows: list[list[object]] = []
    chain_rows: list[list[object]] = []
    with database(20) as (_, url):
        query(url, AUTHORS, params=(sorted({g.author.lower() for g in logs}),))
        for n in range(args.repeat):
            rates = record_cells(url, logs, args.batch, args.seconds)
            rows.append(
                [
                    n + 1,
                    *(f"{rates[p]:,.0f}" for p in PATHS),
                    f"{rates['record_mints'] / rates['raw']:.2f}",
                ]
            )
        with Anvil() as node:
            say(f"minting {args.chain_logs:,} logs on anvil ...")
            address, tokens = asyncio.run(mint_on_anvil(node, args.chain_logs, args.per_block))
            read_seconds, chain_logs = asyncio.run(read_only(node.url, address))
            query(url, EMPTY)
            raw_seconds = raw_insert(url, chain_logs, args.batch)
            for max_range in (2000, args.small_range):
                query(url, EMPTY)
                seconds, steps, calls = asyncio.run(follow(url, node.url, address, max_range))
                recorded = query(url, "SELECT count(*) FROM mint_events")[0][0]
                if recorded != len(chain_logs):
                    raise RuntimeError(f"the follower recorded {recorded} of {len(chain_logs)}")
                n = len(chain_logs)
                chain_rows.append(
                    [
                        f"follower, INGEST_MAX_RANGE={max_range}",
                        f"{n:,}",
                        steps,
                        calls,
                        f"{seconds:.2f}",
                        f"{n / seconds:,.0f}",
                    ]
                )
            n = len(chain_logs)
            chain_rows.append(["eth_getLogs + decode alone", f"{n:,}", "-", "-",
                               f"{read_seconds:.2f}", f"{n / read_seconds:,.0f}"])  # fmt: skip
            chain_rows.append(["raw multi-row INSERT alone", f"{n:,}", "-", "-",
                               f"{raw_seconds:.2f}", f"{n / raw_seconds:,.0f}"])  # fmt: skip
    print(
        f"Mint logs per second into the database, one process, {len(logs):,} logs "
        f"({sum(g.quantity for g in logs):,} tokens), {args.batch} logs per transaction "
        f"(record_mint: one per transaction, {args.seconds:g} s at most)\n"
    )
    print(table(["run", *PATHS, "record_mints/raw"], rows), "\n")
    print(
        f"The follower end to end on anvil: {args.chain_logs:,} mint logs ({tokens:,} tokens), "
        f"{args.per_block} per block, from an empty database to the head\n"
    )
    print(table(["path", "logs", "steps", "RPC calls", "seconds", "logs/s"], chain_rows))
