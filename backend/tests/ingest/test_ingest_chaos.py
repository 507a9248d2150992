"""Ingest chaos: mints from many accounts (single and batch, at random) on a real node; two
`glisk ingest` processes SIGKILLed and restarted at random; a webhook feed posting to a real
`glisk serve` that redelivers and reorders the same payloads, marks orphaned logs removed and
later delivers them again as if live; and `anvil_reorg` replacing the last blocks with different
mints of the same token ids.

At the end, against the chain as it is: every canonical mint recorded exactly once, with its
block, its author (any letter case) and its tokens; nothing recorded from an orphaned block; the
cursor never moved backwards (every committed move, from a trigger); and the "new" answers of the
followers, their gap passes and the webhook, less what they rolled back, add up to the canonical
logs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import secrets
import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from glisk.chain import client
from glisk.chain import contract as glisk_contract
from glisk.chain.anvil import Anvil
from glisk.embedded import free_port
from glisk.ingest import state
from glisk.ingest.node import Node
from glisk.ingest.state import Cursor
from glisk.models import MintLog
from glisk.testing import connect
from tests.support.database import Database
from tests.support.ingest import alchemy_payload, block_of, signed
from tests.support.processes import GLISK, glisk_env, wait_serving
from tests.support.waiting import eventually

pytestmark = [pytest.mark.proof, pytest.mark.timeout(600)]

SEED = int(os.environ.get("GLISK_CHAOS_SEED", "20261128"))
ACCOUNTS = 24  # anvil dev accounts: 0 deploys, 1 keeps, the rest mint
MINTERS = 6  # mints in flight at once, each from its own account
CHAOS_SECONDS = 30.0
REORG_EVERY = (1.5, 3.0)
KILL_EVERY = (1.0, 3.0)
CONFIRMATIONS = 1
WINDOW = 16
AUTHORS = ["0x" + secrets.token_hex(20) for _ in range(10)]
KEY = "whsec_" + secrets.token_hex(16)

AUDIT = """
CREATE TABLE chaos_cursor_moves (
    n bigserial PRIMARY KEY, old_block bigint, new_block bigint NOT NULL
);
CREATE FUNCTION chaos_cursor_moved() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.key = 'ingest_cursor' THEN
        INSERT INTO chaos_cursor_moves (old_block, new_block)
        VALUES (CASE WHEN TG_OP = 'UPDATE' THEN CAST(OLD.state_value ->> 'block' AS bigint) END,
                CAST(NEW.state_value ->> 'block' AS bigint));
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER chaos_cursor_moved AFTER INSERT OR UPDATE ON system_state
FOR EACH ROW EXECUTE FUNCTION chaos_cursor_moved();
"""
UNAUDIT = """
DROP TRIGGER IF EXISTS chaos_cursor_moved ON system_state;
DROP FUNCTION IF EXISTS chaos_cursor_moved();
DROP TABLE IF EXISTS chaos_cursor_moves;
"""


class Minting:
    """Mints from many accounts; paused (and drained) while a reorg is made."""

    def __init__(self, w3: Any, address: str, accounts: list[LocalAccount], rng: random.Random):
        self.w3, self.address, self.accounts, self.rng = w3, address, accounts, rng
        self.open = asyncio.Event()
        self.open.set()
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.sent = 0

    async def minter(self, account: LocalAccount, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.open.wait()
            self.in_flight += 1
            self.idle.clear()
            try:
                quantity = 1 if self.rng.random() < 0.4 else self.rng.randint(2, 50)
                author = self.rng.choice(AUTHORS)
                author = "0x" + (author[2:].upper() if self.rng.random() < 0.5 else author[2:])
                await glisk_contract.mint(
                    self.w3, account, self.address, prompt_author=author, quantity=quantity
                )
                self.sent += 1
            finally:
                self.in_flight -= 1
                if self.in_flight == 0:
                    self.idle.set()
            await asyncio.sleep(self.rng.uniform(0, 0.05))

    @contextlib.asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        self.open.clear()
        await self.idle.wait()
        try:
            yield
        finally:
            self.open.set()


class Feed:
    """What Alchemy would post: each new block's mint logs, at the head (no confirmations),
    delivered out of order and some of them again; after a reorg the orphaned logs once marked
    removed and once more as if nothing happened (a late redelivery)."""

    def __init__(self, node: Node, url: str, rng: random.Random) -> None:
        self.node, self.url, self.rng = node, url, rng
        self.seen = 0
        self.pending: list[bytes] = []
        self.answers: Counter[str] = Counter()
        self.told: dict[tuple[str, int, int], list[str]] = {}
        self.posts = 0

    async def poll(self) -> None:
        head = await self.node.head()
        if head <= self.seen:
            return
        by_block: dict[int, list[MintLog]] = {}
        for log in await self.node.mint_logs(self.seen + 1, head):
            by_block.setdefault(log.block_number, []).append(log)
        for logs in by_block.values():
            self.pending.append(alchemy_payload(self.node.contract, block_of(logs[0]), logs))
        self.seen = head

    def reorged(self, first_replaced: int, orphans: list[MintLog]) -> None:
        self.seen = min(self.seen, first_replaced - 1)
        by_block: dict[int, list[MintLog]] = {}
        for log in orphans:
            by_block.setdefault(log.block_number, []).append(log)
        for logs in by_block.values():
            body = alchemy_payload(self.node.contract, block_of(logs[0]), logs, removed=True)
            self.pending.append(body)
            stale = alchemy_payload(self.node.contract, block_of(logs[0]), logs)
            self.pending.insert(self.rng.randint(0, len(self.pending)), stale)

    async def sender(self, http: httpx.AsyncClient, stop: asyncio.Event) -> None:
        while not (stop.is_set() and not self.pending):
            if not self.pending:
                await asyncio.sleep(0.02)
                continue
            body = self.pending.pop(self.rng.randrange(min(6, len(self.pending))))
            if self.rng.random() < 0.3:  # delivered again later
                self.pending.insert(self.rng.randint(0, len(self.pending)), body)
            response = await http.post(self.url, content=body, headers=signed(KEY, body))
            assert response.status_code == 200, response.text
            self.posts += 1
            answer = response.json()
            for name in ("new", "duplicate", "conflict", "orphaned", "rolled_back", "removed"):
                self.answers[name] += answer[name]
            for item in answer["logs"]:  # what each log was told, to explain a failure
                key = (item["tx_hash"], item["log_index"], item["block_number"])
                self.told.setdefault(key, []).append(item["answer"])


def replacement(w3: Any, address: str, account: LocalAccount, rng: random.Random) -> dict[str, Any]:
    """A mint as anvil_reorg takes it: an unsigned request from a dev account (anvil signs)."""
    contract = glisk_contract.glisk(w3, address)
    quantity = rng.randint(1, 50)
    data = contract.encode_abi("mint", args=[w3.to_checksum_address(rng.choice(AUTHORS)), quantity])
    return {
        "from": account.address,
        "to": address,
        "data": data,
        "value": "0x0",
        "gas": hex(4_000_000),
    }


class Followers:
    """Two `glisk ingest` processes; SIGKILLed and started again. A follower counts as ready once
    its log says ``ingest.start`` (on this loaded machine an interpreter takes seconds to start:
    only a follower at work is worth killing)."""

    def __init__(self, env: dict[str, str], logs: Path, ranges: tuple[int, ...]) -> None:
        self.env, self.logs, self.ranges = env, logs, ranges
        self.processes: list[subprocess.Popen[bytes]] = []
        self.offsets: list[int] = []
        self.ready_at: list[float | None] = []
        self.started = self.kills = 0
        for i in range(len(ranges)):
            self.processes.append(self._spawn(i))
            self.offsets.append(0)
            self.ready_at.append(None)

    def log(self, i: int) -> Path:
        return self.logs / f"ingest-{i}.log"

    def _spawn(self, i: int) -> subprocess.Popen[bytes]:
        self.started += 1
        with self.log(i).open("ab") as sink:
            return subprocess.Popen(
                [*GLISK, "ingest"],
                env={**self.env, "INGEST_MAX_RANGE": str(self.ranges[i])},
                stdout=sink,
                stderr=sink,
            )

    def ready(self, i: int) -> bool:
        if self.ready_at[i] is None:
            assert self.processes[i].poll() is None, self.log(i).read_text()[-3000:]
            with self.log(i).open("rb") as f:
                f.seek(self.offsets[i])
                if b"ingest.start" in f.read():
                    self.ready_at[i] = time.monotonic()
        return self.ready_at[i] is not None

    def kill(self, i: int) -> None:
        self.processes[i].send_signal(signal.SIGKILL)
        self.processes[i].wait()
        self.kills += 1
        self.offsets[i] = self.log(i).stat().st_size
        self.ready_at[i] = None
        self.processes[i] = self._spawn(i)

    def alive(self) -> None:
        for i, process in enumerate(self.processes):
            assert process.poll() is None, self.log(i).read_text()[-3000:]

    def stop(self) -> None:
        for process in self.processes:
            process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


def start_serve(env: dict[str, str], log: Path, port: int) -> subprocess.Popen[bytes]:
    with log.open("ab") as sink:
        return subprocess.Popen(
            [*GLISK, "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=sink,
            stderr=sink,
        )


def cursor(conn: psycopg.Connection[Any]) -> Cursor | None:
    row = conn.execute(
        "SELECT state_value FROM system_state WHERE key = %s", (state.CURSOR,)
    ).fetchone()
    return Cursor.from_json(row[0]) if row else None


async def test_ingest_chaos_records_every_canonical_mint_exactly_once(
    postgres_container: Database, emptied_tables: None, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    url = postgres_container.url
    with Anvil(accounts=ACCOUNTS) as node, connect(url) as conn:
        conn.execute(UNAUDIT)
        conn.execute(AUDIT)
        try:
            await _chaos(node, url, conn, rng, tmp_path)
        finally:
            conn.execute(UNAUDIT)


async def _chaos(
    anvil: Anvil, url: str, conn: psycopg.Connection[Any], rng: random.Random, logs: Path
) -> None:
    w3 = client.connect(anvil.url)
    keys = anvil.private_keys
    admin = Account.from_key(keys[0])
    deployment = await glisk_contract.deploy(w3, admin, keeper=Account.from_key(keys[1]).address)
    address = deployment.address
    accounts = [Account.from_key(k) for k in keys[2:]]
    env = glisk_env(
        "INGEST_*",
        DATABASE_URL=url,
        CHAIN_RPC_URL=anvil.url,
        GLISK_CONTRACT_ADDRESS=address,
        INGEST_CONFIRMATIONS=str(CONFIRMATIONS),
        INGEST_REORG_WINDOW=str(WINDOW),
        INGEST_POLL_INTERVAL="0.1",
        INGEST_GAP_INTERVAL="1",
        ALCHEMY_WEBHOOK_SIGNING_KEY=KEY,
        LOG_LEVEL="INFO",
    )
    port = free_port()
    serve_log = logs / "serve.log"
    serve = start_serve({**env, "LOG_LEVEL": "WARNING"}, serve_log, port)
    followers = Followers(env, logs, (3, 7))
    reorgs = 0
    minting = Minting(w3, address, accounts[: MINTERS * 2], rng)
    feed = Feed(Node(w3, address), f"http://127.0.0.1:{port}/webhooks/alchemy", rng)
    stop_minting, stop_feed = asyncio.Event(), asyncio.Event()

    async def reorg(depth: int) -> None:
        """Replace the last ``depth`` blocks with blocks holding other mints (minting paused)."""
        nonlocal reorgs
        async with minting.paused():
            await feed.poll()  # Alchemy saw the blocks about to be orphaned
            head = await w3.eth.block_number
            orphans = await feed.node.mint_logs(head - depth + 1, head)
            txs = [
                [
                    replacement(w3, address, rng.choice(accounts[MINTERS:]), rng),
                    rng.randrange(depth),
                ]
                for _ in range(rng.randint(1, 2))
            ]
            await client.rpc(w3, "anvil_reorg", [depth, txs])
            feed.reorged(head - depth + 1, orphans)
            reorgs += 1

    async def caught_up(seconds: float = 180) -> int:
        """Wait until the cursor is at the confirmed head; that head."""
        head = await w3.eth.block_number

        def there() -> bool:
            followers.alive()
            found = cursor(conn)
            return found is not None and found.block >= head - CONFIRMATIONS

        await eventually(there, seconds, f"the followers at block {head - CONFIRMATIONS}", poll=0.1)
        return head

    def both_ready() -> bool:
        return all([followers.ready(0), followers.ready(1)])

    try:
        wait_serving(serve, port, 240, what="glisk serve", output=serve_log.read_text)
        await eventually(both_ready, 240, "both followers started", poll=0.1)
        async with httpx.AsyncClient(timeout=60) as http:
            minters = [
                asyncio.create_task(minting.minter(accounts[i], stop_minting))
                for i in range(MINTERS)
            ]
            senders = [asyncio.create_task(feed.sender(http, stop_feed)) for _ in range(2)]
            until = time.monotonic() + CHAOS_SECONDS
            next_reorg = time.monotonic() + rng.uniform(*REORG_EVERY)
            next_kill = time.monotonic() + rng.uniform(*KILL_EVERY)
            while time.monotonic() < until:
                await feed.poll()
                now = time.monotonic()
                victim = rng.randrange(2)
                # Only a follower at work; and while the other one works (or now and then both).
                other_ready = followers.ready(1 - victim) or rng.random() < 0.2
                if now >= next_kill and followers.ready(victim) and other_ready:
                    followers.kill(victim)
                    next_kill = now + rng.uniform(*KILL_EVERY)
                if now >= next_reorg:
                    await reorg(rng.randint(1, 3))
                    next_reorg = now + rng.uniform(*REORG_EVERY)
                await asyncio.sleep(0.05)
            stop_minting.set()
            await asyncio.gather(*minters)
            # One more reorg, of blocks the followers have consumed: they must find it at their
            # cursor, roll it back and read the new blocks.
            await eventually(both_ready, 240, "both followers started", poll=0.1)
            for i in range(2):
                await glisk_contract.mint(
                    w3, accounts[i], address, prompt_author=AUTHORS[i], quantity=1 + i
                )
            await caught_up()
            await reorg(CONFIRMATIONS + 2)
            for _ in range(CONFIRMATIONS + 3):  # every reorged block well below the head
                await client.rpc(w3, "evm_mine")
            await feed.poll()
            stop_feed.set()
            await asyncio.gather(*senders)
        # The webhook's last deliveries came after the followers' last steps: blocks that
        # arrive now make them look at the window again.
        for _ in range(2):
            await client.rpc(w3, "evm_mine")
        head = await caught_up()
    finally:
        stop_minting.set()
        stop_feed.set()
        followers.stop()
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(30)
        except subprocess.TimeoutExpired:
            serve.kill()

    canonical = await Node(w3, address).mint_logs(0, head)
    await w3.provider.disconnect()
    events = conn.execute(
        "SELECT tx_hash, log_index, block_number, block_hash, token_id, quantity FROM mint_events"
    ).fetchall()
    tokens = conn.execute(
        "SELECT t.token_id, lower(a.wallet_address), t.minter_address, t.mint_timestamp, "
        "t.status::text FROM tokens_s0 t JOIN authors a ON a.id = t.author_id"
    ).fetchall()
    moves = conn.execute(
        "SELECT old_block, new_block FROM chaos_cursor_moves ORDER BY n"
    ).fetchall()
    final = cursor(conn)
    gaps = conn.execute(
        "SELECT state_value FROM system_state WHERE key = %s", (state.GAPS_RECORDED,)
    ).fetchone()
    gap_new = int(gaps[0]) if gaps else 0
    assert final is not None

    # Every canonical log once, from its canonical block, and nothing else (no orphaned block).
    recorded = sorted((e[0], e[1], e[2], e[3], e[4], e[5]) for e in events)
    wanted = sorted(
        (g.tx_hash, g.log_index, g.block_number, g.block_hash, g.start_token_id, g.quantity)
        for g in canonical
    )
    assert recorded == wanted, _explain(recorded, wanted, feed, logs, moves)
    expected = {
        t: (g.author.lower(), g.minter, g.block_timestamp, "detected")
        for g in canonical
        for t in g.token_ids
    }
    assert {t[0]: (t[1], t[2], t[3], t[4]) for t in tokens} == expected
    assert sorted(expected) == list(range(1, len(expected) + 1))
    # The cursor: every committed move forward (or standing), from the first step on.
    backwards = [(old, new) for old, new in moves if old is not None and new < old]
    assert moves and not backwards, f"the cursor moved backwards: {backwards}"
    assert final.reorgs >= 1, "the followers never met a reorg at their cursor"
    # The "new" answers, less what was rolled back, are exactly the canonical logs.
    news = final.new + gap_new + feed.answers["new"]
    undone = final.rolled_back + feed.answers["rolled_back"]
    assert news - undone == len(canonical), (final, gap_new, feed.answers)
    print(
        f"ingest chaos (seed {SEED}): {len(canonical)} canonical mint logs, {len(expected)} "
        f"tokens, {minting.sent} mints sent, {reorgs} reorgs, {followers.kills} followers "
        f"SIGKILLed ({followers.started} started); followers: {final.steps} steps, {final.new} new, "
        f"{final.duplicate} duplicate, {final.rolled_back} rolled back, {final.reorgs} reorgs "
        f"seen, {final.conflict} conflicts; gap passes: {gap_new} new; webhook: {feed.posts} "
        f"posts, {dict(feed.answers)}; cursor moved {len(moves)} times, never back"
    )


def _explain(
    recorded: list[tuple[Any, ...]],
    wanted: list[tuple[Any, ...]],
    feed: Feed,
    logs: Path,
    moves: list[tuple[Any, ...]],
) -> str:
    """What the recorded logs lack and hold too many of, with what the webhook told each and
    the followers' log lines about their blocks."""
    missing = sorted(set(wanted) - set(recorded))
    extra = sorted(set(recorded) - set(wanted))
    lines = [f"missing {len(missing)}, extra {len(extra)}"]
    text = "\n".join(p.read_text(errors="replace") for p in sorted(logs.glob("ingest-*.log")))
    for kind, rows in (("missing", missing), ("extra", extra)):
        for row in rows:
            tx, index, block = row[0], row[1], row[2]
            lines.append(f"{kind}: {row}; webhook told {feed.told.get((tx, index, block))}")
            for line in text.splitlines():
                span = re.search(r"first=(\d+) .*last=(\d+)", line)
                near = re.search(r"(?:ancestor|block)=(\d+)", line)
                if (span and int(span[1]) <= block <= int(span[2])) or (
                    near and abs(int(near[1]) - block) <= 3
                ):
                    lines.append("  " + line[:240])
    lines.append(f"cursor moves (last 15): {moves[-15:]}")
    lines += [line[:240] for line in text.splitlines() if "gaps" in line or "conflict" in line]
    return "\n".join(lines[:200])
