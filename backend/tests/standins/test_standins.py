"""The stand-ins behave like the real thing: the fake chain (as a state machine on a controlled
clock, and as a shared process over HTTP, faults included) and the fake webhook feed."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from glisk.standins.chain import FakeChain, RpcFault
from glisk.standins.chain_client import (
    ChainClient,
    ChainUnavailable,
    FakeChainControl,
    NonceTooLow,
    RunningChain,
    TxStatus,
    fake_chain_process,
)
from glisk.standins.mint_feed import MintFeed
from glisk.standins.tx import InvalidTransaction, decode_raw, sign_reveal

ALICE = "0x" + "A1" * 20
BOB = "0x" + "b0" * 20


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float = 1.0) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def chain(clock: Clock) -> FakeChain:
    return FakeChain(block_time=1.0, clock=clock)


def send(chain: FakeChain, sender: str, nonce: int, ids: list[int], gas: int = 10) -> str:
    result, _ = chain.call(
        "eth_sendRawTransaction", [sign_reveal(sender, nonce, ids, gas_price=gas).raw]
    )
    return result


def nonce(chain: FakeChain, sender: str, tag: str) -> int:
    return int(chain.call("eth_getTransactionCount", [sender, tag])[0], 16)


def state_of(chain: FakeChain, tx_hash: str) -> tuple[str, str | None]:
    tx = next(t for t in chain.call("fake_report", [])[0]["transactions"] if t["hash"] == tx_hash)
    return tx["state"], tx["status"]


def refused(chain: FakeChain, raw: str) -> str:
    with pytest.raises(RpcFault) as info:
        chain.call("eth_sendRawTransaction", [raw])
    return info.value.message


# -- transactions -------------------------------------------------------------------------------


def test_signing_is_deterministic_and_the_node_reads_back_what_was_signed() -> None:
    one = sign_reveal(ALICE, 3, [5, 6, 7])
    assert one == sign_reveal(ALICE, 3, [5, 6, 7])
    assert one.hash != sign_reveal(ALICE, 4, [5, 6, 7]).hash
    assert one.hash != sign_reveal(ALICE, 3, [5, 6, 7], gas_price=2).hash
    assert decode_raw(one.raw) == one
    assert len(one.hash) == 66


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("0x12", 0, [1]), "from"),
        ((ALICE, -1, [1]), "nonce"),
        ((ALICE, 0, []), "token_ids"),
        ((ALICE, 0, list(range(51))), "token_ids"),
        ((ALICE, 0, [1, 1]), "token_ids"),
        ((ALICE, 0, [-3]), "token_ids"),
    ],
)
def test_a_malformed_transaction_is_refused_naming_the_field(
    args: tuple[Any, ...], field: str
) -> None:
    with pytest.raises(InvalidTransaction, match=f"^{field}:"):
        sign_reveal(*args)


# -- the node as a state machine ------------------------------------------------------------------


def test_transactions_are_mined_once_per_nonce_in_nonce_order_and_a_gap_holds_the_rest(
    chain: FakeChain, clock: Clock
) -> None:
    second = send(chain, ALICE, 1, [2])  # nonce 0 not sent yet
    assert (nonce(chain, ALICE, "latest"), nonce(chain, ALICE, "pending")) == (0, 0)
    clock.tick(5)
    chain.call("eth_blockNumber", [])
    assert state_of(chain, second) == ("pending", None)

    first = send(chain, ALICE, 0, [1])
    assert nonce(chain, ALICE, "pending") == 2
    clock.tick()
    chain.call("eth_blockNumber", [])
    assert state_of(chain, first) == ("mined", "success")
    assert state_of(chain, second) == ("mined", "success")
    assert (nonce(chain, ALICE, "latest"), nonce(chain, ALICE, "pending")) == (2, 2)
    assert nonce(chain, BOB, "pending") == 0  # nonces are per account
    receipt = chain.call("eth_getTransactionReceipt", [first])[0]
    assert receipt["status"] == "0x1"


def test_the_same_signed_transaction_sent_again_is_already_known_pending_or_mined(
    chain: FakeChain, clock: Clock
) -> None:
    tx = sign_reveal(ALICE, 0, [1, 2])
    chain.call("eth_sendRawTransaction", [tx.raw])
    assert refused(chain, tx.raw) == "already known"
    clock.tick()
    chain.call("eth_blockNumber", [])
    assert refused(chain, tx.raw) == "already known"
    report = chain.call("fake_report", [])[0]
    assert [(t["hash"], t["sends"], t["state"]) for t in report["transactions"]] == [
        (tx.hash, 3, "mined")
    ]
    assert report["send_calls"] == 3 and report["revealed"] == {"1": tx.hash, "2": tx.hash}


def test_another_transaction_for_a_mined_nonce_is_nonce_too_low(
    chain: FakeChain, clock: Clock
) -> None:
    send(chain, ALICE, 0, [1])
    clock.tick()
    late = sign_reveal(ALICE, 0, [9])
    assert refused(chain, late.raw) == "nonce too low"
    assert nonce(chain, ALICE, "pending") == 1
    # Refused, but reported: someone built a second transaction for that nonce.
    report = chain.call("fake_report", [])[0]
    [record] = [t for t in report["transactions"] if t["hash"] == late.hash]
    assert (record["state"], record["reason"], record["token_ids"]) == (
        "refused",
        "nonce too low",
        [9],
    )


def test_a_pending_transaction_is_replaced_only_by_one_paying_ten_percent_more(
    chain: FakeChain, clock: Clock
) -> None:
    first = send(chain, ALICE, 0, [1], gas=100)
    assert refused(chain, sign_reveal(ALICE, 0, [1, 2], gas_price=109).raw).startswith(
        "replacement transaction underpriced"
    )
    bumped = send(chain, ALICE, 0, [1, 2], gas=110)
    assert chain.call("eth_getTransactionByHash", [first])[0] is None  # replaced: unknown
    clock.tick()
    chain.call("eth_blockNumber", [])
    assert state_of(chain, first) == ("replaced", None)
    assert state_of(chain, bumped) == ("mined", "success")


def test_revealing_a_token_already_revealed_reverts_like_the_contract_and_spends_the_nonce(
    chain: FakeChain, clock: Clock
) -> None:
    send(chain, ALICE, 0, [1, 2])
    clock.tick()
    again = send(chain, BOB, 0, [2, 3])
    clock.tick()
    chain.call("eth_blockNumber", [])
    assert state_of(chain, again) == ("mined", "reverted")
    assert nonce(chain, BOB, "latest") == 1
    report = chain.call("fake_report", [])[0]
    assert set(report["revealed"]) == {"1", "2"}  # 3 was not revealed by the reverted one
    assert chain.call("eth_getTransactionReceipt", [again])[0]["status"] == "0x0"


def test_a_dropped_transaction_is_unknown_keeps_its_nonce_free_and_can_be_sent_again(
    chain: FakeChain, clock: Clock
) -> None:
    chain.call("fake_fault", [{"action": "drop"}])
    tx = sign_reveal(ALICE, 0, [1])
    assert chain.call("eth_sendRawTransaction", [tx.raw])[0] == tx.hash  # accepted, then lost
    clock.tick(5)
    assert chain.call("eth_getTransactionByHash", [tx.hash])[0] is None
    assert chain.call("eth_getTransactionReceipt", [tx.hash])[0] is None
    assert nonce(chain, ALICE, "pending") == 0
    chain.call("eth_sendRawTransaction", [tx.raw])  # rebroadcast: the fault was used up
    clock.tick()
    chain.call("eth_blockNumber", [])
    assert state_of(chain, tx.hash) == ("mined", "success")


def test_a_delayed_transaction_stays_pending_for_its_delay_then_is_mined(
    chain: FakeChain, clock: Clock
) -> None:
    chain.call("fake_fault", [{"action": "delay", "seconds": 5}])
    delayed = send(chain, ALICE, 0, [1])
    behind = send(chain, ALICE, 1, [2])  # its nonce waits for the delayed one
    other = send(chain, BOB, 0, [3])
    clock.tick(2)
    chain.call("eth_blockNumber", [])
    assert state_of(chain, other) == ("mined", "success")
    assert state_of(chain, delayed)[0] == state_of(chain, behind)[0] == "pending"
    clock.tick(4)
    chain.call("eth_blockNumber", [])
    assert state_of(chain, delayed) == ("mined", "success")
    assert state_of(chain, behind) == ("mined", "success")


def test_faults_can_target_a_token_id_or_a_pending_hash_and_are_used_up(
    chain: FakeChain, clock: Clock
) -> None:
    chain.call("fake_fault", [{"action": "fail", "token_id": 7, "count": 1}])
    spared = send(chain, ALICE, 0, [1])
    failed = send(chain, ALICE, 1, [6, 7])
    later = send(chain, ALICE, 2, [7])
    dropped = send(chain, BOB, 0, [8])
    chain.call("fake_fault", [{"action": "drop", "tx_hash": dropped}])
    clock.tick()
    chain.call("eth_blockNumber", [])
    assert state_of(chain, spared) == ("mined", "success")
    assert state_of(chain, failed) == ("mined", "reverted")
    assert state_of(chain, later) == ("mined", "success")
    assert state_of(chain, dropped) == ("dropped", None)
    with pytest.raises(RpcFault, match="pending"):
        chain.call("fake_fault", [{"action": "fail", "tx_hash": spared}])


def test_chaos_hits_new_transactions_at_its_rates_and_the_same_seed_replays_it(
    clock: Clock,
) -> None:
    def run() -> Counter[tuple[str, str | None]]:
        chain = FakeChain(block_time=1.0, clock=clock)
        chain.call("fake_chaos", [{"drop": 0.2, "fail": 0.2, "seed": 3}])
        # One account per transaction: a dropped one would hold back its later nonces.
        hashes = [send(chain, f"0x{n:040x}", 0, [n]) for n in range(200)]
        clock.tick(1000)
        chain.call("eth_blockNumber", [])
        return Counter(state_of(chain, h) for h in hashes)

    first = run()
    assert first == run()
    assert 20 <= first[("dropped", None)] <= 60
    assert 20 <= first[("mined", "reverted")] <= 60
    assert first[("mined", "success")] == 200 - sum(
        first[k] for k in (("dropped", None), ("mined", "reverted"))
    )


def test_blocks_keep_coming_while_idle_without_mining_anything(
    chain: FakeChain, clock: Clock
) -> None:
    clock.tick(10_000)
    assert int(chain.call("eth_blockNumber", [])[0], 16) == 10_000


# -- the node process, over HTTP ------------------------------------------------------------------


@pytest.fixture(scope="module")
def node() -> Iterator[RunningChain]:
    with fake_chain_process(block_time=0.02) as running:
        yield running


@pytest.fixture
async def control(node: RunningChain) -> FakeChainControl:
    control = FakeChainControl(node.url)
    await control.reset()
    return control


async def test_a_handler_round_over_http_gets_a_nonce_sends_and_sees_its_reveal_confirmed(
    control: FakeChainControl,
) -> None:
    chain = ChainClient(control.url)
    assert await chain.next_nonce(ALICE) == 0
    tx = sign_reveal(ALICE, await chain.next_nonce(ALICE), [11, 12])
    sent = await chain.send(tx)
    assert (sent.tx_hash, sent.already_known) == (tx.hash, False)
    assert await chain.status(tx.hash) in (TxStatus.PENDING, TxStatus.CONFIRMED)
    assert await chain.wait(tx.hash, max_wait=5) == TxStatus.CONFIRMED
    receipt = await chain.receipt(tx.hash)
    assert receipt is not None and receipt.success
    assert await chain.next_nonce(ALICE, pending=False) == 1

    report = await control.report()
    assert [(t.hash, t.token_ids, t.status) for t in report.confirmed] == [
        (tx.hash, (11, 12), "success")
    ]
    assert report.revealed == {11: tx.hash, 12: tx.hash}


async def test_eight_clients_sending_one_transaction_at_once_get_one_hash_and_one_mining(
    control: FakeChainControl,
) -> None:
    tx = sign_reveal(ALICE, 0, [1, 2, 3])
    clients = [ChainClient(control.url) for _ in range(8)]
    sends = await asyncio.gather(*(c.send(tx) for c in clients))
    assert {s.tx_hash for s in sends} == {tx.hash}
    assert sum(not s.already_known for s in sends) == 1
    assert await clients[0].wait(tx.hash, max_wait=5) == TxStatus.CONFIRMED
    assert (await clients[1].send(tx)).already_known
    with pytest.raises(NonceTooLow):
        await clients[2].send(sign_reveal(ALICE, 0, [4]))
    report = await control.report()
    assert [(t.hash, t.sends) for t in report.mined] == [(tx.hash, 9)]


async def test_a_lost_reply_raises_unavailable_but_the_transaction_was_taken(
    control: FakeChainControl,
) -> None:
    chain = ChainClient(control.url)
    await control.fault("lose_reply")
    tx = sign_reveal(ALICE, 0, [5])
    with pytest.raises(ChainUnavailable, match="503"):
        await chain.send(tx)
    # What a handler must do after an unanswered send: ask, and resend the same transaction.
    assert await chain.status(tx.hash) in (TxStatus.PENDING, TxStatus.CONFIRMED)
    assert (await chain.send(tx)).already_known
    assert await chain.wait(tx.hash, max_wait=5) == TxStatus.CONFIRMED


async def test_drop_delay_and_fail_over_http(control: FakeChainControl) -> None:
    chain = ChainClient(control.url)
    await control.fault("drop")
    await control.fault("delay", seconds=0.5, token_id=2)
    await control.fault("fail", token_id=3)
    dropped = sign_reveal(ALICE, 0, [1])
    delayed = sign_reveal(BOB, 0, [2])
    failed = sign_reveal(BOB, 1, [3])
    for tx in (dropped, delayed, failed):
        await chain.send(tx)
    assert await chain.wait(dropped.hash, max_wait=5) == TxStatus.UNKNOWN
    assert await chain.status(delayed.hash) == TxStatus.PENDING
    assert await chain.wait(failed.hash, max_wait=5) == TxStatus.REVERTED
    assert await chain.status(delayed.hash) == TxStatus.CONFIRMED  # nonce 1 waited for 0
    # A dropped transaction can be broadcast again as it is; this time it is mined.
    assert not (await chain.send(dropped)).already_known
    assert await chain.wait(dropped.hash, max_wait=5) == TxStatus.CONFIRMED


async def test_a_client_killed_mid_request_leaves_the_node_serving_everyone_else(
    control: FakeChainControl,
) -> None:
    host, port = control.url.removeprefix("http://").split(":")
    # Another process sends a transaction, then starts a request and is SIGKILLed half-way.
    script = f"""
import asyncio, os, signal, socket
from glisk.standins.chain_client import ChainClient
from glisk.standins.tx import sign_reveal
asyncio.run(ChainClient({control.url!r}).send(sign_reveal({ALICE!r}, 0, [42])))
s = socket.create_connection(({host!r}, {port}))
s.sendall(b"POST / HTTP/1.1\\r\\nContent-Length: 500\\r\\n\\r\\n{{\\"jsonrpc\\"")
os.kill(os.getpid(), signal.SIGKILL)
"""
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", script)
    assert await asyncio.wait_for(child.wait(), 30) == -signal.SIGKILL
    chain = ChainClient(control.url)
    assert await chain.next_nonce(ALICE) == 1
    report = await control.report()
    assert [t.token_ids for t in report.transactions] == [(42,)]


async def test_no_node_listening_is_unavailable_not_a_hang() -> None:
    chain = ChainClient("http://127.0.0.1:9", timeout=2)  # the discard port: nothing listens
    with pytest.raises(ChainUnavailable):
        await chain.block_number()


def test_the_node_process_outlives_its_clients_and_stops_with_its_launcher() -> None:
    with fake_chain_process(block_time=0.02) as running:
        pid = running.process.pid
        assert asyncio.run(ChainClient(running.url).block_number()) >= 0
    assert running.process.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


# -- the webhook feed -----------------------------------------------------------------------------


def test_the_feed_mints_every_token_once_in_batches_from_one_with_unique_log_keys() -> None:
    feed = MintFeed.generate(tokens=300, seed=5, authors=6, max_batch=5)
    ids = [t for log in feed.logs for t in log.token_ids]
    assert ids == list(range(1, 301))
    assert feed.token_count == 300
    assert len({log.key for log in feed.logs}) == len(feed.logs)
    assert {log.quantity for log in feed.logs} == {1, 2, 3, 4, 5}
    assert any(a.key[0] == b.key[0] for a, b in zip(feed.logs, feed.logs[1:], strict=False))
    spellings: dict[str, set[str]] = {}
    for log in feed.logs:
        spellings.setdefault(log.author.lower(), set()).add(log.author)
    assert len(spellings) <= 6
    assert any(len(s) > 1 for s in spellings.values()), "no author in two letter cases"
    assert MintFeed.generate(tokens=300, seed=5, authors=6) == feed


def test_deliveries_carry_every_log_some_twice_out_of_order_in_small_payloads() -> None:
    feed = MintFeed.generate(tokens=400, seed=1)
    payloads = feed.deliveries(seed=2, repeat=0.3, payload=4)
    delivered = [log for payload in payloads for log in payload]
    counts = Counter(log.key for log in delivered)
    assert set(counts) == {log.key for log in feed.logs}
    assert 0.15 < sum(c > 1 for c in counts.values()) / len(counts) < 0.45
    assert delivered[: len(feed.logs)] != list(feed.logs)
    assert {len(p) for p in payloads} <= {1, 2, 3, 4}


def test_streams_overlap_and_together_cover_every_log() -> None:
    feed = MintFeed.generate(tokens=400, seed=1)
    streams = feed.streams(8, seed=3, share=0.4)
    seen = [{log.key for payload in stream for log in payload} for stream in streams]
    assert set().union(*seen) == {log.key for log in feed.logs}
    assert all(0 < len(keys) < len(feed.logs) for keys in seen)
    per_log = Counter(key for keys in seen for key in keys)
    assert max(per_log.values()) >= 4
