"""The reveal stage's handler: the keeper (glisk.chain.keeper) built from the settings.

    glisk worker reveal --handler glisk.handlers.reveal:keeper

Settings (environment or .env; see .env.example): CHAIN_RPC_URL, CHAIN_ID, GLISK_CONTRACT_ADDRESS,
KEEPER_PRIVATE_KEY or KEEPER_PRIVATE_KEY_FILE (never on the command line), REVEAL_CONFIRMATIONS,
REVEAL_MAX_GAS_PRICE_GWEI, REVEAL_STUCK_SECONDS, REVEAL_POLL_SECONDS.

``glisk worker`` calls ``prepare()`` before the worker starts: the settings are checked and the
node asked whether it serves CHAIN_ID, whether the contract is there and whether the key's address
holds KEEPER_ROLE; any of these wrong is a ConfigError (exit 2), a node that does not answer an
OperatorError (exit 1). A handler used without ``glisk worker`` builds itself on its first call.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import TYPE_CHECKING
from uuid import UUID

from glisk.errors import ConfigError, OperatorError
from glisk.workers.claims import Claim
from glisk.workers.reveal import PendingReveal, RevealState

if TYPE_CHECKING:
    from glisk.chain.keeper import Keeper, KeeperConfig
    from glisk.core.config import Settings

GWEI = Decimal(10**9)


def keeper_config(settings: Settings) -> KeeperConfig:
    """The keeper's configuration; ConfigError naming the first variable missing."""
    from eth_account import Account

    from glisk.chain.keeper import KeeperConfig

    rpc_url = settings.chain_rpc_url
    chain_id = settings.chain_id
    contract = settings.glisk_contract_address
    if rpc_url is None:
        raise ConfigError("CHAIN_RPC_URL: required by the reveal keeper")
    if chain_id is None:
        raise ConfigError("CHAIN_ID: required by the reveal keeper")
    if contract is None:
        raise ConfigError("GLISK_CONTRACT_ADDRESS: required by the reveal keeper")
    account = Account.from_key(settings.keeper_key().get_secret_value())
    return KeeperConfig(
        rpc_url=rpc_url.get_secret_value(),
        chain_id=chain_id,
        contract=contract,
        account=account,
        max_fee_per_gas=int(settings.reveal_max_gas_price_gwei * GWEI),
        confirmations=settings.confirmations,
        stuck_after=settings.reveal_stuck_seconds,
        poll=settings.reveal_poll_seconds,
    )


async def check(keeper: Keeper, node: str) -> None:
    """The node serves CHAIN_ID, the contract is deployed there and the key holds KEEPER_ROLE.
    ConfigError naming the variable at fault; OperatorError if the node does not answer.
    ``node`` names the node in those messages (``Settings.masked_rpc_url()``: never its key)."""
    from glisk.chain.client import TRANSIENT, transport_error

    config = keeper.config
    try:
        served = int(await keeper.w3.eth.chain_id)
        code = await keeper.w3.eth.get_code(keeper.contract.address)
        role = await keeper.contract.functions.KEEPER_ROLE().call() if code else b""
        allowed = (
            bool(code)
            and await keeper.contract.functions.hasRole(role, config.account.address).call()
        )
    except TRANSIENT as exc:
        said = transport_error(exc)
        raise OperatorError(f"CHAIN_RPC_URL: the node at {node} did not answer ({said})") from None
    if served != config.chain_id:
        raise ConfigError(f"CHAIN_ID: is {config.chain_id} but the node at {node} serves {served}")
    if not code:
        raise ConfigError(
            f"GLISK_CONTRACT_ADDRESS: no contract at {config.contract} on chain {served}"
        )
    if not allowed:
        raise ConfigError(
            f"KEEPER_PRIVATE_KEY: its address {config.account.address} lacks KEEPER_ROLE on "
            f"{config.contract}"
        )


class RevealHandler:
    """The keeper for this process, built on first use from ``load_settings()``."""

    def __init__(self) -> None:
        self._keeper: Keeper | None = None
        self._node = "?"  # CHAIN_RPC_URL as messages may name it, once the keeper is built

    def _get(self) -> Keeper:
        if self._keeper is None:
            from glisk.chain.keeper import Keeper
            from glisk.core.config import load_settings

            settings = load_settings()
            self._keeper = Keeper(keeper_config(settings))
            self._node = settings.masked_rpc_url() or "?"
        return self._keeper

    async def prepare(self) -> None:
        """Build the keeper and check it against the node (see the module docstring)."""
        await check(self._get(), self._node)

    async def __call__(self, claims: Sequence[Claim]) -> dict[UUID, str]:
        return await self._get()(claims)

    async def reconcile(self, pending: PendingReveal) -> RevealState:
        return await self._get().reconcile(pending)


keeper = RevealHandler()
