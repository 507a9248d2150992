"""A reveal worker process SIGKILLed with its nonce in flight: the next keeper continues from the
database's allocator, reconciles the transaction in flight, and neither leaves a gap nor sends
the batch a second time."""

from __future__ import annotations

import asyncio
import multiprocessing
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from glisk.chain.keeper import Keeper
from glisk.uow import UnitOfWorkFactory
from glisk.workers import Worker
from glisk.workers.run import connect_options_of, database_url_of
from tests.support.chain import Chain, key_file
from tests.support.factories import expire_leases, seed_in_bulk
from tests.support.processes import stop_all
from tests.support.reveal_proc import RevealProcess, run_reveal_worker
from tests.support.waiting import eventually

# End to end (processes, tens of seconds each): .ci/run runs them, the default run leaves them out.
pytestmark = pytest.mark.slow

CONTEXT = multiprocessing.get_context("forkserver")
CONTEXT.set_forkserver_preload(["tests.support.reveal_proc"])


async def _rows(uow_factory: UnitOfWorkFactory, sql: str) -> list[Any]:
    async with uow_factory() as uow:
        return list((await uow.session.execute(text(sql))).all())


async def test_a_restart_with_a_nonce_in_flight_continues_without_a_gap_or_a_second_send(
    uow_factory: UnitOfWorkFactory, glisk_chain: Chain, tmp_path: Path
) -> None:
    await glisk_chain.mint_many(20)
    await seed_in_bulk(uow_factory, 20, first_token_id=0, status="'ready'",
                       image_path="'/img.png'", metadata_cid="'bafkreicid' || g")  # fmt: skip
    await glisk_chain.rpc("evm_setAutomine", [False])  # the first batch stays in flight
    spec = RevealProcess(
        database_url=database_url_of(uow_factory),
        rpc_url=glisk_chain.node.url,
        chain_id=glisk_chain.node.chain_id,
        contract=glisk_chain.address,
        key_file=str(key_file(tmp_path, glisk_chain.keeper)),
        log_path=str(tmp_path / "first.log"),
        keeper={"poll": 0.05, "stuck_after": 60.0},
        worker={"lease_seconds": 30.0},
    )
    first = CONTEXT.Process(target=run_reveal_worker, args=(spec,))
    first.start()

    async def sent() -> bool:
        return bool(await _rows(uow_factory, "SELECT 1 FROM reveal_attempts WHERE broadcasts > 0"))

    try:
        await eventually(sent, 30, "the first batch broadcast")
    finally:
        first.kill()
        stop_all([first])
    ((nonce, status),) = await _rows(uow_factory, "SELECT nonce, status FROM reveal_transactions")
    assert (nonce, status) == (0, "pending")

    claimed = await _rows(uow_factory, "SELECT id FROM tokens_s0 WHERE claim_id IS NOT NULL")
    await expire_leases(uow_factory, *(row[0] for row in claimed))  # its lease ran out
    keeper = Keeper(glisk_chain.keeper_config(poll=0.05, stuck_after=60.0))
    worker = Worker("reveal", keeper, connect_options_of(uow_factory), batch=10,
                    poll_interval=0.05, backoff_base=0.05, max_deferrals=1000)  # fmt: skip
    run = asyncio.create_task(worker.run(exit_when_idle=True))

    async def sent_again() -> bool:
        return bool(await _rows(uow_factory, "SELECT 1 FROM reveal_attempts WHERE broadcasts > 1"))

    await eventually(sent_again, 30, "the transaction in flight rebroadcast by the next keeper")
    await glisk_chain.rpc("evm_setAutomine", [True])  # mines what the pool holds, then each new one
    stats = await asyncio.wait_for(run, 60)
    assert stats.completed == 20

    reveals = await _rows(
        uow_factory,
        "SELECT r.nonce, r.status, count(a.id) FROM reveal_transactions AS r "
        "JOIN reveal_attempts AS a ON a.reveal_id = r.id GROUP BY 1, 2 ORDER BY 1",
    )
    assert reveals == [(0, "confirmed", 1), (1, "confirmed", 1)], "a batch went out twice"
    on_chain = await glisk_chain.reveals_on_chain()
    assert sorted(on_chain) == list(range(1, 21))
    assert all(len(hashes) == 1 for hashes in on_chain.values())
    ((allocator,),) = await _rows(uow_factory, "SELECT next_nonce FROM keeper_nonces")
    assert allocator == await glisk_chain.confirmed_nonce() == 2, "a nonce gap"
