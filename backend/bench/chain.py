"""The reveal keeper on a real node (``reveal``): tokens revealed per second at a batch size, RPC
calls and sends per revealed token, gas per token; next to the same reveals sent by a bare web3
loop (one process, a nonce counter in memory, nothing recorded)."""

from __future__ import annotations

import asyncio
import json
import tempfile
from argparse import Namespace
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from eth_account import Account

from bench.harness import database, query, run_processes, say, table
from glisk.chain import client
from glisk.chain import contract as glisk_contract
from glisk.chain.anvil import Anvil
from glisk.chain.keeper import Keeper, KeeperConfig
from glisk.core.logs import configure_logging
from glisk.workers.connection import ConnectOptions
from glisk.workers.worker import Worker

if TYPE_CHECKING:
    from bench.harness import Ready

GWEI = 10**9
SEED = """
DELETE FROM reveal_attempts; DELETE FROM reveal_transactions; DELETE FROM keeper_nonces;
DELETE FROM tokens_s0; DELETE FROM mint_events; DELETE FROM authors;
INSERT INTO authors (id, wallet_address, prompt_text, created_at)
VALUES (gen_random_uuid(), '0x' || repeat('ab', 20), 'a bench prompt', now());
INSERT INTO tokens_s0 (id, token_id, author_id, minter_address, status, mint_timestamp,
                       image_path, metadata_cid, created_at)
SELECT gen_random_uuid(), g, (SELECT id FROM authors), '0x' || repeat('cd', 20), 'ready',
       timestamp '2025-01-01' + g * interval '1 second', '/img.png',
       'bafkreibenchmarkbenchmarkbenchmarkbenchmarkbenchmarkbench' || g, now()
FROM generate_series(1, {tokens}) AS g;
"""


async def _fresh_contract(node: Anvil, tokens: int) -> str:
    """A new GLISK contract with ``tokens`` minted (ids 1..tokens): a cell's reveals start clean."""
    w3 = client.connect(node.url)
    keys = node.private_keys
    admin, keeper = Account.from_key(keys[0]), Account.from_key(keys[1])
    deployment = await glisk_contract.deploy(w3, admin, keeper=keeper.address)
    minter, left = Account.from_key(keys[2]), tokens
    while left > 0:
        quantity = min(left, glisk_contract.MAX_BATCH_SIZE)
        await glisk_contract.mint(
            w3, minter, deployment.address, prompt_author="0x" + "ab" * 20, quantity=quantity
        )
        left -= quantity
    await w3.provider.disconnect()
    return deployment.address


def keeper_worker(
    url: str, rpc_url: str, contract: str, key: str, batch: int, out: str, ready: Ready
) -> int:
    """One reveal worker process running the keeper until nothing is left; its RPC calls by
    method and its sends go to ``out`` (JSON)."""
    configure_logging("development", "WARNING")
    config = KeeperConfig(
        rpc_url=rpc_url,
        chain_id=31337,
        contract=contract,
        account=Account.from_key(key),
        max_fee_per_gas=100 * GWEI,
        poll=0.02,
    )
    keeper = Keeper(config)

    async def main() -> int:
        worker = Worker("reveal", keeper, ConnectOptions(url), batch=batch, poll_interval=0.02)
        ready()
        stats = await worker.run(exit_when_idle=True)
        return stats.completed

    completed = asyncio.run(main())
    Path(out).write_text(json.dumps({"calls": client.rpc_calls(keeper.w3), "sends": keeper.sends}))
    return completed


def bare_loop(rpc_url: str, contract: str, key: str, tokens: int, batch: int, ready: Ready) -> int:
    """The ceiling: the same reveals signed with a nonce counted in memory, sent, and waited for
    one after the other; no database, no simulation, no fee history."""
    account = Account.from_key(key)

    async def main() -> int:
        w3 = client.connect(rpc_url)
        glisk = glisk_contract.glisk(w3, contract)
        nonce = await w3.eth.get_transaction_count(account.address)
        block = await w3.eth.get_block("latest")
        fees = {"maxFeePerGas": 2 * int(block.get("baseFeePerGas", 0)) + GWEI,
                "maxPriorityFeePerGas": GWEI}  # fmt: skip
        ready()
        for start in range(1, tokens + 1, batch):
            ids = list(range(start, min(start + batch, tokens + 1)))
            uris = [f"ipfs://bafkreibenchmark{i}" for i in ids]
            signed = account.sign_transaction(
                {
                    "type": 2,
                    "chainId": 31337,
                    "nonce": nonce,
                    "to": glisk.address,
                    "value": 0,
                    "gas": 150_000 * len(ids) + 100_000,
                    "data": glisk.encode_abi("revealTokens", args=[ids, uris]),
                    **fees,
                }
            )
            tx_hash = await w3.eth.send_raw_transaction(signed.raw_transaction)
            await w3.eth.wait_for_transaction_receipt(tx_hash, poll_latency=0.02)
            nonce += 1
        return tokens

    return asyncio.run(main())


async def _gas_per_token(rpc_url: str, hashes: list[str], tokens: int) -> float:
    w3 = client.connect(rpc_url)
    used = 0
    for tx_hash in hashes:
        used += int((await w3.eth.get_transaction_receipt(tx_hash))["gasUsed"])  # type: ignore[arg-type]
    await w3.provider.disconnect()
    return used / tokens


def reveal(args: Namespace) -> None:
    batches = [int(b) for b in str(args.batches).split(",")]
    workers = [int(w) for w in str(args.workers).split(",")]
    rows: list[list[object]] = []
    block_time = args.block_time or None
    with database() as (_, url), Anvil(block_time=block_time) as node:
        key = node.private_keys[1]
        say(f"anvil 1.7.1, {'automine' if block_time is None else f'a block every {block_time} s'}")
        for batch in batches:
            contract = asyncio.run(_fresh_contract(node, args.tokens))
            ceiling = run_processes(bare_loop, [(node.url, contract, key, args.tokens, batch)])
            say(f"  bare loop, batch {batch}: {ceiling.rate:,.0f} tokens/s")
            for n in workers:
                contract = asyncio.run(_fresh_contract(node, args.tokens))
                query(url, SEED.format(tokens=args.tokens), "VACUUM ANALYZE tokens_s0")
                outs = [str(Path(tempfile.mkdtemp()) / "rpc.json") for _ in range(n)]
                jobs = [(url, node.url, contract, key, batch, out) for out in outs]
                cell = run_processes(keeper_worker, jobs)
                counts: Counter[str] = Counter()
                sends = 0
                for out in outs:
                    found = json.loads(Path(out).read_text())
                    counts.update(found["calls"])
                    sends += found["sends"]
                revealed = sum(cell.moved)
                (confirmed,) = query(url, "SELECT count(*) FROM reveal_transactions")[0]
                hashes = [r[0] for r in query(url, "SELECT tx_hash FROM reveal_transactions")]
                gas = asyncio.run(_gas_per_token(node.url, hashes, revealed))
                calls = sum(counts.values())
                say(f"  keeper, batch {batch} x{n}: {cell.rate:,.0f} tokens/s, {dict(counts)}")
                rows.append(
                    [
                        batch,
                        n,
                        f"{cell.rate:,.0f}",
                        f"{ceiling.rate:,.0f}",
                        f"{cell.rate / ceiling.rate:.2f}",
                        f"{calls / revealed:.3f}",
                        f"{calls / confirmed:.1f}",
                        f"{sends / revealed:.3f}",
                        f"{sends / confirmed:.2f}",
                        f"{gas:,.0f}",
                    ]
                )
    print(
        f"{args.tokens} tokens per cell, anvil {'automine' if block_time is None else block_time}\n"
    )
    print(
        table(
            [
                "batch",
                "workers",
                "keeper tokens/s",
                "bare loop tokens/s",
                "keeper/bare",
                "RPC calls/token",
                "RPC calls/batch",
                "sends/token",
                "sends/batch",
                "gas/token",
            ],
            rows,
        )
    )
