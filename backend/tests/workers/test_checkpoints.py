"""Checkpoints and the reveal that is sent once: progress fenced like a completion, handed to the
next holder after a rescue, and pending reveals reconciled before anything is sent anew."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import text

from glisk.models import RevealStatus, TokenStatus
from glisk.ops.tokens import RetryFilter, retry_failed
from glisk.pipeline import STAGES, StageName
from glisk.testing import connect
from glisk.uow import UnitOfWorkFactory
from glisk.workers import (
    Claim,
    PendingReveal,
    PermanentError,
    RevealState,
    Worker,
    checkpoint,
    ensure_live,
    lease_left,
    record_reveal,
)
from glisk.workers.checkpoints import handler_write
from glisk.workers.run import connect_options_of, database_url_of
from tests.support.factories import expire_leases, make_ready, seed_tokens

S = TokenStatus
IMAGE, REVEAL = STAGES[StageName.IMAGE], STAGES[StageName.REVEAL]


async def _claim(uow_factory: UnitOfWorkFactory, holder: str, batch: int = 1) -> list[Claim]:
    async with uow_factory() as uow:
        return (
            await uow.leases.claim(IMAGE, holder, batch=batch, lease_seconds=60, max_attempts=3)
        ).claims


async def _column(uow_factory: UnitOfWorkFactory, column: str, token: uuid.UUID) -> Any:
    async with uow_factory() as uow:
        return (
            await uow.session.execute(
                text(f"SELECT {column} FROM tokens_s0 WHERE id = :id"), {"id": token}
            )
        ).scalar_one()


async def test_a_rescuer_receives_the_last_checkpoint_and_a_late_one_is_refused(
    uow_factory: UnitOfWorkFactory,
) -> None:
    (token,) = await seed_tokens(uow_factory, 1)
    (old,) = await _claim(uow_factory, "old")
    async with uow_factory() as uow:
        assert await uow.leases.checkpoint([old], {"nonce": 7, "tx_hash": "0xabc"})
    await expire_leases(uow_factory, token)
    (new,) = await _claim(uow_factory, "rescuer")
    assert new.checkpoint == {"nonce": 7, "tx_hash": "0xabc"}
    async with uow_factory() as uow:
        assert not await uow.leases.checkpoint([old], {"nonce": 8})  # the late holder
    assert await _column(uow_factory, "checkpoint", token) == {"nonce": 7, "tx_hash": "0xabc"}


async def test_a_checkpoint_is_kept_for_a_retry_and_cleared_by_completion_and_final_failure(
    uow_factory: UnitOfWorkFactory,
) -> None:
    retried, completed, failed = await seed_tokens(uow_factory, 3)
    claims = {c.token_uuid: c for c in await _claim(uow_factory, "w", batch=3)}
    async with uow_factory() as uow:
        assert await uow.leases.checkpoint(list(claims.values()), {"step": "sent"})
    async with uow_factory() as uow:
        await uow.leases.fail(IMAGE, claims[retried], {"m": "timeout"}, max_attempts=3)
        await uow.leases.complete(IMAGE, claims[completed], "/img.png")
        await uow.leases.fail(IMAGE, claims[failed], {"m": "no"}, max_attempts=3, permanent=True)
    assert await _column(uow_factory, "checkpoint", retried) == {"step": "sent"}
    assert await _column(uow_factory, "checkpoint", completed) is None
    assert await _column(uow_factory, "checkpoint", failed) is None


async def test_a_checkpoint_naming_one_lost_claim_writes_nothing_and_stops_the_handler(
    uow_factory: UnitOfWorkFactory,
) -> None:
    ids = await seed_tokens(uow_factory, 3)
    go = asyncio.Event()
    effects: list[int] = []
    started = asyncio.Event()

    async def reveal(claims: Sequence[Claim]) -> str:
        started.set()
        await go.wait()
        await checkpoint(claims, {"about_to": "send"})  # raises LeaseLost: one claim is gone
        effects.append(len(claims))
        return "0x" + "1" * 64

    worker = Worker(REVEAL, reveal, connect_options_of(uow_factory), batch=3)
    await make_ready(uow_factory, ids)
    task = asyncio.create_task(worker.run(exit_when_idle=True))
    await asyncio.wait_for(started.wait(), 10)
    await expire_leases(uow_factory, ids[1])
    async with uow_factory() as uow:  # another worker takes the lost one over
        await uow.leases.claim(REVEAL, "rescuer", batch=3, lease_seconds=60, max_attempts=3)
    go.set()
    stats = await asyncio.wait_for(task, 10)
    assert effects == [], "the handler went on to its effect after a refused checkpoint"
    assert (stats.completed, stats.refused, stats.failed) == (0, 3, 0)
    for token in ids:
        assert await _column(uow_factory, "checkpoint", token) is None


async def test_a_reveal_record_naming_one_lost_claim_writes_nothing_and_stops_the_handler(
    uow_factory: UnitOfWorkFactory,
) -> None:
    ids = await seed_tokens(uow_factory, 3)
    go = asyncio.Event()
    started = asyncio.Event()
    sent: list[str] = []

    async def reveal(claims: Sequence[Claim]) -> str:
        started.set()
        await go.wait()
        tx_hash = "0x" + "2" * 64
        await record_reveal(claims, tx_hash, {"nonce": 0})  # raises LeaseLost: one claim is gone
        sent.append(tx_hash)
        return tx_hash

    worker = Worker(REVEAL, reveal, connect_options_of(uow_factory), batch=3)
    await make_ready(uow_factory, ids)
    task = asyncio.create_task(worker.run(exit_when_idle=True))
    await asyncio.wait_for(started.wait(), 10)
    await expire_leases(uow_factory, ids[1])
    async with uow_factory() as uow:  # another worker takes the lost one over
        await uow.leases.claim(REVEAL, "rescuer", batch=3, lease_seconds=60, max_attempts=3)
    go.set()
    stats = await asyncio.wait_for(task, 10)
    assert sent == [], "a reveal was sent for a batch one of whose claims was lost"
    assert (stats.completed, stats.refused, stats.failed) == (0, 3, 0)
    assert await _reveal_rows(uow_factory) == []
    for token in ids:
        assert await _column(uow_factory, "checkpoint", token) is None


async def test_a_handlers_own_statement_naming_no_claim_runs_on_the_workers_connection(
    uow_factory: UnitOfWorkFactory,
) -> None:
    ids = await seed_tokens(uow_factory, 2)
    seen: list[Sequence[tuple[Any, ...]]] = []

    async def reveal(claims: Sequence[Claim]) -> str:
        # As the keeper's ledger does (glisk.chain): a statement with no claim_ids parameter.
        statement = "SELECT count(*) FROM tokens_s0 WHERE id = ANY(%(ids)s)"
        seen.append(await handler_write(statement, {"ids": [c.token_uuid for c in claims]}))
        return "0x" + "3" * 64

    worker = Worker(REVEAL, reveal, connect_options_of(uow_factory), batch=2)
    await make_ready(uow_factory, ids)
    stats = await asyncio.wait_for(worker.run(exit_when_idle=True), 10)
    assert [list(rows) for rows in seen] == [[(2,)]]
    assert (stats.completed, stats.failed) == (2, 0)


async def test_a_workers_completion_and_final_failure_clear_the_checkpoint_and_a_retry_keeps_it(
    uow_factory: UnitOfWorkFactory,
) -> None:
    completed, failed, retried = await seed_tokens(uow_factory, 3)
    stop = asyncio.Event()

    async def handler(claim: Claim) -> str:
        stop.set()  # these three, then stop
        await checkpoint(claim, {"step": "rendered"})
        if claim.token_uuid == failed:
            raise PermanentError("prompt refused")
        if claim.token_uuid == retried:
            raise RuntimeError("service timeout")
        return "/img.png"

    worker = Worker(
        IMAGE, handler, connect_options_of(uow_factory), concurrency=3, batch=3, backoff_base=600
    )
    stats = await asyncio.wait_for(worker.run(stop), 10)
    assert (stats.completed, stats.failed) == (1, 2)
    assert await _column(uow_factory, "status::text", failed) == "failed"
    assert await _column(uow_factory, "checkpoint", completed) is None
    assert await _column(uow_factory, "checkpoint", failed) is None
    assert await _column(uow_factory, "checkpoint", retried) == {"step": "rendered"}


class Chain:
    """An in-process chain for these focused tests: a signed transaction is its nonce and
    payload; each nonce is mined at most once (the real one, anvil, is in tests/chain)."""

    def __init__(self) -> None:
        self.mined: dict[int, str] = {}  # nonce -> tx hash
        self.sent: list[str] = []
        self.payloads: dict[str, list[int]] = {}
        self.next_nonce = 0
        self.hold = False  # received but not mined yet (a slow chain)
        self.down = False  # the node does not answer reconciles

    def mine(self, tx_hash: str) -> None:
        """The node mines a transaction it received earlier (the first one signed: nonce 0)."""
        self.mined.setdefault(list(self.payloads).index(tx_hash), tx_hash)

    def sign(self, token_ids: list[int]) -> tuple[str, int]:
        nonce = self.next_nonce
        self.next_nonce += 1
        tx_hash = "0x" + hashlib.sha256(f"{nonce}:{token_ids}".encode()).hexdigest()
        self.payloads[tx_hash] = token_ids
        return tx_hash, nonce

    def send(self, tx_hash: str, nonce: int) -> None:
        self.sent.append(tx_hash)
        if not self.hold:
            self.mined.setdefault(nonce, tx_hash)

    def state(self, tx_hash: str, nonce: int) -> RevealState:
        if self.mined.get(nonce) == tx_hash:
            return "confirmed"
        return "failed" if nonce in self.mined else "unknown"


class Revealer:
    """A reveal handler that records before it sends and can reconcile what it recorded."""

    def __init__(self, chain: Chain, crash_after_record: bool = False) -> None:
        self.chain = chain
        self.crash_after_record = crash_after_record

    async def __call__(self, claims: Sequence[Claim]) -> str:
        tx_hash, nonce = self.chain.sign([c.token_id for c in claims])
        await record_reveal(claims, tx_hash, {"nonce": nonce})
        if self.crash_after_record:
            raise RuntimeError("killed between record and send")
        self.chain.send(tx_hash, nonce)
        if self.chain.state(tx_hash, nonce) != "confirmed":  # a real one polls for the receipt
            raise RuntimeError("not mined in time")
        return tx_hash

    async def reconcile(self, pending: PendingReveal) -> RevealState:
        if self.chain.down:
            raise ConnectionError("the node does not answer")
        nonce = int(pending.data["nonce"])
        self.chain.send(pending.tx_hash, nonce)  # rebroadcast the recorded transaction: safe
        return self.chain.state(pending.tx_hash, nonce)


async def _reveal_rows(uow_factory: UnitOfWorkFactory) -> list[tuple[str, str]]:
    async with uow_factory() as uow:
        return [
            (r.tx_hash or "", str(r.status))
            for r in await uow.reveal_txs.get_by_status(RevealStatus.PENDING)
            + await uow.reveal_txs.get_by_status(RevealStatus.CONFIRMED)
            + await uow.reveal_txs.get_by_status(RevealStatus.FAILED)
        ]


def _worker(uow_factory: UnitOfWorkFactory, handler: Any, **kwargs: Any) -> Worker:
    options = {"backoff_base": 0.01, "poll_interval": 0.02, "batch": 10, **kwargs}
    return Worker(REVEAL, handler, connect_options_of(uow_factory), **options)


async def _record_then_crash(uow_factory: UnitOfWorkFactory, chain: Chain, count: int) -> None:
    """A holder records its reveal and dies before sending (its attempt fails)."""
    crashed = _worker(uow_factory, Revealer(chain, crash_after_record=True), backoff_base=600)
    stop = asyncio.Event()

    async def one_attempt() -> None:
        while crashed.stats.failed < count:  # noqa: ASYNC110 - the worker's counter, no event
            await asyncio.sleep(0.01)
        stop.set()

    await asyncio.wait_for(asyncio.gather(crashed.run(stop), one_attempt()), 10)
    async with uow_factory() as uow:  # its backoff has passed
        await uow.session.execute(text("UPDATE tokens_s0 SET not_before = NULL"))
    assert chain.sent == []
    assert [s for _, s in await _reveal_rows(uow_factory)] == ["pending"]


async def test_a_batch_recorded_then_interrupted_is_rebroadcast_never_sent_anew(
    uow_factory: UnitOfWorkFactory,
) -> None:
    ids = await seed_tokens(uow_factory, 4)
    await make_ready(uow_factory, ids)
    chain = Chain()
    await _record_then_crash(uow_factory, chain, 4)

    rescuer = _worker(uow_factory, Revealer(chain))
    stats = await asyncio.wait_for(rescuer.run(exit_when_idle=True), 10)
    assert stats.completed == 4
    assert len(chain.mined) == 1 and len(set(chain.sent)) == 1, "a second transaction was built"
    ((tx_hash, status),) = await _reveal_rows(uow_factory)
    assert status == "confirmed" and tx_hash == chain.mined[0]
    for token in ids:
        assert await _column(uow_factory, "reveal_tx_hash", token) == tx_hash


async def test_a_pending_reveal_that_can_never_be_mined_is_failed_and_its_tokens_sent_anew(
    uow_factory: UnitOfWorkFactory,
) -> None:
    ids = await seed_tokens(uow_factory, 2)
    await make_ready(uow_factory, ids)
    chain = Chain()
    await _record_then_crash(uow_factory, chain, 2)
    ((lost_hash, _),) = await _reveal_rows(uow_factory)
    chain.mined[0] = "0x" + "e" * 64  # its nonce went to another transaction

    stats = await asyncio.wait_for(
        _worker(uow_factory, Revealer(chain)).run(exit_when_idle=True), 10
    )
    assert stats.completed == 2
    rows = dict(await _reveal_rows(uow_factory))
    assert rows[lost_hash] == "failed"
    (new_hash,) = [h for h, s in rows.items() if s == "confirmed"]
    assert new_hash != lost_hash and chain.mined[1] == new_hash
    for token in ids:
        assert await _column(uow_factory, "reveal_tx_hash", token) == new_hash


async def test_a_reveal_that_stays_unknown_is_waited_for_a_bounded_time_then_failed(
    uow_factory: UnitOfWorkFactory,
) -> None:
    ids = await seed_tokens(uow_factory, 1)
    await make_ready(uow_factory, ids)
    chain = Chain()
    chain.hold = True  # nothing is ever mined
    worker = _worker(uow_factory, Revealer(chain), max_deferrals=3)
    stats = await asyncio.wait_for(worker.run(exit_when_idle=True), 10)
    # The first attempt sends and times out; then three checks find it still unknown; then done.
    assert (stats.completed, stats.deferred, stats.failed) == (0, 3, 2)
    assert len(set(chain.sent)) == 1, "a token whose transaction may still be mined was resent"
    assert await _column(uow_factory, "status::text", ids[0]) == "failed"
    error = await _column(uow_factory, "error_data", ids[0])
    assert error["last_error"]["type"] == "RevealUnresolved"


async def test_a_batch_handler_may_return_one_result_per_token(
    uow_factory: UnitOfWorkFactory,
) -> None:
    ids = await seed_tokens(uow_factory, 3)
    await make_ready(uow_factory, ids)

    async def per_token(claims: Sequence[Claim]) -> dict[uuid.UUID, str]:
        results = {c.token_uuid: "0x" + f"{c.token_id:064x}" for c in claims}
        results[claims[1].token_uuid] = "not a hash"  # refused alone
        return results

    stats = await asyncio.wait_for(
        _worker(uow_factory, per_token, max_attempts=1).run(exit_when_idle=True), 10
    )
    assert (stats.completed, stats.failed) == (2, 1)


# -- a token whose last transaction may still be mined is never put in a new one -------------


async def _reveal_tokens_with(
    uow_factory: UnitOfWorkFactory, ids: list[uuid.UUID], tx_hash: str
) -> None:
    for token in ids:
        assert await _column(uow_factory, "status::text", token) == "revealed"
        assert await _column(uow_factory, "reveal_tx_hash", token) == tx_hash


def _retry_reveal_stage(uow_factory: UnitOfWorkFactory) -> list[Any]:
    with connect(database_url_of(uow_factory)) as conn:
        return retry_failed(conn, RetryFilter(stage="reveal")).moved


async def test_tokens_out_of_attempts_whose_recorded_reveal_was_mined_complete_with_it(
    uow_factory: UnitOfWorkFactory,
) -> None:
    ids = await seed_tokens(uow_factory, 4)
    await make_ready(uow_factory, ids)
    chain = Chain()
    await _record_then_crash(uow_factory, chain, 4)  # attempt 1: recorded (and, say, sent)
    (tx_hash,) = chain.payloads
    for rescuer in ("rescuer-2", "rescuer-3"):  # two rescuers die while reconciling
        async with uow_factory() as uow:
            claimed = await uow.leases.claim(REVEAL, rescuer, batch=4, lease_seconds=60,
                                             max_attempts=3)  # fmt: skip
        assert len(claimed.claims) == 4
        await expire_leases(uow_factory, *ids)
    chain.mine(tx_hash)  # meanwhile the holder's transaction is mined

    stats = await asyncio.wait_for(
        _worker(uow_factory, Revealer(chain), max_attempts=3).run(exit_when_idle=True), 10
    )
    assert (stats.exhausted, stats.completed) == (0, 4), "failed a token whose reveal was mined"
    await _reveal_tokens_with(uow_factory, ids, tx_hash)
    assert list(chain.payloads) == [tx_hash], "a second transaction was signed"
    assert await _reveal_rows(uow_factory) == [(tx_hash, "confirmed")]


async def test_tokens_out_of_attempts_whose_reveal_can_never_be_mined_fail_then(
    uow_factory: UnitOfWorkFactory,
) -> None:
    ids = await seed_tokens(uow_factory, 2)
    await make_ready(uow_factory, ids)
    chain = Chain()
    await _record_then_crash(uow_factory, chain, 2)
    async with uow_factory() as uow:
        await uow.session.execute(text("UPDATE tokens_s0 SET attempts = 3"))
    chain.mined[0] = "0x" + "e" * 64  # its nonce went to another transaction

    stats = await asyncio.wait_for(
        _worker(uow_factory, Revealer(chain), max_attempts=3).run(exit_when_idle=True), 10
    )
    assert (stats.completed, stats.failed) == (0, 2)
    for token in ids:
        assert await _column(uow_factory, "status::text", token) == "failed"
        error = await _column(uow_factory, "error_data", token)
        assert error["reason"] == "max_attempts_exceeded"
        assert await _column(uow_factory, "checkpoint", token) is None  # settled: nothing to keep
    assert [s for _, s in await _reveal_rows(uow_factory)] == ["failed"]


async def test_a_reveal_unresolved_keeps_its_pointer_and_the_retry_completes_it_once_mined(
    uow_factory: UnitOfWorkFactory,
) -> None:
    ids = await seed_tokens(uow_factory, 3)
    await make_ready(uow_factory, ids)
    chain = Chain()
    chain.hold = True  # mining stalls past max_deferrals
    stats = await asyncio.wait_for(
        _worker(uow_factory, Revealer(chain), max_deferrals=2).run(exit_when_idle=True), 10
    )
    assert stats.completed == 0
    (tx_hash,) = chain.payloads
    for token in ids:
        assert await _column(uow_factory, "status::text", token) == "failed"
        pointer = (await _column(uow_factory, "checkpoint", token))["reveal"]
        assert pointer["tx_hash"] == tx_hash, "the failure forgot a transaction that may be mined"
    chain.mine(tx_hash)  # a minute later

    moved = _retry_reveal_stage(uow_factory)
    assert [m.reveal for m in moved] == [(tx_hash, "pending")] * 3  # and the command says so
    stats = await asyncio.wait_for(
        _worker(uow_factory, Revealer(chain)).run(exit_when_idle=True), 10
    )
    assert stats.completed == 3
    await _reveal_tokens_with(uow_factory, ids, tx_hash)
    assert list(chain.payloads) == [tx_hash], "the retry sent a second transaction"


async def test_an_operator_retry_of_exhausted_tokens_reconciles_before_sending(
    uow_factory: UnitOfWorkFactory,
) -> None:
    ids = await seed_tokens(uow_factory, 2)
    await make_ready(uow_factory, ids)
    chain = Chain()
    await _record_then_crash(uow_factory, chain, 2)
    (tx_hash,) = chain.payloads
    chain.down = True  # every reconcile fails: the attempts run out
    stats = await asyncio.wait_for(
        _worker(uow_factory, Revealer(chain), max_attempts=3).run(exit_when_idle=True), 10
    )
    assert stats.completed == 0
    for token in ids:
        error = await _column(uow_factory, "error_data", token)
        assert error["reason"] == "max_attempts_exceeded"
        assert (await _column(uow_factory, "checkpoint", token))["reveal"]["tx_hash"] == tx_hash
    chain.down = False
    chain.mine(tx_hash)

    assert [m.reveal for m in _retry_reveal_stage(uow_factory)] == [(tx_hash, "pending")] * 2
    stats = await asyncio.wait_for(
        _worker(uow_factory, Revealer(chain)).run(exit_when_idle=True), 10
    )
    assert stats.completed == 2
    await _reveal_tokens_with(uow_factory, ids, tx_hash)
    assert list(chain.payloads) == [tx_hash], "the retry sent a second transaction"


async def test_a_handler_paused_past_its_lease_after_its_checkpoint_makes_no_effect(
    uow_factory: UnitOfWorkFactory,
) -> None:
    # The image handler's window: intent checkpointed, then the process is paused (SIGSTOP, a
    # frozen VM) past its lease before it calls the paid service. Blocking the event loop stops
    # the heartbeats as a pause does; ensure_live must then refuse the effect.
    [token] = await seed_tokens(uow_factory, 1)
    effects: list[int] = []
    left_before: list[float] = []

    async def handler(claim: Claim) -> str:
        await checkpoint(claim, {"step": "intent"})
        left_before.append(lease_left(claim))
        ensure_live(claim)  # a live lease: no objection
        if len(left_before) == 1:
            time.sleep(1.6)  # noqa: ASYNC251 - the pause: nothing in this process runs
            ensure_live(claim)  # raises LeaseLost: the effect below is never made
        effects.append(claim.token_id)
        return "/img.png"

    worker = Worker(IMAGE, handler, connect_options_of(uow_factory), lease_seconds=1.0)
    stats = await asyncio.wait_for(worker.run(exit_when_idle=True), 30)
    assert left_before[0] > 0.25  # a fresh lease, by the worker's own clock
    assert effects == [(await _column(uow_factory, "token_id", token))]  # once, by the next run
    assert stats.completed == 1
    assert await _column(uow_factory, "attempts", token) <= 2
