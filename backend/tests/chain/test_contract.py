"""The GLISK contract on a real node: mint, reveal once, the placeholder, EIP-4906, the roles."""

from __future__ import annotations

import pytest
from eth_account import Account
from web3.exceptions import ContractCustomError
from web3.logs import DISCARD
from web3.types import TxParams, Wei

from glisk.chain import contract as glisk_contract
from glisk.chain.contract import decode_error
from tests.support.chain import AUTHOR, MINT_PRICE, Chain


def test_the_artifact_has_the_interface_glisk_users_know() -> None:
    names = {(item["type"], item.get("name")) for item in glisk_contract.abi()}
    for expected in [
        ("function", "mint"),
        ("function", "revealTokens"),
        ("function", "isRevealed"),
        ("function", "nextTokenId"),
        ("function", "tokenURI"),
        ("function", "revealedAt"),
        ("event", "BatchMinted"),
        ("event", "TokensRevealed"),
        ("event", "MetadataUpdate"),
        ("event", "BatchMetadataUpdate"),
        ("error", "AlreadyRevealed"),
    ]:
        assert expected in names, expected
    assert glisk_contract.artifact()["bytecode"].startswith("0x60")


async def test_mints_number_tokens_on_from_one_and_say_so_in_batch_minted(
    glisk_chain: Chain,
) -> None:
    first = await glisk_chain.mint(3)
    second = await glisk_chain.mint(50, minter=1)
    assert (first.start_token_id, first.quantity, first.total_paid) == (1, 3, 3 * MINT_PRICE)
    assert (second.start_token_id, second.quantity) == (4, 50)
    assert (
        second.prompt_author.lower() == AUTHOR and second.minter == glisk_chain.minters[1].address
    )
    contract = glisk_chain.contract
    assert await contract.functions.nextTokenId().call() == 54
    assert await contract.functions.ownerOf(53).call() == glisk_chain.minters[1].address
    assert (
        await contract.functions.authorClaimable(glisk_chain.w3.to_checksum_address(AUTHOR)).call()
        == (53 * MINT_PRICE) // 2
    )  # half of what each mint paid


async def test_a_mint_that_pays_too_little_or_too_many_is_refused(glisk_chain: Chain) -> None:
    with pytest.raises(ContractCustomError) as underpaid:
        await glisk_contract.mint(
            glisk_chain.w3, glisk_chain.minters[0], glisk_chain.address,
            prompt_author=AUTHOR, quantity=2, value=MINT_PRICE,
        )  # fmt: skip
    assert decode_error(underpaid.value.data) == ("InsufficientPayment", ())
    too_many: TxParams = {"from": glisk_chain.minters[0].address, "value": Wei(51 * MINT_PRICE)}
    with pytest.raises(ContractCustomError) as caught:
        await glisk_chain.contract.functions.mint(
            glisk_chain.w3.to_checksum_address(AUTHOR), 51
        ).estimate_gas(too_many)
    assert decode_error(caught.value.data) == ("ExceedsMaxBatchSize", ())


async def test_a_reveal_sets_the_uri_once_tells_marketplaces_and_a_repeat_reverts(
    glisk_chain: Chain,
) -> None:
    await glisk_chain.mint(3)
    contract = glisk_chain.contract
    assert await contract.functions.tokenURI(2).call() == glisk_contract.PLACEHOLDER_URI
    assert await contract.functions.supportsInterface(bytes.fromhex("49064906")).call()
    reveal = contract.encode_abi("revealTokens", args=[[1, 2], ["ipfs://one", "ipfs://two"]])
    receipt = await glisk_contract.send_and_wait(
        glisk_chain.w3, glisk_chain.keeper, {"to": glisk_chain.address, "data": reveal}
    )
    updates = contract.events.MetadataUpdate().process_receipt(receipt, errors=DISCARD)
    assert [log["args"]["_tokenId"] for log in updates] == [1, 2]
    (revealed,) = contract.events.TokensRevealed().process_receipt(receipt, errors=DISCARD)
    assert list(revealed["args"]["tokenIds"]) == [1, 2]
    assert await contract.functions.tokenURI(2).call() == "ipfs://two"
    assert await contract.functions.isRevealed(2).call()
    assert not await contract.functions.isRevealed(3).call()
    assert await contract.functions.revealedAt(1).call() == receipt["blockNumber"]

    again = contract.encode_abi("revealTokens", args=[[3, 2], ["ipfs://three", "ipfs://again"]])
    with pytest.raises(ContractCustomError) as caught:
        await glisk_chain.w3.eth.estimate_gas(
            {"from": glisk_chain.keeper.address, "to": glisk_chain.address, "data": again}
        )
    assert decode_error(caught.value.data) == ("AlreadyRevealed", (2,))
    assert not await contract.functions.isRevealed(3).call(), "a reverted batch wrote nothing"


async def test_only_the_keeper_reveals_and_only_existing_tokens(glisk_chain: Chain) -> None:
    await glisk_chain.mint(1)
    contract = glisk_chain.contract
    stranger = Account.create()
    with pytest.raises(ContractCustomError) as caught:
        await contract.functions.revealTokens([1], ["ipfs://x"]).estimate_gas(
            {"from": stranger.address}
        )
    refused = decode_error(caught.value.data)
    assert refused is not None and refused[0] == "AccessControlUnauthorizedAccount"
    assert refused[1][0].lower() == stranger.address.lower()
    with pytest.raises(ContractCustomError):
        await contract.functions.revealTokens([2], ["ipfs://x"]).estimate_gas(
            {"from": glisk_chain.keeper.address}
        )


def test_an_unknown_revert_is_not_mistaken_for_one_of_ours() -> None:
    assert decode_error(None) is None
    assert decode_error("0x") is None
    assert decode_error("0x08c379a0" + "00" * 64) is None  # Error(string)
