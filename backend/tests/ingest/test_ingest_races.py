"""Writers of mint logs racing a follower's step, on a real node (anvil) and a real PostgreSQL: a
webhook delivery or a gap pass still in its transaction when a step consumes the same blocks.
The cursor's row orders them (the step locks it exclusively, the others shared), so a step
never misses what they wrote and they never write under a step that missed it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
from sqlalchemy import text

from glisk.ingest import state
from glisk.ingest.alchemy import parse
from glisk.ingest.delivery import DeliveryReport, deliver
from glisk.ingest.follower import Follower
from glisk.ingest.gaps import continues, recover_gaps
from glisk.ingest.node import Node
from glisk.ingest.state import Cursor
from glisk.uow import UnitOfWork, UnitOfWorkFactory
from tests.ingest.test_follower import (
    assert_matches_chain,
    catch_up,
    cursor_of,
    mint,
    replacement_mint,
)
from tests.support.chain import Chain
from tests.support.ingest import alchemy_payload, block_of, follower


class HeldCommit:
    """A unit-of-work factory whose units, their work done, wait for ``release`` before they
    commit: a writer caught between its last statement and its commit."""

    def __init__(self, inner: UnitOfWorkFactory) -> None:
        self.inner = inner
        self.written = asyncio.Event()
        self.release = asyncio.Event()

    def __call__(self) -> contextlib.AbstractAsyncContextManager[UnitOfWork]:
        return self._unit()

    @contextlib.asynccontextmanager
    async def _unit(self) -> AsyncIterator[UnitOfWork]:
        async with self.inner() as uow:
            yield uow
            self.written.set()
            await self.release.wait()


async def stale_delivery_during_a_step(
    chain: Chain, uow_factory: UnitOfWorkFactory, replacements: list[Any]
) -> DeliveryReport:
    """The race: the follower has consumed the chain; a mint lands and a reorg replaces its block
    (by one holding ``replacements``). A late redelivery of the orphaned log reaches the webhook
    while the block is still above the cursor, and the follower's step consumes that block
    before the delivery commits. Returns the delivery's report once both are done."""
    await mint(chain, 2)
    f = follower(chain.w3, chain.address, uow_factory)
    await catch_up(f)
    before = await cursor_of(uow_factory)
    await mint(chain, 3, minter=1, author=1)
    [orphan] = await Node(chain.w3, chain.address).mint_logs(before.block + 1, before.block + 1)
    await chain.rpc("anvil_reorg", [1, replacements])

    held = HeldCommit(uow_factory)
    body = alchemy_payload(chain.address, block_of(orphan), [orphan])
    delivery = asyncio.create_task(deliver(cast(Any, held), parse(body, contract=chain.address)))
    await asyncio.wait_for(held.written.wait(), 10)  # the orphan written, not committed
    step = asyncio.create_task(catch_up(f))
    await asyncio.sleep(1.0)  # the step reaches its write while the delivery is open
    held.release.set()
    report = await asyncio.wait_for(delivery, 10)
    await asyncio.wait_for(step, 20)
    return report


async def test_a_stale_webhook_log_in_flight_is_rolled_back_by_the_step_that_consumes_its_block(
    glisk_chain: Chain, uow_factory: UnitOfWorkFactory
) -> None:
    # The replacement block mints the same token ids: the canonical log must end up recorded,
    # the orphan not.
    replacement = await replacement_mint(glisk_chain, quantity=4, minter=2, author=2)
    report = await stale_delivery_during_a_step(glisk_chain, uow_factory, [[replacement, 0]])

    assert [answer for _, answer, _ in report.answers] == ["new"]  # above the cursor then
    await assert_matches_chain(glisk_chain, uow_factory)
    after = await cursor_of(uow_factory)
    assert after.rolled_back == 1 and after.new >= 2


async def test_a_stale_webhook_log_in_flight_for_a_block_now_empty_is_rolled_back_by_the_step(
    glisk_chain: Chain, uow_factory: UnitOfWorkFactory
) -> None:
    # The same race with no replacement mint: nothing conflicts with the orphan, so only the
    # step's seeing the delivery's write (it waits for it) can undo it.
    await stale_delivery_during_a_step(glisk_chain, uow_factory, [])

    await assert_matches_chain(glisk_chain, uow_factory)
    assert (await cursor_of(uow_factory)).rolled_back == 1


class ReorgDuringRead(Node):
    """A node whose chain is reorged (``depth`` blocks, ``replacements``) right after the first
    range of logs it answers: the gap pass reads one chain and would write into another."""

    def __init__(self, chain: Chain, depth: int, replacements: list[Any]) -> None:
        super().__init__(chain.w3, chain.address)
        self.chain, self.depth, self.replacements = chain, depth, replacements
        self.done = False

    async def mint_logs(self, first: int, last: int) -> list[Any]:
        found = await super().mint_logs(first, last)
        if not self.done:
            self.done = True
            await self.chain.rpc("anvil_reorg", [self.depth, self.replacements])
        return found


@pytest.mark.parametrize("when", ["before the pass", "during its read"])
async def test_a_gap_pass_records_nothing_from_a_chain_the_follower_has_not_consumed(
    glisk_chain: Chain, uow_factory: UnitOfWorkFactory, when: str
) -> None:
    # Tokens 3-5 lost their rows (a gap); their block is then replaced by one minting the same
    # ids for someone else. The pass must neither record the orphan nor, before the follower
    # has rolled the reorg back, the replacement: the follower does, and the next pass finds
    # no gap.
    await mint(glisk_chain, 2)
    gone = await mint(glisk_chain, 3, minter=1, author=1)
    await mint(glisk_chain, 2, minter=2)
    f = follower(glisk_chain.w3, glisk_chain.address, uow_factory)
    await catch_up(f)
    async with uow_factory() as uow:
        await uow.session.execute(text("DELETE FROM tokens_s0 WHERE token_id BETWEEN 3 AND 5"))
        await uow.session.execute(text("DELETE FROM mint_events WHERE token_id = 3"))
        await uow.system_state.delete_state(state.GAPS_CHECKED)  # and no pass has run since
    head = await glisk_chain.w3.eth.block_number
    depth = head - gone.block_number + 1
    replacement = await replacement_mint(glisk_chain, quantity=3, minter=3, author=2)
    if when == "before the pass":
        await glisk_chain.rpc("anvil_reorg", [depth, [[replacement, 0]]])
        node: Node = Node(glisk_chain.w3, glisk_chain.address)
    else:
        node = ReorgDuringRead(glisk_chain, depth, [[replacement, 0]])

    report = await recover_gaps(node, uow_factory)
    assert report.missing == (3 if when == "during its read" else 0)  # "before": not looked at
    assert report.recorded == 0
    assert (await recorded_ids(uow_factory)) == [1, 2, 6, 7]  # neither chain's tokens 3-5

    await catch_up(f)  # the follower rolls the reorg back, then a gap pass finds nothing
    await assert_matches_chain(glisk_chain, uow_factory)


async def recorded_ids(uow_factory: UnitOfWorkFactory) -> list[int]:
    async with uow_factory() as uow:
        rows = await uow.session.execute(text("SELECT token_id FROM tokens_s0 ORDER BY 1"))
        return [r[0] for r in rows]


class StepDuringRead(Node):
    """A node that, right after the first range of logs it answers, lets another follower mint
    and consume a new block: the cursor moves on by an ordinary step while the gap pass reads."""

    def __init__(self, chain: Chain, other: Follower) -> None:
        super().__init__(chain.w3, chain.address)
        self.chain, self.other = chain, other
        self.done = False

    async def mint_logs(self, first: int, last: int) -> list[Any]:
        found = await super().mint_logs(first, last)
        if not self.done:
            self.done = True
            await mint(self.chain, 1, minter=3)
            while await self.other.step() is not None:
                pass
        return found


async def test_a_gap_pass_still_records_when_another_follower_steps_on_during_its_read(
    glisk_chain: Chain, uow_factory: UnitOfWorkFactory
) -> None:
    # Two followers at work: the cursor moves at every block. A pass must not give up because
    # of that, only because a reorg was rolled back; else gaps would never be filled.
    await mint(glisk_chain, 2)
    await mint(glisk_chain, 3, minter=1, author=1)
    await mint(glisk_chain, 2, minter=2)
    f = follower(glisk_chain.w3, glisk_chain.address, uow_factory)
    await catch_up(f)
    before = await cursor_of(uow_factory)
    async with uow_factory() as uow:
        await uow.session.execute(text("DELETE FROM tokens_s0 WHERE token_id BETWEEN 3 AND 5"))
        await uow.session.execute(text("DELETE FROM mint_events WHERE token_id = 3"))
        await uow.system_state.delete_state(state.GAPS_CHECKED)

    other = follower(glisk_chain.w3, glisk_chain.address, uow_factory)
    report = await recover_gaps(StepDuringRead(glisk_chain, other), uow_factory)
    assert (await cursor_of(uow_factory)).block > before.block  # it did move meanwhile
    assert (report.missing, report.recorded, report.still_missing) == (3, 1, [])
    await assert_matches_chain(glisk_chain, uow_factory)


def test_a_pass_goes_on_from_a_cursor_moved_forward_not_from_one_that_met_a_reorg() -> None:
    at = Cursor(10, "0xa", reorgs=2)
    assert continues(at, at)
    assert continues(at, Cursor(14, "0xb", reorgs=2))  # ordinary steps since
    assert not continues(at, Cursor(14, "0xc", reorgs=3))  # a reorg rolled back since
    assert not continues(at, Cursor(8, "0xd", reorgs=2))  # rewound by the operator
    assert not continues(at, None)
    assert not continues(None, at)  # a follower started meanwhile
    assert continues(None, None)
