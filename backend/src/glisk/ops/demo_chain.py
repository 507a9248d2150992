"""``glisk demo``'s chain: anvil, the GLISK contract deployed, tokens minted by real ``mint``
transactions and recorded as the mint follower would, the keeper's settings for the reveal
workers, and the facts the verification reads back from the chain.

``chain_facts`` gathers the chain's side of the verification (glisk.ops.demo_verdict decides).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg

from glisk.chain.anvil import Anvil

if TYPE_CHECKING:
    from glisk.ops.demo_verdict import ChainFacts

# anvil's dev accounts: 0 deploys and administers, 1 is the keeper, 2 and up mint.
ADMIN, KEEPER, FIRST_MINTER = 0, 1, 2
AUTHOR = "0x" + "d" * 40
PROMPT = "a lighthouse drawn by a demo"
MINT_PRICE = 10**15  # 0.001 ETH a token


@dataclass(frozen=True)
class DemoChain:
    node: Anvil
    contract: str
    keeper_address: str
    key_file: Path
    mint_transactions: int

    def worker_env(self) -> dict[str, str]:
        """The reveal workers' keeper settings: the key in a 0600 file, never in argv."""
        return {
            "CHAIN_RPC_URL": self.node.url,
            "CHAIN_ID": str(self.node.chain_id),
            "GLISK_CONTRACT_ADDRESS": self.contract,
            "KEEPER_PRIVATE_KEY_FILE": str(self.key_file),
            "REVEAL_CONFIRMATIONS": "1",
            "REVEAL_POLL_SECONDS": "0.05",
            "REVEAL_STUCK_SECONDS": "5",
        }


async def set_up(node: Anvil, database_url: str, tokens: int, work: Path) -> DemoChain:
    """Deploy, mint ``tokens`` in real ``mint`` transactions (50 at most each, spread over the
    minter accounts) and record each BatchMinted log with ``uow.mint_events.record_mint``."""
    from eth_account import Account

    from glisk.chain import client
    from glisk.chain import contract as glisk_contract
    from glisk.core.database import engine_of, setup_db_session
    from glisk.models import MintLog
    from glisk.uow import create_uow_factory

    w3 = client.connect(node.url)
    keys = node.private_keys
    admin, keeper = Account.from_key(keys[ADMIN]), Account.from_key(keys[KEEPER])
    minters = [Account.from_key(key) for key in keys[FIRST_MINTER:]]
    deployment = await glisk_contract.deploy(
        w3, admin, keeper=keeper.address, mint_price=MINT_PRICE
    )
    sessions = setup_db_session(database_url, pool_size=2)
    uow_factory = create_uow_factory(sessions)
    left, sent = tokens, 0
    try:
        while left > 0:
            quantity = min(left, glisk_contract.MAX_BATCH_SIZE)
            minted = await glisk_contract.mint(
                w3,
                minters[sent % len(minters)],
                deployment.address,
                prompt_author=AUTHOR,
                quantity=quantity,
            )
            log = MintLog(
                tx_hash=minted.tx_hash,
                log_index=minted.log_index,
                block_number=minted.block_number,
                block_timestamp=datetime.fromtimestamp(minted.block_timestamp, UTC),
                minter=minted.minter,
                author=minted.prompt_author,
                start_token_id=minted.start_token_id,
                quantity=minted.quantity,
            )
            async with uow_factory() as uow:
                await uow.mint_events.record_mint(log, new_author_prompt=PROMPT)
            left -= quantity
            sent += 1
    finally:
        await engine_of(sessions).dispose()
        await w3.provider.disconnect()
    key_file = work / "keeper.key"
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("0x" + bytes(keeper.key).hex())
    return DemoChain(node, deployment.address, keeper.address, key_file, sent)


_DB_FACTS = """
SELECT t.token_id, 'ipfs://' || coalesce(t.metadata_cid, '') FROM tokens_s0 AS t
"""
# Each broadcast transaction (every replacement is its own), its tokens and how often it went out.
_ATTEMPTS = """
SELECT a.tx_hash, r.token_ids_chain, a.broadcasts
FROM reveal_attempts AS a
JOIN LATERAL (
    SELECT array_agg(t.token_id ORDER BY t.token_id) AS token_ids_chain
    FROM reveal_transactions AS rt JOIN tokens_s0 AS t ON t.id = ANY(rt.token_ids)
    WHERE rt.id = a.reveal_id
) AS r ON true
"""


async def chain_facts(chain: DemoChain, conn: psycopg.Connection[Any]) -> ChainFacts:
    """What the chain says (each token's isRevealed and tokenURI, every TokensRevealed log, the
    keeper's receipts and nonce), with what the database recorded of the transactions it sent
    (``conn``: to the demo's database) to count their broadcasts."""
    from glisk.chain import client
    from glisk.chain import contract as glisk_contract
    from glisk.ops.demo_verdict import ChainFacts, ChainTx

    stored_uri = {int(t): uri for t, uri in conn.execute(_DB_FACTS.encode()).fetchall()}
    attempts = {
        str(tx_hash): (tuple(int(t) for t in token_ids or ()), int(broadcasts))
        for tx_hash, token_ids, broadcasts in conn.execute(_ATTEMPTS.encode()).fetchall()
    }
    ((allocator,),) = conn.execute(b"SELECT max(next_nonce) FROM keeper_nonces").fetchall()

    w3 = client.connect(chain.node.url)
    try:
        contract = glisk_contract.glisk(w3, chain.contract)
        minted = int(await contract.functions.nextTokenId().call()) - 1
        ids = list(range(1, minted + 1))
        limit = asyncio.Semaphore(16)

        async def token(token_id: int) -> tuple[bool, str]:
            async with limit:
                revealed = await contract.functions.isRevealed(token_id).call()
                uri = await contract.functions.tokenURI(token_id).call()
                return bool(revealed), str(uri)

        answers = dict(zip(ids, await asyncio.gather(*(token(t) for t in ids)), strict=True))
        event = contract.events.TokensRevealed()
        logs = await w3.eth.get_logs(
            {"address": contract.address, "fromBlock": 0, "toBlock": "latest",
             "topics": [event.topic]}
        )  # fmt: skip
        carried: dict[str, tuple[int, ...]] = {}
        for entry in logs:
            tx_hash = entry["transactionHash"].to_0x_hex()
            ids_in = tuple(int(t) for t in event.process_log(entry)["args"]["tokenIds"])
            carried[tx_hash] = carried.get(tx_hash, ()) + ids_in

        async def receipt(tx_hash: str) -> Any:
            async with limit:
                try:
                    return await w3.eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]
                except Exception:  # never mined (replaced, dropped): no receipt
                    return None

        receipts = [r for r in await asyncio.gather(*(receipt(h) for h in attempts)) if r]
        keeper = w3.to_checksum_address(chain.keeper_address)
        keeper_nonce = int(await w3.eth.get_transaction_count(keeper, "latest"))
    finally:
        await w3.provider.disconnect()
    reverted = [r for r in receipts if r["status"] != 1]
    transactions = [
        ChainTx(tx_hash, token_ids, True, attempts.get(tx_hash, ((), 1))[1])
        for tx_hash, token_ids in carried.items()
    ] + [
        ChainTx(r["transactionHash"].to_0x_hex(), attempts.get(
            r["transactionHash"].to_0x_hex(), ((), 1))[0], False)
        for r in reverted
    ]  # fmt: skip
    revealed: dict[int, str] = {}
    for tx in transactions:
        for token_id in tx.token_ids if tx.confirmed else ():
            if answers.get(token_id, (False, ""))[0]:
                revealed.setdefault(token_id, tx.tx_hash)
    return ChainFacts(
        transactions=tuple(transactions),
        revealed=revealed,
        send_calls=sum(b for _, b in attempts.values()),
        minted=minted,
        uri_mismatch=tuple(t for t in ids if answers[t][0] and answers[t][1] != stored_uri.get(t)),
        keeper_nonce=keeper_nonce,
        allocator_nonce=None if allocator is None else int(allocator),
        reverted=len(reverted),
        gas_used=sum(int(r["gasUsed"]) for r in receipts if r["status"] == 1),
    )
