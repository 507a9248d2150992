"""Reveal chaos on a real node: reveal worker processes share one keeper key on anvil (a block
every 0.25 s, mined by the test so it can hold mining back) while a killer SIGKILLs them (some kill themselves between a send and its
completion), SIGSTOPs one past its lease, drops the pool's pending transactions, spikes the base
fee above the cap and brings it back, and reorganises the last blocks. At the end, read from the
chain's logs: every token revealed exactly once, by the transaction the database names (an
AlreadyRevealed revert never passes for a reveal), the keeper's confirmed nonce equal to its
allocator (no gap), no pending reveal, nothing claimed."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import psycopg
import pytest
from eth_account import Account
from hexbytes import HexBytes
from web3.exceptions import TransactionNotFound

from glisk.chain import client
from glisk.chain import contract as glisk_contract
from glisk.chain.anvil import Anvil
from glisk.testing import libpq_kwargs
from tests.support.chain import AUTHOR, GWEI, key_file
from tests.support.database import Database
from tests.support.processes import stop_all
from tests.support.reveal_proc import RevealProcess, run_reveal_worker

TOKENS = 1000
WORKERS = 4
LEASE = 1.0
BLOCK_TIME = 0.25
CONFIRMATIONS = 3  # deeper than the reorgs below
REORG_DEPTH = 2
CAP = 100 * GWEI
CHAOS_SECONDS = 10.0
ACT_EVERY = 0.4
DEADLINE_SECONDS = 120.0
FAULTS = ("kills", "pauses", "drops", "spikes", "reorgs")

CONTEXT = multiprocessing.get_context("forkserver")
CONTEXT.set_forkserver_preload(["tests.support.reveal_proc"])

SEED = """
INSERT INTO authors (id, wallet_address, prompt_text, created_at)
VALUES (gen_random_uuid(), '0x' || repeat('ab', 20), 'a prompt for the chaos', now());
INSERT INTO tokens_s0 (id, token_id, author_id, minter_address, status, mint_timestamp,
                       image_path, metadata_cid, created_at)
SELECT gen_random_uuid(), g, (SELECT id FROM authors), '0x' || repeat('cd', 20), 'ready',
       timestamp '2025-01-01' + g * interval '1 second', '/img.png', 'bafkreicid' || g, now()
FROM generate_series(1, {tokens}) AS g;
"""


async def _deploy_and_mint(node: Anvil) -> tuple[str, Any]:
    w3 = client.connect(node.url)
    keys = node.private_keys
    admin, keeper = Account.from_key(keys[0]), Account.from_key(keys[1])
    deployment = await glisk_contract.deploy(w3, admin, keeper=keeper.address)
    minter = Account.from_key(keys[2])
    for _ in range(TOKENS // glisk_contract.MAX_BATCH_SIZE):
        await glisk_contract.mint(w3, minter, deployment.address, prompt_author=AUTHOR, quantity=50)
    for _ in range(REORG_DEPTH + 2):  # the mints deeper than any reorg below
        await client.rpc(w3, "evm_mine")
    await w3.provider.disconnect()
    return deployment.address, keeper


class Miner(threading.Thread):
    """A block every BLOCK_TIME (evm_mine), unless held back (to catch transactions in the pool)."""

    def __init__(self, node: Anvil) -> None:
        super().__init__(daemon=True)
        self.node = node
        self.running = threading.Event()
        self.running.set()
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(BLOCK_TIME):
            if self.running.is_set():
                with contextlib.suppress(Exception):  # the node stopping at the end
                    self.node.call("evm_mine")


class Killer:
    """The faults, one every ACT_EVERY seconds in turn; counts what it did."""

    def __init__(
        self, node: Anvil, miner: Miner, spawn: Callable[[int], BaseProcess], rng: random.Random
    ) -> None:
        self.node = node
        self.miner = miner
        self.spawn = spawn
        self.rng = rng
        self.workers = [spawn(n) for n in range(WORKERS)]
        self.started = WORKERS
        self.done: dict[str, int] = {
            "kills": 0, "pauses": 0, "drops": 0, "spikes": 0, "reorgs": 0,
        }  # fmt: skip
        self.spiked_until = 0.0

    def act(self, turn: int) -> None:
        if self.spiked_until and time.monotonic() >= self.spiked_until:
            self.node.call("anvil_setNextBlockBaseFeePerGas", [hex(GWEI)])  # and back
            self.spiked_until = 0.0
        fault = ("kill", "drop", "reorg", "spike", "pause", "kill", "drop", "kill")[turn % 8]
        if turn >= 8 and (missing := [k for k in FAULTS if not self.done[k]]):
            # A fault that found nothing to act on (no transaction in the pool to drop, on a
            # machine slow to restart workers) comes first until it did.
            fault = missing[0].removesuffix("s")
        victim = self.rng.randrange(len(self.workers))
        process = self.workers[victim]
        if fault == "kill" or (fault == "pause" and not process.is_alive()):
            process.kill()
            process.join()
            self.workers[victim] = self.spawn(self.started)
            self.started += 1
            self.done["kills"] += 1
        elif fault == "pause" and process.pid is not None:
            # A pause past the lease (a GC stall, a frozen VM): it wakes up late.
            os.kill(process.pid, signal.SIGSTOP)
            threading.Timer(2.5 * LEASE, _resume, (process.pid,)).start()
            self.done["pauses"] += 1
        elif fault == "drop":  # hold mining back until something waits in the pool, drop it
            self.miner.running.clear()
            try:
                until = time.monotonic() + 5.0
                while time.monotonic() < until:
                    pending = self.node.call("txpool_content").get("pending", {})
                    hashes = [tx["hash"] for txs in pending.values() for tx in txs.values()]
                    if hashes:
                        for tx_hash in hashes:
                            self.node.call("anvil_dropTransaction", [tx_hash])
                        self.done["drops"] += len(hashes)
                        break
                    time.sleep(0.05)
            finally:
                self.miner.running.set()
        elif fault == "reorg":
            self.node.call("anvil_reorg", [REORG_DEPTH, []])
            self.done["reorgs"] += 1
        elif fault == "spike":
            self.node.call("anvil_setNextBlockBaseFeePerGas", [hex(5 * CAP)])
            self.spiked_until = time.monotonic() + 1.5
            self.done["spikes"] += 1

    def every_fault_done(self) -> bool:
        return all(self.done[k] for k in FAULTS) and self.done["kills"] + self.done["pauses"] >= 5

    def replace_dead(self) -> None:
        for i, process in enumerate(self.workers):  # self-killed ones too
            if not process.is_alive():
                self.workers[i] = self.spawn(self.started)
                self.started += 1


def _one(conn: psycopg.Connection[Any], statement: str) -> Any:
    row = conn.execute(statement.encode()).fetchone()
    assert row is not None
    return row[0]


@pytest.mark.proof
@pytest.mark.slow
@pytest.mark.timeout(600)  # a minute or two; the chaos may go on until every fault happened
def test_killed_paused_dropped_spiked_and_reorged_reveal_workers_reveal_each_token_once(
    postgres_container: Database, emptied_tables: None, tmp_path: Path
) -> None:
    rng = random.Random(20261206)
    url = postgres_container.url
    with Anvil(extra_args=("--no-mining",)) as node:
        miner = Miner(node)
        miner.start()
        contract, keeper = asyncio.run(_deploy_and_mint(node))
        keys = key_file(tmp_path, keeper)

        def spawn(n: int) -> BaseProcess:
            spec = RevealProcess(
                database_url=url,
                rpc_url=node.url,
                chain_id=node.chain_id,
                contract=contract,
                key_file=str(keys),
                log_path=str(tmp_path / f"reveal-{n}.log"),
                seed=n,
                die_after_send=0.15 if n % 2 else 0.0,
                keeper={
                    "max_fee_per_gas": CAP,
                    "confirmations": CONFIRMATIONS,
                    "stuck_after": 1.5,
                    "poll": 0.1,
                    "wait": 10.0,
                },
                worker={"lease_seconds": LEASE},
            )
            process = CONTEXT.Process(target=run_reveal_worker, args=(spec,))
            process.start()
            return process

        with psycopg.connect(**libpq_kwargs(url), autocommit=True) as conn:  # type: ignore[arg-type]
            conn.execute(SEED.format(tokens=TOKENS).encode())
            killer = Killer(node, miner, spawn, rng)
            left = "SELECT count(*) FROM tokens_s0 WHERE status <> 'revealed'"
            try:
                until, turn = time.monotonic() + CHAOS_SECONDS, 0
                # Every kind of fault at least once, however slow the machine: the chaos goes on
                # past CHAOS_SECONDS until each one happened (while tokens are left to act on).
                while _one(conn, left) and (
                    time.monotonic() < until
                    or (not killer.every_fault_done() and time.monotonic() < until + 60)
                ):
                    time.sleep(ACT_EVERY)
                    killer.act(turn)
                    turn += 1
                node.call("anvil_setNextBlockBaseFeePerGas", [hex(GWEI)])
                deadline = time.monotonic() + DEADLINE_SECONDS
                while time.monotonic() < deadline and _one(conn, left):
                    killer.replace_dead()
                    time.sleep(0.2)
                assert _one(conn, left) == 0, "tokens still unrevealed at the deadline"
            finally:
                time.sleep(2.5 * LEASE)  # paused workers have woken up
                stop_all(killer.workers)
                miner.stopped.set()

            pending = _one(
                conn, "SELECT count(*) FROM reveal_transactions WHERE status = 'pending'"
            )
            claimed = _one(conn, "SELECT count(*) FROM tokens_s0 WHERE claim_id IS NOT NULL")
            allocator = _one(conn, "SELECT next_nonce FROM keeper_nonces")
            stored = dict(
                conn.execute(b"SELECT token_id, reveal_tx_hash FROM tokens_s0").fetchall()
            )
            sends = _one(conn, "SELECT sum(broadcasts) FROM reveal_attempts")
            attempts = _one(conn, "SELECT count(*) FROM reveal_attempts")
            reveals = _one(conn, "SELECT count(*) FROM reveal_transactions")
            fillers = _one(conn, "SELECT count(*) FROM reveal_attempts WHERE kind = 'filler'")
            hashes = [r[0] for r in conn.execute(b"SELECT tx_hash FROM reveal_attempts").fetchall()]
        on_chain, confirmed_nonce, reverted = asyncio.run(
            _chain_facts(node, contract, keeper, hashes)
        )

    done = killer.done
    assert done["kills"] + done["pauses"] >= 5 and done["drops"] and done["reorgs"], done
    assert done["spikes"], done
    assert pending == 0, "a reveal transaction was left pending"
    assert claimed == 0
    assert sorted(on_chain) == list(range(1, TOKENS + 1)), "a token was never revealed on chain"
    twice = {t: h for t, h in on_chain.items() if len(h) > 1}
    assert not twice, f"revealed by two transactions: {list(twice.items())[:3]}"
    assert stored == {t: h[0] for t, h in on_chain.items()}, (
        "the database and the chain disagree on which transaction revealed a token"
    )
    assert confirmed_nonce == allocator, "the keeper's nonces have a gap (or went unused)"
    print(
        f"reveal chaos: {done}, {killer.started} worker processes, {reveals} reveals, "
        f"{attempts - reveals} replacements or fillers ({fillers} fillers), {sends} sends for "
        f"{TOKENS} tokens ({sends / TOKENS:.3f} per token), {reverted} reverted, "
        f"nonce {confirmed_nonce}"
    )


async def _chain_facts(
    node: Anvil, contract: str, keeper: Any, attempts: list[str]
) -> tuple[dict[int, list[str]], int, int]:
    """Every TokensRevealed log (token -> transactions), the keeper's confirmed nonce, and how
    many of the keeper's signed transactions were mined reverted."""
    w3 = client.connect(node.url)
    glisk = glisk_contract.glisk(w3, contract)
    event = glisk.events.TokensRevealed()
    logs = await w3.eth.get_logs(
        {"address": glisk.address, "fromBlock": 0, "toBlock": "latest", "topics": [event.topic]}
    )
    on_chain: dict[int, list[str]] = {}
    for entry in logs:
        for token_id in event.process_log(entry)["args"]["tokenIds"]:
            on_chain.setdefault(int(token_id), []).append(entry["transactionHash"].to_0x_hex())
    nonce = int(await w3.eth.get_transaction_count(keeper.address, "latest"))
    reverted = 0
    for tx_hash in attempts:
        with contextlib.suppress(TransactionNotFound):  # replaced, dropped: never mined
            receipt = await w3.eth.get_transaction_receipt(HexBytes(tx_hash))
            reverted += receipt["status"] != 1
    await w3.provider.disconnect()
    return on_chain, nonce, reverted


def _resume(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)
