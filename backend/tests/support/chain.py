"""A real chain for tests: a GLISK contract deployed on anvil, its accounts, and anvil's faults.

The ``anvil`` fixture (tests/conftest.py) starts one node per test module; ``glisk_chain``
deploys a fresh contract on it for each test inside an ``evm_snapshot`` that is reverted
afterwards (automine back on, interval mining off), so tests of one module never see each
other's blocks, nonces or tokens.

Accounts, from anvil's funded dev accounts: 0 deploys and administers, 1 is the keeper (it holds
KEEPER_ROLE), 2 and up mint.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import AsyncWeb3
from web3.contract import AsyncContract

from glisk.chain import client
from glisk.chain import contract as glisk_contract
from glisk.chain.anvil import Anvil
from glisk.chain.contract import Deployment, Minted
from glisk.chain.keeper import KeeperConfig

AUTHOR = "0x" + "ab" * 20  # the prompt author every test mint credits
MINT_PRICE = 10**15  # 0.001 ETH per token
GWEI = 10**9


@dataclass
class Chain:
    node: Anvil
    w3: AsyncWeb3
    deployment: Deployment
    admin: LocalAccount
    keeper: LocalAccount
    minters: list[LocalAccount]

    @property
    def address(self) -> str:
        return self.deployment.address

    @property
    def contract(self) -> AsyncContract:
        return glisk_contract.glisk(self.w3, self.address)

    async def mint(self, quantity: int, *, minter: int = 0) -> Minted:
        """One real ``mint`` transaction of ``quantity`` tokens (at most 50)."""
        return await glisk_contract.mint(
            self.w3, self.minters[minter], self.address, prompt_author=AUTHOR, quantity=quantity
        )

    async def mint_many(self, count: int) -> list[Minted]:
        """``count`` tokens (ids 1..count on a fresh contract) in mints of at most 50."""
        minted: list[Minted] = []
        while count > 0:
            quantity = min(count, glisk_contract.MAX_BATCH_SIZE)
            minted.append(await self.mint(quantity, minter=len(minted) % len(self.minters)))
            count -= quantity
        return minted

    async def rpc(self, method: str, params: list[Any] | None = None) -> Any:
        """anvil's own RPC (faults, mining control)."""
        return await client.rpc(self.w3, method, params)

    async def mine(self, blocks: int = 1) -> None:
        for _ in range(blocks):
            await self.rpc("evm_mine")

    def keeper_config(self, **overrides: Any) -> KeeperConfig:
        """A keeper on this contract with the keeper account, quick to poll and to give up."""
        fields: dict[str, Any] = {
            "rpc_url": self.node.url,
            "chain_id": self.node.chain_id,
            "contract": self.address,
            "account": self.keeper,
            "max_fee_per_gas": 100 * GWEI,
            "confirmations": 1,
            "stuck_after": 5.0,
            "poll": 0.02,
            "wait": 20.0,
        }
        fields.update(overrides)
        return KeeperConfig(**fields)

    async def reveals_on_chain(self) -> dict[int, list[str]]:
        """Every TokensRevealed log of the canonical chain: token id -> the transactions that
        revealed it (exactly one each, if all went well)."""
        event = self.contract.events.TokensRevealed()
        logs = await self.w3.eth.get_logs(
            {
                "address": self.contract.address,
                "fromBlock": 0,
                "toBlock": "latest",
                "topics": [event.topic],
            }
        )
        found: dict[int, list[str]] = {}
        for entry in logs:
            for token_id in event.process_log(entry)["args"]["tokenIds"]:
                found.setdefault(int(token_id), []).append(entry["transactionHash"].to_0x_hex())
        return found

    async def confirmed_nonce(self) -> int:
        return int(await self.w3.eth.get_transaction_count(self.keeper.address, "latest"))


@asynccontextmanager
async def deployed(node: Anvil) -> AsyncIterator[Chain]:
    """A fresh GLISK contract on ``node``, everything it did undone at the end."""
    w3 = client.connect(node.url)
    snapshot = await client.rpc(w3, "evm_snapshot")
    keys = node.private_keys
    admin, keeper = Account.from_key(keys[0]), Account.from_key(keys[1])
    try:
        deployment = await glisk_contract.deploy(
            w3, admin, keeper=keeper.address, mint_price=MINT_PRICE
        )
        minters = [Account.from_key(key) for key in keys[2:]]
        yield Chain(node, w3, deployment, admin, keeper, minters)
    finally:
        await client.rpc(w3, "evm_revert", [snapshot])
        # In this order: interval mining set to 0 turns automine off too.
        await client.rpc(w3, "evm_setIntervalMining", [0])
        await client.rpc(w3, "evm_setAutomine", [True])
        await w3.provider.disconnect()


def key_file(directory: Path, account: LocalAccount) -> Path:
    """The account's private key in a 0600 file (how processes get the keeper key: never in
    argv)."""
    path = directory / f"keeper-{account.address.lower()}.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("0x" + bytes(account.key).hex())
    return path
