"""The GLISK contract from Python: its committed artifact, a deploy helper, a mint helper, and its
custom errors decoded.

``artifact()`` reads ``chain/artifacts/GliskNFT.json`` (``python -m glisk.chain.compile`` writes
it) with importlib.resources on first use, never at import. ``deploy`` and ``mint`` sign with a
local key and wait for the receipt: they are for set-up (tests, the demo, a fresh network),
where one caller owns the account; the keeper sends its own transactions through its nonce
allocator.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from eth_account.signers.local import LocalAccount
from eth_utils.crypto import keccak
from hexbytes import HexBytes
from web3 import AsyncWeb3
from web3.contract import AsyncContract
from web3.logs import DISCARD
from web3.types import TxReceipt

from glisk.errors import GliskError

PLACEHOLDER_URI = "ipfs://bafkreiglisk-placeholder"
MAX_BATCH_SIZE = 50


class ContractCallFailed(GliskError):
    """A set-up transaction (deploy, mint, grant) reverted or was not mined in time."""


@dataclass(frozen=True)
class Deployment:
    address: str  # checksummed
    tx_hash: str
    block_number: int


@dataclass(frozen=True)
class Minted:
    """What one ``mint`` transaction's BatchMinted log says."""

    tx_hash: str
    log_index: int
    block_number: int
    block_hash: str
    block_timestamp: int
    minter: str
    prompt_author: str
    start_token_id: int
    quantity: int
    total_paid: int


@cache
def artifact() -> dict[str, Any]:
    """The committed artifact: abi, bytecode, deployedBytecode, the compiler and its settings."""
    text = resources.files("glisk.chain").joinpath("artifacts/GliskNFT.json").read_text()
    return json.loads(text)


def abi() -> list[dict[str, Any]]:
    return artifact()["abi"]


def glisk(w3: AsyncWeb3, address: str) -> AsyncContract:
    """The GLISK contract at ``address`` (no I/O)."""
    return w3.eth.contract(address=AsyncWeb3.to_checksum_address(address), abi=abi())


@cache
def _errors() -> dict[bytes, tuple[str, list[str]]]:
    found: dict[bytes, tuple[str, list[str]]] = {}
    for item in abi():
        if item.get("type") == "error":
            types = [i["type"] for i in item.get("inputs", [])]
            selector = keccak(text=f"{item['name']}({','.join(types)})")[:4]
            found[selector] = (item["name"], types)
    return found


def decode_error(data: object) -> tuple[str, tuple[Any, ...]] | None:
    """A revert's data decoded as one of the contract's custom errors: ``("AlreadyRevealed",
    (7,))``; None for anything else (empty data, a string reason, another contract's error)."""
    if not isinstance(data, str | bytes):  # web3 gives a str; anything else is not revert data
        return None
    try:
        raw = bytes(HexBytes(data))
    except ValueError:
        return None
    known = _errors().get(raw[:4])
    if known is None:
        return None
    from eth_abi.abi import decode

    name, types = known
    try:
        return name, tuple(decode(types, raw[4:]))
    except Exception:  # malformed arguments: not this error after all
        return None


async def send_and_wait(
    w3: AsyncWeb3, account: LocalAccount, tx: dict[str, Any], *, wait: float = 30.0
) -> TxReceipt:
    """Fill nonce (pending count), fees and gas, sign, send and wait for the receipt. Raises
    ContractCallFailed when it reverts or is not mined within ``wait`` seconds. For set-up only: two
    concurrent callers with one account would take the same nonce."""
    from web3.exceptions import TimeExhausted

    filled: dict[str, Any] = {
        "chainId": await w3.eth.chain_id,
        "nonce": await w3.eth.get_transaction_count(account.address, "pending"),
        "value": 0,
        **tx,
    }
    filled["from"] = account.address
    if "maxFeePerGas" not in filled:
        block = await w3.eth.get_block("latest")
        tip = 1_000_000_000
        filled["maxPriorityFeePerGas"] = tip
        filled["maxFeePerGas"] = 2 * int(block.get("baseFeePerGas", 0)) + tip
    if "gas" not in filled:
        filled["gas"] = int(await w3.eth.estimate_gas(filled) * 1.2)  # type: ignore[arg-type]
    filled.pop("from")
    signed = account.sign_transaction(filled)
    tx_hash = await w3.eth.send_raw_transaction(signed.raw_transaction)
    try:
        receipt = await w3.eth.wait_for_transaction_receipt(
            tx_hash, timeout=wait, poll_latency=0.05
        )
    except TimeExhausted:
        raise ContractCallFailed(f"{tx_hash.to_0x_hex()} not mined within {wait:g} s") from None
    if receipt["status"] != 1:
        raise ContractCallFailed(f"{tx_hash.to_0x_hex()} reverted")
    return receipt


async def deploy(
    w3: AsyncWeb3,
    deployer: LocalAccount,
    *,
    keeper: str,
    admin: str | None = None,
    mint_price: int = 0,
    placeholder_uri: str = PLACEHOLDER_URI,
    name: str = "GLISK",
    symbol: str = "GLISK",
) -> Deployment:
    """Deploy the contract from the committed artifact; ``keeper`` gets KEEPER_ROLE, ``admin``
    (default the deployer) DEFAULT_ADMIN_ROLE. Waits for the receipt."""
    from eth_abi.abi import encode

    (constructor,) = [item for item in abi() if item["type"] == "constructor"]
    arguments = encode(
        [i["type"] for i in constructor["inputs"]],
        [
            name,
            symbol,
            placeholder_uri,
            mint_price,
            AsyncWeb3.to_checksum_address(admin or deployer.address),
            AsyncWeb3.to_checksum_address(keeper),
        ],
    )
    data = artifact()["bytecode"] + arguments.hex()
    receipt = await send_and_wait(w3, deployer, {"data": data})
    address = receipt["contractAddress"]
    if address is None:
        raise ContractCallFailed("the deployment's receipt names no contract")
    return Deployment(
        AsyncWeb3.to_checksum_address(address),
        receipt["transactionHash"].to_0x_hex(),
        receipt["blockNumber"],
    )


async def mint(
    w3: AsyncWeb3,
    minter: LocalAccount,
    address: str,
    *,
    prompt_author: str,
    quantity: int,
    value: int | None = None,
) -> Minted:
    """One ``mint(promptAuthor, quantity)`` transaction from ``minter`` paying ``value`` (default
    the contract's price times quantity); what its BatchMinted log says."""
    contract = glisk(w3, address)
    if value is None:
        value = int(await contract.functions.mintPrice().call()) * quantity
    data = contract.encode_abi(
        "mint", args=[AsyncWeb3.to_checksum_address(prompt_author), quantity]
    )
    receipt = await send_and_wait(
        w3, minter, {"to": contract.address, "data": data, "value": value}
    )
    (log,) = contract.events.BatchMinted().process_receipt(receipt, errors=DISCARD)
    block = await w3.eth.get_block(receipt["blockNumber"])
    return Minted(
        tx_hash=receipt["transactionHash"].to_0x_hex(),
        log_index=log["logIndex"],
        block_number=receipt["blockNumber"],
        block_hash=receipt["blockHash"].to_0x_hex(),
        block_timestamp=int(block.get("timestamp", 0)),
        minter=log["args"]["minter"],
        prompt_author=log["args"]["promptAuthor"],
        start_token_id=int(log["args"]["startTokenId"]),
        quantity=int(log["args"]["quantity"]),
        total_paid=int(log["args"]["totalPaid"]),
    )
