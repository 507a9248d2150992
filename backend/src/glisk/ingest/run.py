"""``glisk ingest``'s process: connect to the node and the database, check both, then follow the
contract's mint logs until ``stop`` (or move the cursor back after a deep reorg).

``glisk.cli.ingest`` parses the command line and chooses the database; everything from there on
is here.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from glisk.errors import ConfigError, OperatorError, first_line

if TYPE_CHECKING:
    from glisk.core.config import Settings
    from glisk.ingest.node import Node
    from glisk.uow import UnitOfWorkFactory


def required(settings: Settings) -> tuple[str, str]:
    """CHAIN_RPC_URL and GLISK_CONTRACT_ADDRESS; ConfigError naming the one that is unset."""
    if settings.chain_rpc_url is None:
        raise ConfigError("CHAIN_RPC_URL: is required by glisk ingest (the node's JSON-RPC URL)")
    if settings.glisk_contract_address is None:
        raise ConfigError("GLISK_CONTRACT_ADDRESS: is required by glisk ingest")
    return settings.chain_rpc_url.get_secret_value(), settings.glisk_contract_address


async def run_ingest(
    settings: Settings,
    url: str,
    *,
    once: bool = False,
    rewind_to: int | None = None,
    metrics_port: int | None = None,
) -> None:
    """Check the database at ``url`` and the node, then follow until SIGTERM or SIGINT (with
    ``once``: catch up, one gap pass, return), or with ``rewind_to`` rewind and return. Raises
    OperatorError (1) or ConfigError (2) in one line."""
    import structlog

    from glisk.chain import client
    from glisk.core.database import engine_of, setup_db_session
    from glisk.ingest.follower import Follower, FollowerOptions
    from glisk.ingest.metrics import IngestMetrics
    from glisk.ingest.node import Node
    from glisk.uow import create_uow_factory
    from glisk.workers.signals import install_stop_signals

    rpc_url, contract = required(settings)
    # web3's HTTP provider logs its URL (every request at DEBUG, the disconnect at INFO), and
    # providers put the API key in it: web3 speaks at WARNING or not at all, whatever LOG_LEVEL.
    logging.getLogger("web3").setLevel(logging.WARNING)
    log = structlog.get_logger("glisk.ingest")
    options: dict[str, Any] = dict(settings.ingest_options())
    w3 = client.connect(rpc_url, timeout=settings.ingest_rpc_timeout)
    node = Node(w3, contract, max_range=options.pop("max_range"))
    factory = setup_db_session(url, **settings.engine_options("ingest"))
    uow_factory = create_uow_factory(factory)
    try:
        await _check(settings, node, uow_factory)
        if rewind_to is not None:
            await rewind(node, uow_factory, rewind_to)
            return
        stop = asyncio.Event()
        install_stop_signals(stop)
        metrics = IngestMetrics()
        port = metrics_port or settings.ingest_metrics_port
        if port is not None:
            metrics.serve(port)
        follower = Follower(node, uow_factory, FollowerOptions(**options), metrics=metrics)
        log.info(
            "ingest.start",
            node=settings.masked_rpc_url(),
            contract=contract,
            confirmations=settings.ingest_confirmations,
            reorg_window=settings.ingest_reorg_window,
            max_range=settings.ingest_max_range,
        )
        stats = await follower.run(stop, once=once)
        log.info("ingest.stop", **vars(stats))
    finally:
        await engine_of(factory).dispose()
        await w3.provider.disconnect()


async def _check(settings: Settings, node: Node, uow_factory: UnitOfWorkFactory) -> None:
    """The database is migrated for ingest, the node answers, its chain is CHAIN_ID's, and the
    contract is deployed there. Raises OperatorError (1) or ConfigError (2) in one line."""
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    from glisk.errors import DatabaseError
    from glisk.ingest.node import NodeUnavailable

    try:
        async with uow_factory() as uow:
            found = (
                await uow.session.execute(text("SELECT to_regclass('chain_blocks') IS NOT NULL"))
            ).scalar()
    except (SQLAlchemyError, DatabaseError, OSError) as exc:
        raise OperatorError(f"database unreachable: {first_line(exc)}") from None
    if not found:
        raise OperatorError("the database is not migrated for glisk ingest: run 'glisk db upgrade'")
    where = settings.masked_rpc_url()
    try:
        chain_id = int(await node.call("eth_chainId", []), 16)
        code = await node.call("eth_getCode", [node.contract, "latest"])
    except NodeUnavailable as exc:
        raise OperatorError(f"the node at {where} is unusable: {exc}") from None
    if settings.chain_id is not None and chain_id != settings.chain_id:
        raise ConfigError(
            f"CHAIN_ID: is {settings.chain_id} but the node at {where} is on {chain_id}"
        )
    if not code or code in ("0x", "0x0"):
        raise ConfigError(
            f"GLISK_CONTRACT_ADDRESS: no contract at {node.contract} on chain {chain_id}"
        )


async def rewind(node: Node, uow_factory: UnitOfWorkFactory, block: int) -> None:
    """Move the cursor back to ``block`` (its hash read from the node now), forget the kept
    blocks above it and clear a deep-reorg stop, in one transaction. The next step reads from
    ``block + 1`` and rolls back whatever recorded there is not on the chain. The cursor's
    totals are kept. Raises ConfigError when the node has no such block."""
    import structlog

    from glisk.ingest import state
    from glisk.ingest.state import Cursor

    found = await node.block(block)
    if found is None:
        raise ConfigError(f"--rewind-to: the node has no block {block}")
    async with uow_factory() as uow:
        raw = await uow.system_state.get_state(state.CURSOR)
        cursor = Cursor.from_json(raw)
        if cursor is not None and block > cursor.block:
            raise ConfigError(f"--rewind-to: {block} is above the cursor ({cursor.block})")
        moved = (cursor or Cursor(block, found.hash)).advanced(block, found.hash)
        swap = await uow.system_state.compare_and_set(state.CURSOR, raw, moved.to_json())
        if not swap.changed:
            raise OperatorError("the cursor moved meanwhile (a follower is running?): try again")
        await uow.chain_blocks.forget_above(block)
        await uow.chain_blocks.keep([(block, found.hash)])
        await uow.system_state.delete_state(state.HALTED)
    structlog.get_logger("glisk.ingest").warning(
        "ingest.rewound", block=block, was=cursor.block if cursor else None
    )
