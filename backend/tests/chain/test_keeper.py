"""The reveal keeper against a real node (anvil) and a real PostgreSQL, workers in this process:
one send per batch, nonces from the database, stuck and dropped transactions, reorgs, the fee
cap, a restart with a nonce in flight, and the contract's own AlreadyRevealed."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from eth_account.typed_transactions.typed_transaction import TypedTransaction
from eth_utils.crypto import keccak
from hexbytes import HexBytes
from sqlalchemy import text
from web3.exceptions import TransactionNotFound

from glisk.chain import contract as glisk_contract
from glisk.chain.keeper import Keeper
from glisk.pipeline import STAGES, StageName
from glisk.uow import UnitOfWorkFactory
from glisk.workers import Worker
from glisk.workers.run import connect_options_of
from tests.support.chain import GWEI, Chain
from tests.support.factories import seed_in_bulk
from tests.support.waiting import eventually

REVEAL = STAGES[StageName.REVEAL]


async def _ready(uow_factory: UnitOfWorkFactory, chain: Chain, count: int) -> None:
    """``count`` tokens minted on chain (ids 1..count) and ready in the database."""
    await chain.mint_many(count)
    await seed_in_bulk(
        uow_factory,
        count,
        first_token_id=0,
        status="'ready'",
        image_path="'/img.png'",
        metadata_cid="'bafkreicid' || g",
    )


def _worker(uow_factory: UnitOfWorkFactory, keeper: Keeper, **options: Any) -> Worker:
    settings: dict[str, Any] = {
        "batch": 10,
        "poll_interval": 0.02,
        "backoff_base": 0.01,
        "backoff_cap": 0.05,
        "lease_seconds": 10.0,
        "max_deferrals": 1000,
    }
    settings.update(options)
    return Worker(REVEAL, keeper, connect_options_of(uow_factory), **settings)


async def _rows(uow_factory: UnitOfWorkFactory, sql: str, **params: Any) -> Sequence[Any]:
    async with uow_factory() as uow:
        return (await uow.session.execute(text(sql), params)).all()


async def _stored_hashes(uow_factory: UnitOfWorkFactory) -> dict[int, str | None]:
    rows = await _rows(uow_factory, "SELECT token_id, reveal_tx_hash FROM tokens_s0")
    return {int(token_id): tx_hash for token_id, tx_hash in rows}


async def _allocator(uow_factory: UnitOfWorkFactory, chain: Chain) -> int:
    ((nonce,),) = await _rows(
        uow_factory,
        "SELECT next_nonce FROM keeper_nonces WHERE address = :a",
        a=chain.keeper.address.lower(),
    )
    return int(nonce)


async def _revealed_exactly_once(uow_factory: UnitOfWorkFactory, chain: Chain, count: int) -> None:
    """From the chain's logs: every token revealed by one transaction, the one the database
    names; the keeper's confirmed nonce is its allocator's (no gap); nothing pending or claimed."""
    on_chain = await chain.reveals_on_chain()
    assert sorted(on_chain) == list(range(1, count + 1))
    assert all(len(hashes) == 1 for hashes in on_chain.values()), "revealed twice"
    assert await _stored_hashes(uow_factory) == {t: h[0] for t, h in on_chain.items()}
    assert await chain.confirmed_nonce() == await _allocator(uow_factory, chain)
    assert (
        await _rows(
            uow_factory,
            "SELECT 1 FROM reveal_transactions WHERE status = 'pending' "
            "UNION ALL SELECT 1 FROM tokens_s0 WHERE claim_id IS NOT NULL",
        )
        == []
    )
    contract = chain.contract
    for token_id in (1, count):
        assert await contract.functions.tokenURI(token_id).call() == f"ipfs://bafkreicid{token_id}"


async def test_each_batch_goes_out_once_recorded_with_its_signed_bytes_before_the_send(
    uow_factory: UnitOfWorkFactory, glisk_chain: Chain
) -> None:
    await _ready(uow_factory, glisk_chain, 30)
    keeper = Keeper(glisk_chain.keeper_config())
    stats = await asyncio.wait_for(_worker(uow_factory, keeper).run(exit_when_idle=True), 60)
    assert stats.completed == 30
    await _revealed_exactly_once(uow_factory, glisk_chain, 30)
    reveals = await _rows(
        uow_factory,
        "SELECT r.nonce, r.status, r.tx_hash, r.block_hash, a.raw, a.broadcasts, "
        "a.max_fee_per_gas, r.idempotency_key FROM reveal_transactions AS r "
        "JOIN reveal_attempts AS a ON a.reveal_id = r.id ORDER BY r.nonce",
    )
    assert [row[0] for row in reveals] == [0, 1, 2]  # one nonce each, from the database
    assert keeper.sends == 3, "more than one send per batch without a fault"
    for nonce, status, tx_hash, block_hash, raw, broadcasts, max_fee, key in reveals:
        assert status == "confirmed" and broadcasts == 1 and len(key) == 66
        assert "0x" + keccak(bytes(raw)).hex() == tx_hash  # the stored bytes are what was mined
        sent = TypedTransaction.from_bytes(HexBytes(raw)).as_dict()
        assert sent["nonce"] == nonce and sent["chainId"] == glisk_chain.node.chain_id
        receipt = await glisk_chain.w3.eth.get_transaction_receipt(tx_hash)
        assert receipt["blockHash"].to_0x_hex() == block_hash
        assert 0 < int(max_fee) <= 100 * GWEI


async def test_two_workers_sharing_one_key_never_sign_the_same_nonce(
    uow_factory: UnitOfWorkFactory, glisk_chain: Chain
) -> None:
    await _ready(uow_factory, glisk_chain, 80)
    keepers = [Keeper(glisk_chain.keeper_config()) for _ in range(2)]
    workers = [_worker(uow_factory, k, concurrency=2) for k in keepers]
    await asyncio.wait_for(asyncio.gather(*(w.run(exit_when_idle=True) for w in workers)), 60)
    await _revealed_exactly_once(uow_factory, glisk_chain, 80)
    nonces = await _rows(uow_factory, "SELECT nonce FROM reveal_transactions ORDER BY nonce")
    assert [n for (n,) in nonces] == list(range(8))
    assert sum(k.sends for k in keepers) == 8, "a batch was sent twice (two workers, one nonce)"


async def test_a_stuck_transaction_is_replaced_at_its_nonce_and_only_one_of_the_two_mines(
    uow_factory: UnitOfWorkFactory, glisk_chain: Chain
) -> None:
    await _ready(uow_factory, glisk_chain, 5)
    await glisk_chain.rpc("evm_setAutomine", [False])  # nothing is mined until the test says so
    keeper = Keeper(glisk_chain.keeper_config(stuck_after=0.5))
    run = asyncio.create_task(_worker(uow_factory, keeper).run(exit_when_idle=True))

    async def attempts() -> list[Any]:
        return list(
            await _rows(
                uow_factory,
                "SELECT tx_hash, max_fee_per_gas, max_priority_fee_per_gas FROM reveal_attempts "
                "ORDER BY created_at",
            )
        )

    async def sent() -> list[Any]:
        return list(await _rows(uow_factory, "SELECT 1 FROM reveal_attempts WHERE broadcasts > 0"))

    await eventually(lambda: _count(sent(), 2), 20, "a replacement recorded and sent")
    await glisk_chain.mine()
    await asyncio.wait_for(run, 30)
    (first, first_fee, first_tip), (_, second_fee, second_tip), *_ = await attempts()
    assert second_fee * 8 >= first_fee * 9 and second_tip * 8 >= first_tip * 9  # +12.5%
    mined = [h for h, *_ in await attempts() if await _receipt(glisk_chain, h)]
    assert len(mined) == 1, "two transactions of one nonce were mined"
    await _revealed_exactly_once(uow_factory, glisk_chain, 5)
    ((row_hash, nonce),) = await _rows(
        uow_factory, "SELECT tx_hash, nonce FROM reveal_transactions"
    )
    assert row_hash == mined[0] != first and nonce == 0


async def test_a_dropped_transaction_is_broadcast_again_with_the_same_bytes(
    uow_factory: UnitOfWorkFactory, glisk_chain: Chain
) -> None:
    await _ready(uow_factory, glisk_chain, 5)
    await glisk_chain.rpc("evm_setAutomine", [False])
    keeper = Keeper(glisk_chain.keeper_config(stuck_after=30.0, poll=0.05))
    run = asyncio.create_task(_worker(uow_factory, keeper).run(exit_when_idle=True))

    async def sent() -> list[Any]:
        return list(await _rows(uow_factory, "SELECT tx_hash, broadcasts FROM reveal_attempts"))

    async def broadcast() -> list[Any]:
        return list(await _rows(uow_factory, "SELECT 1 FROM reveal_attempts WHERE broadcasts > 0"))

    await eventually(lambda: _count(broadcast(), 1), 20, "the reveal sent")
    ((tx_hash, _),) = await sent()
    assert await glisk_chain.rpc("anvil_dropTransaction", [tx_hash]) is not None
    assert (await glisk_chain.rpc("txpool_status"))["pending"] == "0x0"
    await glisk_chain.rpc("evm_setAutomine", [True])  # mined as soon as it comes back
    await asyncio.wait_for(run, 60)
    ((same_hash, broadcasts),) = await sent()
    assert same_hash == tx_hash and broadcasts >= 2  # rebroadcast, never re-signed
    await _revealed_exactly_once(uow_factory, glisk_chain, 5)


async def test_a_reorged_out_reveal_is_mined_again_and_the_row_follows_the_canonical_block(
    uow_factory: UnitOfWorkFactory, glisk_chain: Chain
) -> None:
    await _ready(uow_factory, glisk_chain, 5)
    await glisk_chain.mine(3)  # the reorg below takes the reveal's block, not the mint's
    keeper = Keeper(glisk_chain.keeper_config(confirmations=4, stuck_after=0.6))
    run = asyncio.create_task(_worker(uow_factory, keeper).run(exit_when_idle=True))
    (tx_hash,) = await _first_attempt(uow_factory)
    receipt = await _wait_receipt(glisk_chain, tx_hash)
    first_block = receipt["blockHash"].to_0x_hex()
    await glisk_chain.rpc("anvil_reorg", [2, []])  # its block and the one before: gone
    assert await _receipt(glisk_chain, tx_hash) is None
    miner = asyncio.create_task(_keep_mining(glisk_chain))
    try:
        await asyncio.wait_for(run, 60)
    finally:
        miner.cancel()
    again = await _receipt(glisk_chain, tx_hash)
    assert again is not None and again["blockHash"].to_0x_hex() != first_block
    ((row_hash, block_hash, block_number),) = await _rows(
        uow_factory, "SELECT tx_hash, block_hash, block_number FROM reveal_transactions"
    )
    assert (row_hash, block_hash, block_number) == (
        tx_hash,
        again["blockHash"].to_0x_hex(),
        again["blockNumber"],
    )
    await _revealed_exactly_once(uow_factory, glisk_chain, 5)


async def test_fees_above_the_cap_wait_and_the_batch_goes_out_once_they_come_down(
    uow_factory: UnitOfWorkFactory, glisk_chain: Chain
) -> None:
    await _ready(uow_factory, glisk_chain, 5)
    await glisk_chain.rpc("anvil_setNextBlockBaseFeePerGas", [hex(500 * GWEI)])
    await glisk_chain.mine()
    keeper = Keeper(glisk_chain.keeper_config(max_fee_per_gas=100 * GWEI, stuck_after=0.3))
    run = asyncio.create_task(_worker(uow_factory, keeper).run(exit_when_idle=True))

    async def deferred() -> bool:
        rows = await _rows(
            uow_factory, "SELECT error_data -> 'last_error' ->> 'type' FROM tokens_s0"
        )
        return all(r[0] == "FeeAboveCap" for r in rows)

    await eventually(deferred, 20, "the batch deferred: fees above the cap")
    assert await _rows(uow_factory, "SELECT 1 FROM reveal_attempts") == [], "sent above the cap"
    await glisk_chain.rpc("anvil_setNextBlockBaseFeePerGas", [hex(GWEI)])
    await glisk_chain.mine()
    await asyncio.wait_for(run, 30)
    await _revealed_exactly_once(uow_factory, glisk_chain, 5)
    ((max_fee,),) = await _rows(uow_factory, "SELECT max_fee_per_gas FROM reveal_attempts")
    assert max_fee <= 100 * GWEI


async def test_a_token_already_revealed_completes_with_the_transaction_that_revealed_it(
    uow_factory: UnitOfWorkFactory, glisk_chain: Chain
) -> None:
    await _ready(uow_factory, glisk_chain, 6)
    outside = glisk_chain.contract.encode_abi("revealTokens", args=[[4], ["ipfs://bafkreicid4"]])
    receipt = await glisk_contract.send_and_wait(
        glisk_chain.w3, glisk_chain.keeper, {"to": glisk_chain.address, "data": outside}
    )  # another keeper (or a lost pointer) revealed token 4 already
    keeper = Keeper(glisk_chain.keeper_config())
    stats = await asyncio.wait_for(_worker(uow_factory, keeper).run(exit_when_idle=True), 30)
    assert stats.completed == 6
    stored = await _stored_hashes(uow_factory)
    assert stored[4] == receipt["transactionHash"].to_0x_hex()
    assert len({stored[t] for t in (1, 2, 3, 5, 6)}) == 1 != stored[4]
    assert keeper.sends == 1, "the batch went out with the revealed token (a revert) or twice"
    await _revealed_exactly_once(uow_factory, glisk_chain, 6)


async def test_a_token_whose_pointer_was_lost_is_not_sent_again_while_its_reveal_is_pending(
    uow_factory: UnitOfWorkFactory, glisk_chain: Chain
) -> None:
    await _ready(uow_factory, glisk_chain, 3)
    await glisk_chain.rpc("evm_setAutomine", [False])
    keeper = Keeper(glisk_chain.keeper_config(wait=0.3))
    first = _worker(uow_factory, keeper, max_deferrals=0, max_attempts=1)
    await asyncio.wait_for(first.run(exit_when_idle=True), 30)  # sent, not mined: given up
    (tx_hash,) = await _first_attempt(uow_factory)
    # The defect class part 0 fixes, forced: the tokens forget their transaction.
    await _rows(
        uow_factory,
        "UPDATE tokens_s0 SET status = 'ready', checkpoint = NULL, attempts = 0, deferrals = 0, "
        "error_data = NULL RETURNING 1",
    )
    await glisk_chain.rpc("evm_setIntervalMining", [1])
    second = Keeper(glisk_chain.keeper_config())
    await asyncio.wait_for(_worker(uow_factory, second).run(exit_when_idle=True), 30)
    assert second.sends <= 1 and await _rows(
        uow_factory, "SELECT count(*) FROM reveal_attempts"
    ) == [(1,)], "a second transaction was recorded for tokens in flight"
    assert set((await _stored_hashes(uow_factory)).values()) == {tx_hash}
    await _revealed_exactly_once(uow_factory, glisk_chain, 3)


async def test_the_allocator_catches_up_with_the_chain_and_fills_a_gap(
    uow_factory: UnitOfWorkFactory, glisk_chain: Chain
) -> None:
    # The key was used elsewhere twice (the chain is ahead), and the allocator stands past
    # nonces no reveal holds (a gap: nothing after it could ever be mined).
    for _ in range(2):
        await glisk_contract.send_and_wait(
            glisk_chain.w3, glisk_chain.keeper, {"to": glisk_chain.keeper.address}
        )
    await _rows(
        uow_factory,
        "INSERT INTO keeper_nonces VALUES (:chain, :address, 4, now()) RETURNING 1",
        chain=glisk_chain.node.chain_id,
        address=glisk_chain.keeper.address.lower(),
    )
    await _ready(uow_factory, glisk_chain, 5)
    keeper = Keeper(glisk_chain.keeper_config())
    await asyncio.wait_for(_worker(uow_factory, keeper).run(exit_when_idle=True), 30)
    fillers = await _rows(
        uow_factory, "SELECT nonce FROM reveal_attempts WHERE kind = 'filler' ORDER BY nonce"
    )
    assert [n for (n,) in fillers] == [2, 3]
    (reveal_nonce,) = await _rows(uow_factory, "SELECT nonce FROM reveal_transactions")
    assert reveal_nonce == (4,)
    await _revealed_exactly_once(uow_factory, glisk_chain, 5)
    assert await glisk_chain.confirmed_nonce() == 5


# -- helpers --------------------------------------------------------------------------------


async def _count(rows: Any, at_least: int) -> bool:
    return len(await rows) >= at_least


async def _receipt(chain: Chain, tx_hash: str) -> Any:
    try:
        return await chain.w3.eth.get_transaction_receipt(HexBytes(tx_hash))
    except TransactionNotFound:
        return None


async def _wait_receipt(chain: Chain, tx_hash: str) -> Any:
    await eventually(lambda: _is_mined(chain, tx_hash), 20, f"{tx_hash} mined")
    return await _receipt(chain, tx_hash)


async def _is_mined(chain: Chain, tx_hash: str) -> bool:
    return await _receipt(chain, tx_hash) is not None


async def _first_attempt(uow_factory: UnitOfWorkFactory) -> tuple[str]:
    async def recorded() -> bool:
        return bool(await _rows(uow_factory, "SELECT 1 FROM reveal_attempts"))

    await eventually(recorded, 20, "a reveal recorded")
    (row,) = await _rows(uow_factory, "SELECT tx_hash FROM reveal_attempts")
    return (row[0],)


async def _keep_mining(chain: Chain) -> None:
    while True:
        await chain.mine()
        await asyncio.sleep(0.05)


async def test_the_transaction_that_took_a_nonce_is_found_on_chain_not_guessed_from_receipts(
    glisk_chain: Chain,
) -> None:
    # A node may count a transaction before it serves its receipt: "spent by another" is decided
    # by finding the transaction that took the nonce, never by a receipt that is missing.
    for _ in range(3):
        await glisk_contract.send_and_wait(
            glisk_chain.w3, glisk_chain.keeper, {"to": glisk_chain.keeper.address}
        )
    await glisk_chain.mine(5)
    keeper = Keeper(glisk_chain.keeper_config())
    for nonce in range(3):
        found = await keeper._nonce_taker(nonce)
        assert found is not None
        tx_hash, block_number, block_hash = found
        tx = await glisk_chain.w3.eth.get_transaction(HexBytes(tx_hash))
        assert (tx.get("nonce"), tx.get("blockNumber"), tx.get("blockHash")) == (
            nonce,
            block_number,
            block_hash,
        )
    assert await keeper._nonce_taker(3) is None
