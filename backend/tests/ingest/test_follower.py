"""The log follower on a real node (anvil) and a real PostgreSQL: ranges refused and split, block
times from the blocks, reorgs rolled back and re-read, a reorg deeper than the window stopping it
with one clear line, two followers sharing one cursor, and gaps backfilled from logs."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount
from rich.console import Console
from sqlalchemy import text

from glisk.chain import client
from glisk.chain import contract as glisk_contract
from glisk.chain.contract import Minted
from glisk.ingest import state
from glisk.ingest.follower import CursorMoved, Follower
from glisk.ingest.gaps import recover_gaps
from glisk.ingest.node import Node, range_refusal
from glisk.ingest.reorg import DeepReorg
from glisk.ingest.run import rewind
from glisk.ingest.state import Cursor
from glisk.ops.status import IngestStatus, collect, render
from glisk.testing import connect
from glisk.uow import UnitOfWorkFactory
from tests.support.chain import Chain
from tests.support.database import Database
from tests.support.ingest import canonical_logs, follower, limited_node, limits

AUTHORS = ["0x" + "ab" * 20, "0x" + "Cd" * 20, "0x" + "12" * 20]


async def mint(chain: Chain, quantity: int, *, minter: int = 0, author: int = 0) -> Minted:
    account: LocalAccount = chain.minters[minter]
    return await glisk_contract.mint(
        chain.w3, account, chain.address, prompt_author=AUTHORS[author], quantity=quantity
    )


async def catch_up(f: Follower) -> None:
    await f.run(asyncio.Event(), once=True)


async def recorded(uow_factory: UnitOfWorkFactory) -> dict[tuple[str, int], tuple[Any, ...]]:
    """(tx_hash, log_index) -> (block_number, block_hash, first id, quantity)."""
    async with uow_factory() as uow:
        rows = await uow.session.execute(
            text(
                "SELECT tx_hash, log_index, block_number, block_hash, token_id, quantity FROM mint_events"
            )
        )
        return {(r[0], r[1]): (r[2], r[3], r[4], r[5]) for r in rows}


async def tokens(uow_factory: UnitOfWorkFactory) -> dict[int, tuple[Any, ...]]:
    """token_id -> (author lower, minter, mint_timestamp, status)."""
    async with uow_factory() as uow:
        rows = await uow.session.execute(
            text(
                "SELECT t.token_id, lower(a.wallet_address), t.minter_address, t.mint_timestamp, "
                "t.status::text FROM tokens_s0 t JOIN authors a ON a.id = t.author_id"
            )
        )
        return {r[0]: (r[1], r[2], r[3], r[4]) for r in rows}


async def cursor_of(uow_factory: UnitOfWorkFactory) -> Cursor:
    async with uow_factory() as uow:
        found = Cursor.from_json(await uow.system_state.get_state(state.CURSOR))
    assert found is not None
    return found


async def assert_matches_chain(chain: Chain, uow_factory: UnitOfWorkFactory) -> None:
    """Every canonical log recorded once, with its block, its author and its tokens; nothing
    else recorded."""
    logs = await canonical_logs(chain.w3, chain.address)
    assert await recorded(uow_factory) == {
        log.key: (log.block_number, log.block_hash, log.start_token_id, log.quantity)
        for log in logs
    }
    assert await tokens(uow_factory) == {
        t: (log.author.lower(), log.minter, log.block_timestamp, "detected")
        for log in logs
        for t in log.token_ids
    }


async def test_mints_are_recorded_once_with_their_block_time_and_a_rerun_adds_nothing(
    glisk_chain: Chain, uow_factory: UnitOfWorkFactory
) -> None:
    # A block time far from the clock: the tokens must carry the block's.
    await glisk_chain.rpc("evm_setNextBlockTimestamp", [2_000_000_000])
    for i in range(6):
        await mint(glisk_chain, 1 + (i * 7) % 50, minter=i % 3, author=i % 3)
    f = follower(glisk_chain.w3, glisk_chain.address, uow_factory)
    await catch_up(f)

    await assert_matches_chain(glisk_chain, uow_factory)
    first = min(await tokens(uow_factory))
    assert (await tokens(uow_factory))[first][2].year == 2033
    cursor = await cursor_of(uow_factory)
    assert cursor.block == await glisk_chain.w3.eth.block_number
    assert (cursor.new, cursor.duplicate, cursor.conflict) == (6, 0, 0)

    again = follower(glisk_chain.w3, glisk_chain.address, uow_factory)
    await catch_up(again)
    assert (await cursor_of(uow_factory)).new == 6


async def test_block_times_come_from_the_blocks_when_the_node_leaves_them_out_of_the_logs(
    glisk_chain: Chain, uow_factory: UnitOfWorkFactory
) -> None:
    for i, stamp in enumerate((1_900_000_000, 1_900_000_777)):
        await glisk_chain.rpc("evm_setNextBlockTimestamp", [stamp])
        await mint(glisk_chain, 2, minter=i)
    async with limited_node(glisk_chain.node.url, glisk_chain.address, limit=10_000) as node:
        limits(node).drop_timestamps = True
        await catch_up(follower(node, glisk_chain.address, uow_factory))
        asked = dict(limits(node).calls)
    await assert_matches_chain(glisk_chain, uow_factory)
    assert asked.get("eth_getBlockByHash") == 2  # once per block that held a mint
    assert {row[2].timestamp() for row in (await tokens(uow_factory)).values()} == {
        1_900_000_000,
        1_900_000_777,
    }


async def test_a_range_the_node_refuses_is_split_and_every_log_still_read(
    glisk_chain: Chain, uow_factory: UnitOfWorkFactory
) -> None:
    for i in range(9):
        await mint(glisk_chain, 2, minter=i % 4)
    async with limited_node(glisk_chain.node.url, glisk_chain.address, limit=3) as node:
        f = follower(node, glisk_chain.address, uow_factory)
        await catch_up(f)
    spans = limits(node).spans
    refused = [span for span in spans if span > 3]
    assert refused and node.splits == len(refused)
    # Each refusal halves the range, and no span once refused is asked for again.
    assert refused == sorted(refused, reverse=True) and len(set(refused)) == len(refused)
    after_last = spans[spans.index(refused[-1]) + 1 :]
    assert after_last and max(after_last) < refused[-1]
    await assert_matches_chain(glisk_chain, uow_factory)


def status_text(url: str) -> tuple[IngestStatus | None, str]:
    """What glisk status collects about the follower, and how it prints it."""
    with connect(url) as conn:
        status = collect(conn)  # type: ignore[arg-type]
    console = Console(record=True, width=200)
    console.print(render(status))
    return status.ingest, console.export_text()


async def test_a_reorg_inside_the_window_rolls_back_the_orphaned_mint_and_reads_the_new_one(
    glisk_chain: Chain, uow_factory: UnitOfWorkFactory, postgres_container: Database
) -> None:
    await mint(glisk_chain, 2)
    orphan = await mint(glisk_chain, 3, minter=1, author=1)
    f = follower(glisk_chain.w3, glisk_chain.address, uow_factory)
    await catch_up(f)
    before = await cursor_of(uow_factory)
    assert (orphan.tx_hash, orphan.log_index) in await recorded(uow_factory)

    # The last block is replaced by one holding another mint of the same token ids.
    replacement = await replacement_mint(glisk_chain, quantity=4, minter=2, author=2)
    await glisk_chain.rpc("anvil_reorg", [1, [[replacement, 0]]])
    await catch_up(f)

    await assert_matches_chain(glisk_chain, uow_factory)
    after = await cursor_of(uow_factory)
    assert after.block >= before.block
    assert (after.reorgs, after.rolled_back) == (1, 1)
    async with uow_factory() as uow:
        last = await uow.system_state.get_state(state.LAST_REORG)
    assert (last["block"], last["depth"], last["rolled_back"]) == (before.block, 1, 1)
    assert last["tokens_dropped"] == 3 and last["tokens_flagged"] == 0
    assert f.stats.reorgs == 1
    ingest, shown = status_text(postgres_container.url)
    assert ingest is not None and (ingest.cursor, ingest.lag) == (after.block, 0)
    assert ingest.head == await glisk_chain.w3.eth.block_number
    assert ingest.last_reorg is not None and ingest.last_reorg["depth"] == 1
    assert "chain ingest" in shown and f"block {before.block}, depth 1" in shown


async def replacement_mint(
    chain: Chain, *, quantity: int, minter: int, author: int
) -> dict[str, Any]:
    """A mint as anvil_reorg takes it: an unsigned transaction request from a dev account."""
    data = chain.contract.encode_abi(
        "mint", args=[chain.w3.to_checksum_address(AUTHORS[author]), quantity]
    )
    price = int(await chain.contract.functions.mintPrice().call())
    return {
        "from": chain.minters[minter].address,
        "to": chain.address,
        "data": data,
        "value": hex(price * quantity),
        "gas": hex(3_000_000),
    }


async def test_a_token_already_in_work_when_its_mint_is_orphaned_is_flagged_not_dropped(
    glisk_chain: Chain, uow_factory: UnitOfWorkFactory
) -> None:
    orphan = await mint(glisk_chain, 2, author=1)
    f = follower(glisk_chain.w3, glisk_chain.address, uow_factory)
    await catch_up(f)
    async with uow_factory() as uow:
        token = await uow.tokens.get_by_token_id(orphan.start_token_id)
        assert token is not None
        token.mark_generating()

    replacement = await replacement_mint(glisk_chain, quantity=1, minter=1, author=2)
    await glisk_chain.rpc("anvil_reorg", [1, [[replacement, 0]]])
    await catch_up(f)

    left = await tokens(uow_factory)
    # Token 1 was in work: kept, failed, flagged; token 2 (still detected) is gone. The new
    # chain's mint of token 1 cannot be recorded over it: a conflict for the operator.
    assert sorted(left) == [1] and left[1][3] == "failed"
    async with uow_factory() as uow:
        flagged = await uow.tokens.get_by_token_id(1)
        assert flagged is not None and flagged.error_data is not None
        assert flagged.error_data["reason"] == "mint_orphaned"
        assert flagged.error_data["log"]["tx_hash"] == orphan.tx_hash
        assert flagged.error_data["status"] == "generating"
    cursor = await cursor_of(uow_factory)
    assert (cursor.rolled_back, cursor.flagged, cursor.conflict) == (1, 1, 1)
    assert await recorded(uow_factory) == {}


@pytest.mark.slow
async def test_a_reorg_deeper_than_the_window_stops_the_follower_with_one_clear_line(
    glisk_chain: Chain, uow_factory: UnitOfWorkFactory, postgres_container: Database
) -> None:
    for i in range(4):
        await mint(glisk_chain, 1, minter=i)
        await catch_up(follower(glisk_chain.w3, glisk_chain.address, uow_factory, reorg_window=1))
    before = await recorded(uow_factory)
    await glisk_chain.rpc("anvil_reorg", [3, []])  # replaces every block the window kept

    f = follower(glisk_chain.w3, glisk_chain.address, uow_factory, reorg_window=1)
    with pytest.raises(DeepReorg) as stopped:
        await f.step()
    line = str(stopped.value)
    assert "\n" not in line and line.startswith("reorg deeper than the window: block ")
    assert "INGEST_REORG_WINDOW=1" in line and "--rewind-to" in line
    assert stopped.value.exit_code == 2
    assert await recorded(uow_factory) == before  # nothing written
    async with uow_factory() as uow:
        halted = await uow.system_state.get_state(state.HALTED)
    assert halted["message"] == line
    ingest, shown = status_text(postgres_container.url)
    assert ingest is not None and ingest.halted == line
    assert "STOPPED: reorg deeper than the window" in shown

    # The command says it in one line on stderr and exits 2, as any follower will until rewound;
    # even at DEBUG it never prints the node's URL (a provider's key rides in it).
    key = "sk-" + os.urandom(8).hex()
    for level in ("ERROR", "DEBUG"):
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "glisk.cli",
            "ingest",
            "--once",
            env={
                **os.environ,
                "GLISK_ENV_FILE": os.devnull,
                "DATABASE_URL": postgres_container.url,
                "CHAIN_RPC_URL": f"{glisk_chain.node.url}/?apikey={key}",
                "GLISK_CONTRACT_ADDRESS": glisk_chain.address,
                "LOG_LEVEL": level,
            },
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 2, err.decode()
        if level == "ERROR":
            assert err.decode().strip().splitlines() == [f"error: {line}"]
        assert key not in err.decode()
        assert err.decode().strip().splitlines()[-1] == f"error: {line}"

    # The operator rewinds to a block both chains share: the next steps roll back what the
    # orphaned blocks recorded and read the new chain.
    await rewind(f.node, uow_factory, 1)
    async with uow_factory() as uow:
        assert await uow.system_state.get_state(state.HALTED) is None
    await catch_up(follower(glisk_chain.w3, glisk_chain.address, uow_factory, reorg_window=1))
    await assert_matches_chain(glisk_chain, uow_factory)
    assert (await cursor_of(uow_factory)).rolled_back == 3  # the three mints of blocks 3 to 5


async def test_two_followers_racing_share_one_cursor_that_never_moves_backwards(
    glisk_chain: Chain, uow_factory: UnitOfWorkFactory
) -> None:
    first = follower(glisk_chain.w3, glisk_chain.address, uow_factory, max_range=2)
    second = follower(glisk_chain.w3, glisk_chain.address, uow_factory, max_range=3)
    seen: list[int] = []
    lost = 0

    async def drive(f: Follower) -> None:
        nonlocal lost
        for _ in range(40):
            try:
                report = await f.step()
            except CursorMoved:
                lost += 1
                continue
            if report is not None:
                seen.append(report.cursor)

    for i in range(8):
        await mint(glisk_chain, 1 + i % 3, minter=i % 4, author=i % 3)
    await asyncio.gather(drive(first), drive(second))
    cursors = list(seen)
    await assert_matches_chain(glisk_chain, uow_factory)
    cursor = await cursor_of(uow_factory)
    assert cursor.new == 8 and cursor.block == await glisk_chain.w3.eth.block_number
    assert cursors == sorted(cursors), "a committed step moved the cursor backwards"
    print(f"two followers: {len(cursors)} steps committed, {lost} lost to the other")


async def test_a_gap_is_backfilled_from_the_logs_and_an_id_without_a_log_is_never_invented(
    glisk_chain: Chain, uow_factory: UnitOfWorkFactory
) -> None:
    for i in range(3):
        await mint(glisk_chain, 3, minter=i, author=i)
    await catch_up(follower(glisk_chain.w3, glisk_chain.address, uow_factory))
    async with uow_factory() as uow:  # the middle mint was never recorded (tokens 4-6, its log)
        await uow.session.execute(text("DELETE FROM tokens_s0 WHERE token_id BETWEEN 4 AND 6"))
        await uow.session.execute(text("DELETE FROM mint_events WHERE token_id = 4"))
        await uow.system_state.delete_state(state.GAPS_CHECKED)  # and no pass has run since

    # A node that answers eth_getLogs with nothing: the gap stays, nothing is invented.
    async with limited_node(glisk_chain.node.url, glisk_chain.address, limit=10_000) as silent:
        limits(silent).drop_logs = True
        report = await recover_gaps(silent, uow_factory)
    assert (report.up_to, report.missing, report.recorded) == (9, 3, 0)
    assert report.still_missing == [4, 5, 6]
    assert sorted(await tokens(uow_factory)) == [1, 2, 3, 7, 8, 9]

    report = await recover_gaps(Node(glisk_chain.w3, glisk_chain.address), uow_factory)
    assert (report.missing, report.recorded, report.still_missing) == (3, 1, [])
    await assert_matches_chain(glisk_chain, uow_factory)
    async with uow_factory() as uow:
        assert await uow.system_state.get_state(state.GAPS_CHECKED) == 9
    calls = client.rpc_calls(glisk_chain.w3)
    assert calls["eth_call"] >= 1


async def test_a_gap_pass_at_a_block_without_the_contract_checks_nothing_and_raises_nothing(
    glisk_chain: Chain, uow_factory: UnitOfWorkFactory
) -> None:
    # Block 0 precedes the deployment: eth_call answers "0x" there (anvil answers the same for a
    # moment while it switches chains). The pass must not take that for a number.
    node = Node(glisk_chain.w3, glisk_chain.address)
    assert await node.next_token_id(0) is None
    genesis = await node.block(0)
    assert genesis is not None
    async with uow_factory() as uow:
        await uow.system_state.set_state(state.CURSOR, Cursor(0, genesis.hash).to_json())
    report = await recover_gaps(node, uow_factory)
    assert (report.block, report.up_to, report.missing, report.still_missing) == (0, 0, 0, [])


@pytest.mark.parametrize(
    ("error", "refused"),
    [
        ({"code": -32602, "message": "Log response size exceeded. ... 2K block range"}, True),
        ({"code": -32005, "message": "query returned more than 10000 results"}, True),
        ({"code": -32000, "message": "block range is too wide"}, True),
        ({"code": -32005, "message": "project ID request rate exceeded"}, False),
        ({"code": 429, "message": "Too Many Requests"}, False),
        ({"code": -32000, "message": "header not found"}, False),
        ("not an object", False),
    ],
)
def test_what_counts_as_a_range_refusal(error: Any, refused: bool) -> None:
    assert range_refusal(error) is refused
