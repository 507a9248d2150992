"""Entry point for reveal worker processes forked by the reveal chaos test."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal

from glisk.core.config import load_settings
from glisk.core.logs import configure_logging
from glisk.standins.chain_client import ChainClient
from glisk.standins.revealer import ChainRevealer
from glisk.workers.connection import ConnectOptions
from glisk.workers.worker import Worker, hold_stop_signals, install_stop_signals
from tests.support.processes import stderr_to


def run_reveal_worker(
    url: str, chain_url: str, log_path: str, seed: int, lease: float, die_after_send: float
) -> None:
    hold_stop_signals()
    stderr_to(log_path)
    asyncio.run(_main(url, chain_url, seed, lease, die_after_send))


async def _main(url: str, chain_url: str, seed: int, lease: float, die_after_send: float) -> None:
    configure_logging("development", "WARNING")
    rng = random.Random(seed)
    # One account per process, as each reveal service holds its own key; a rescuer rebroadcasts
    # the dead holder's signed transaction, whoever signed it.
    sender = "0x" + hashlib.sha256(f"reveal-worker-{seed}".encode()).hexdigest()[:40]

    async def after_send() -> None:
        if rng.random() < die_after_send:  # sent, not yet completed: the worst moment to die
            os.kill(os.getpid(), signal.SIGKILL)

    worker = Worker(
        "reveal",
        ChainRevealer(ChainClient(chain_url), sender, after_send=after_send),
        # DB_POOLER from the environment: the tests may run through PgBouncer.
        ConnectOptions(
            url, application_name="glisk-reveal-chaos", pooler=load_settings().db_pooler
        ),
        batch=10,
        lease_seconds=lease,
        max_attempts=50,
        max_deferrals=500,
        backoff_base=0.05,
        backoff_cap=0.5,
        poll_interval=0.05,
    )
    stop = asyncio.Event()
    install_stop_signals(stop)
    await worker.run(stop)
