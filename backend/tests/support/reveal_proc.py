"""Entry point of reveal worker processes (the keeper on anvil) that tests kill at will.

The keeper's key comes from a 0600 file the test wrote (never an argument). ``die_after_send`` is
the chance that the process SIGKILLs itself right after a batch's first broadcast, before its
completion is written: the worst moment to die.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eth_account import Account

from glisk.chain.keeper import Keeper, KeeperConfig
from glisk.core.config import load_settings
from glisk.core.logs import configure_logging
from glisk.workers.connection import ConnectOptions
from glisk.workers.worker import Worker, hold_stop_signals, install_stop_signals
from tests.support.processes import stderr_to


@dataclass(frozen=True)
class RevealProcess:
    """What a reveal worker process runs with (picklable)."""

    database_url: str
    rpc_url: str
    chain_id: int
    contract: str
    key_file: str
    log_path: str
    seed: int = 0
    die_after_send: float = 0.0
    keeper: dict[str, Any] = field(default_factory=dict[str, Any])  # KeeperConfig fields
    worker: dict[str, Any] = field(default_factory=dict[str, Any])  # Worker options


def run_reveal_worker(spec: RevealProcess) -> None:
    hold_stop_signals()
    stderr_to(spec.log_path, quiet_stdout=True)
    asyncio.run(_main(spec, Path(spec.key_file).read_text().strip()))


async def _main(spec: RevealProcess, key: str) -> None:
    configure_logging("development", "INFO")
    rng = random.Random(spec.seed)

    async def after_send() -> None:
        if rng.random() < spec.die_after_send:  # sent, not yet completed
            os.kill(os.getpid(), signal.SIGKILL)

    account = Account.from_key(key)
    config = KeeperConfig(
        rpc_url=spec.rpc_url,
        chain_id=spec.chain_id,
        contract=spec.contract,
        account=account,
        **{"max_fee_per_gas": 100 * 10**9, **spec.keeper},
    )
    options: dict[str, Any] = {
        "batch": 10,
        "lease_seconds": 1.0,
        "max_attempts": 50,
        "max_deferrals": 1000,
        "backoff_base": 0.05,
        "backoff_cap": 0.5,
        "poll_interval": 0.05,
        **spec.worker,
    }
    worker = Worker(
        "reveal",
        Keeper(config, after_send=after_send),
        # DB_POOLER from the environment: the tests may run through PgBouncer.
        ConnectOptions(
            spec.database_url,
            application_name="glisk-reveal-test",
            pooler=load_settings().db_pooler,
        ),
        **options,
    )
    stop = asyncio.Event()
    install_stop_signals(stop)
    await worker.run(stop)
