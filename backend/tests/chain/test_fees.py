"""The keeper's fee policy: a quote from the node's fee history, a cap, +12.5% replacements."""

from __future__ import annotations

from glisk.chain.fees import FeePolicy, Fees, Quote
from tests.support.chain import GWEI, Chain


def _quote(base: int, priority: int, cap: int) -> Quote:
    return Quote(base, priority, Fees(min(cap, 2 * base + priority), priority))


def test_a_replacement_pays_an_eighth_more_on_both_fields_or_todays_quote_if_higher() -> None:
    policy = FeePolicy(100 * GWEI)
    old = Fees(10 * GWEI, 1 * GWEI)
    bumped = policy.bump(old, _quote(GWEI, GWEI // 10, policy.cap))
    assert bumped == Fees(11_250_000_000, 1_125_000_000)
    assert bumped is not None and bumped.at_least_bumped_from(old)
    risen = policy.bump(old, _quote(20 * GWEI, 2 * GWEI, policy.cap))
    assert risen == Fees(42 * GWEI, 2 * GWEI)  # the market moved more than 12.5%


def test_no_replacement_above_the_cap() -> None:
    policy = FeePolicy(10 * GWEI)
    assert policy.bump(Fees(9 * GWEI, GWEI), _quote(GWEI, GWEI, policy.cap)) is None
    assert policy.bump(Fees(8 * GWEI, GWEI), _quote(GWEI, GWEI, policy.cap)) == Fees(
        9 * GWEI, 1_125_000_000
    )


def test_a_batch_is_affordable_only_if_the_next_block_can_take_it_under_the_cap() -> None:
    policy = FeePolicy(10 * GWEI)
    assert policy.affordable(_quote(9 * GWEI, GWEI, policy.cap))
    assert not policy.affordable(_quote(9 * GWEI + 1, GWEI, policy.cap))


async def test_the_quote_follows_the_next_blocks_base_fee(glisk_chain: Chain) -> None:
    policy = FeePolicy(1000 * GWEI)
    await glisk_chain.rpc("anvil_setNextBlockBaseFeePerGas", [hex(40 * GWEI)])
    await glisk_chain.mine()
    quote = await policy.quote(glisk_chain.w3)
    assert 30 * GWEI < quote.base_fee <= 40 * GWEI  # an empty block lowers it by up to 12.5%
    assert quote.fees.max_fee_per_gas == 2 * quote.base_fee + quote.priority
    capped = await FeePolicy(50 * GWEI).quote(glisk_chain.w3)
    assert capped.fees.max_fee_per_gas == 50 * GWEI
